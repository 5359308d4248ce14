"""A spider's scrapy-redis work from the API's side: what a seed, flush or requeue asks for, and the dead letters.

The bodies of ``POST /queues/<spider>/seed``, ``/flush`` and ``/dead/requeue`` checked (``QueueError`` says what
is wrong, with its HTTP status), the key names the spider's nodes publish (``queues_of``), and the dead letters
read a page at a time (``read_dead``). The writes themselves are monitor_acting.py's scripts.
"""

from urllib.parse import urlsplit

from monitor_contract import DEAD_ID, QUEUE_NAMES, as_text, dead_key, dumps, is_text, number
from monitor_records import parse_member
from monitor_settings import redact

# At most this many URLs or requests in one seed (413 beyond).
MAX_SEED = 10000
# A seeded URL is at most this long; a comment at most MAX_COMMENT characters.
MAX_URL = 8000
MAX_COMMENT = 500
# What a flush may name: the scrapy-redis keys the nodes publish.
FLUSHABLE = QUEUE_NAMES
# Dead letters answered unless ?limit= says otherwise, and at most.
DEAD_LIMIT, MAX_DEAD_LIMIT = 50, 1000
# Ids one requeue may name.
MAX_REQUEUE = 10000


class QueueError(ValueError):
    """A request the queue routes refuse: ``status`` (400, 404, 409, 413) and the message."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def http_url(url):
    """True for an http(s) URL with a host and no blank or control character."""
    if not (isinstance(url, str) and 0 < len(url) <= MAX_URL and is_text(url)):
        return False
    if any(c.isspace() or not c.isprintable() for c in url):
        return False
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        return False


def comment_of(body):
    comment = body.get("comment", "")
    if not (isinstance(comment, str) and len(comment) <= MAX_COMMENT and is_text(comment)):
        raise QueueError(400, f"comment must be a string of at most {MAX_COMMENT} characters")
    return comment


def fields_of(body, allowed, example):
    if not isinstance(body, dict):
        raise QueueError(400, f"send a JSON object: {example}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise QueueError(400, f"unknown field {unknown[0][:100]!r}: use {', '.join(allowed)}")


def parse_seed(body):
    """``(start URL entries as JSON text, comment)`` from ``{"urls": [...]}`` or ``{"requests": [{"url", "meta"}]}``:
    the JSON form scrapy-redis's ``make_request_from_data`` reads (``{"url": ..., "meta": {...}}``)."""
    fields_of(body, ("urls", "requests", "comment"), '{"urls": ["https://example.com/"]}')
    kinds = [k for k in ("urls", "requests") if k in body]
    if len(kinds) != 1:
        raise QueueError(400, 'give exactly one of "urls" (a list of URLs) or "requests" (a list of {"url", "meta"})')
    items = body[kinds[0]]
    if not isinstance(items, list) or not items:
        raise QueueError(400, f'"{kinds[0]}" must be a non-empty list')
    if len(items) > MAX_SEED:
        raise QueueError(413, f"at most {MAX_SEED} {kinds[0]} per seed, not {len(items)}: send them in batches")
    entries = []
    for i, item in enumerate(items):
        where = f"{kinds[0]}[{i}]"
        if kinds[0] == "urls":
            url, meta = item, None
        else:
            if not isinstance(item, dict) or set(item) - {"url", "meta"} or "url" not in item:
                raise QueueError(400, f'{where} must be an object with "url" and optionally "meta" (nothing else)')
            url, meta = item["url"], item.get("meta")
            if meta is not None and not isinstance(meta, dict):
                raise QueueError(400, f'{where}: "meta" must be an object')
        if not http_url(url):
            shown = redact(url)[:200] if isinstance(url, str) else dumps(url)[:200]
            raise QueueError(400, f"{where} is not an http(s) URL: {shown!r}")
        entries.append(dumps({"url": url, "meta": meta} if meta else {"url": url}, ensure_ascii=False))
    return entries, comment_of(body)


def parse_flush(body):
    """``(names, comment)`` from ``{"what": ["requests", "start_urls", "dupefilter"]}``."""
    fields_of(body, ("what", "comment"), '{"what": ["requests", "start_urls", "dupefilter"]}')
    what = body.get("what")
    if not (isinstance(what, list) and what):
        raise QueueError(400, f'"what" must be a non-empty list of {", ".join(FLUSHABLE)}')
    for name in what:
        if name not in FLUSHABLE:
            raise QueueError(400, f'"what" names {str(name)[:50]!r}: it may name {", ".join(FLUSHABLE)}')
    return list(dict.fromkeys(what)), comment_of(body)


def parse_requeue(body):
    """``(ids or None for all, comment)`` from ``{"ids": [...]}`` or ``{"all": true}``."""
    fields_of(body, ("ids", "all", "comment"), '{"ids": ["<id>", ...]} or {"all": true}')
    if ("ids" in body) == ("all" in body):
        raise QueueError(400, 'give exactly one of "ids" (a list of dead letter ids) or "all": true')
    if "all" in body:
        if body["all"] is not True:
            raise QueueError(400, '"all" must be true')
        return None, comment_of(body)
    ids = body["ids"]
    if not (isinstance(ids, list) and 0 < len(ids) <= MAX_REQUEUE):
        raise QueueError(400, f'"ids" must be a list of 1 to {MAX_REQUEUE} dead letter ids')
    for rid in ids:
        if not (isinstance(rid, str) and DEAD_ID.match(rid)):
            raise QueueError(400, f"{str(rid)[:50]!r} is not a dead letter id (see GET /queues/<spider>/dead)")
    return list(dict.fromkeys(ids)), comment_of(body)


def queues_of(nodes, spider):
    """The scrapy-redis key names the spider's newest node publishes; QueueError 404 for a spider no node
    reports, 409 when its nodes publish none or keep them in another Redis than the API reads."""
    mine = [s for s in nodes.values() if s.get("spider") == spider]
    if not mine:
        raise QueueError(404, "no spider by that name: none of its nodes reports")
    published = [s for s in mine if s.get("queues")]
    if not published:
        raise QueueError(409, "this spider's nodes publish no scrapy-redis keys (not a scrapy-redis spider, or "
                              "an older monitor)")
    queues = max(published, key=lambda s: number(s.get("timestamp"), 0))["queues"]
    if queues.get("apart"):
        raise QueueError(409, "this spider's queues are in another Redis than the monitor's (MONITOR_REDIS_URL "
                              "differs from REDIS_URL): act on them there")
    return queues


# ---------------------------------------------------------------------------- dead letters

def parse_dead(member):
    """``(id, record)`` from a stored member, or None when malformed."""
    found = parse_member(member, DEAD_ID)
    return found if found is not None and isinstance(found[1].get("url"), str) else None


def shown_dead(rid, record):
    """A dead letter as the API answers it: its id, the url redacted (never a password or a secret query
    option), the rest as recorded."""
    out = {"id": rid, "url": redact(record["url"])}
    for field in ("method", "status", "exception", "reason", "node", "at", "retries", "callback", "priority",
                  "meta"):
        out[field] = record.get(field)
    return out


def dead_bound(before):
    """The ZREVRANGEBYLEX bound for dead letters older than ``before`` (an id), None for a bad one."""
    if before in (None, ""):
        return "+"
    return f"({before}" if DEAD_ID.match(before) else None


def read_dead(r, prefix, spider, limit=DEAD_LIMIT, before=None, reasons=None):
    """``{"dead": [...], "next", "total"}``: the spider's dead letters newest first, older than ``before``,
    of ``reasons`` (a set) when given; ``next`` is the next page's ``before``, None at the end."""
    key, bound = dead_key(prefix, spider), dead_bound(before)
    out, chunk = [], limit + 1 if reasons is None else max(4 * limit, 200)
    total = r.zcard(key)
    while len(out) <= limit:
        members = r.zrevrangebylex(key, bound, "-", 0, chunk)
        for parsed in filter(None, map(parse_dead, members)):
            if reasons is None or parsed[1].get("reason") in reasons:
                out.append(parsed)
        if len(members) < chunk:
            break
        bound = "(" + as_text(members[-1])
    more = len(out) > limit
    out = out[:limit]
    return {"dead": [shown_dead(*p) for p in out], "next": out[-1][0] if more else None, "total": total}
