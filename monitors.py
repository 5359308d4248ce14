"""Node metrics for distributed Scrapy crawlers: the Redis schema, its readers and the writing extension.

Enable the writer in any Scrapy project with ``EXTENSIONS = {"monitors.SpiderMonitor": 500}``.
``monitor_api.py`` and ``alert.py`` import the read helpers below; every Redis key and snapshot field
the toolkit uses is named in this file.
"""

import argparse
import collections
import json
import logging
import math
import os
import re
import socket
import sys
import time
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import insight

logger = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_PREFIX = "scrapy"
DEFAULT_INTERVAL = 10.0
# Reporting more often than once a second costs the crawl and tells nothing more.
MIN_INTERVAL = 1.0
# A metrics write gives up after this long: a slow Redis must never hold up a crawl.
REDIS_TIMEOUT = 1.0
# A node is stale when it has not reported for this many of its own intervals.
STALE_INTERVALS = 3
# Full-resolution history covers the last hour; the second tier covers a day in 5-minute means.
HISTORY_SECONDS = 3600
TREND_BUCKET = 300
TREND_SECONDS = 86400
# History keys outlive their node by a day, so a dead node's last day can still be charted.
HISTORY_TTL = TREND_SECONDS + HISTORY_SECONDS

# The columns of one history row, stored as a compact JSON array (names are not repeated per row).
HISTORY_FIELDS = (
    "timestamp", "cpu", "memory", "process_cpu", "rss", "net_sent_rate", "net_recv_rate",
    "pages", "items", "errors", "pages_per_min", "items_per_min", "errors_per_min", "queue_requests",
    "latency_p95",
)
# In a 5-minute bucket these are averaged; the other columns keep the bucket's last value.
MEAN_FIELDS = frozenset(
    ("cpu", "memory", "process_cpu", "rss", "net_sent_rate", "net_recv_rate",
     "pages_per_min", "items_per_min", "errors_per_min", "latency_p95")
)

# Counters read from Scrapy's own stats (snapshot field -> stats key).
STAT_COUNTERS = {
    "pages": "response_received_count",
    "items": "item_scraped_count",
    "requests": "downloader/request_count",
    "errors": "log_count/ERROR",
    "warnings": "log_count/WARNING",
    "retries": "retry/count",
    "exceptions": "downloader/exception_count",
    "dropped": "item_dropped_count",
}
STATUS_STAT = "downloader/response_status_count/"
RATE_FIELDS = ("pages", "items", "errors", "requests")
# (counter, rate field, scale): network in bytes per second, crawl counters per minute.
RATES = (("bytes_sent", "net_sent_rate", 1), ("bytes_recv", "net_recv_rate", 1)) + tuple(
    (f, f"{f}_per_min", 60) for f in RATE_FIELDS)
# CPU percentages and rates over less than this many seconds are noise; a sample that soon reuses the last.
MIN_WINDOW = 0.5
WINDOW_FIELDS = frozenset(["cpu", "process_cpu"] + [rate for _, rate, _ in RATES])

# One round trip for the three scrapy-redis queue sizes, whatever container each key is.
QUEUE_SIZES_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  if kind == 'list' then out[i] = redis.call('LLEN', key)
  elseif kind == 'zset' then out[i] = redis.call('ZCARD', key)
  elseif kind == 'set' then out[i] = redis.call('SCARD', key)
  else out[i] = 0 end
end
return out
"""


# ---------------------------------------------------------------------------- shared helpers

def env(name, default=None):
    """An environment variable, with empty counting as unset."""
    value = os.environ.get(name, "")
    return value if value != "" else default


def redis_url():
    return env("REDIS_URL", DEFAULT_REDIS_URL)


def key_prefix():
    return env("MONITOR_KEY_PREFIX", DEFAULT_PREFIX)


def status_key(prefix):
    return f"{prefix}:node:status"


def history_key(prefix, node):
    """Full-resolution history of one node: a LIST of rows, newest first, the last hour."""
    return f"{prefix}:node:history:{node}"


def trend_key(prefix, node):
    """The 24-hour tier of one node's history: 5-minute rows, newest first."""
    return f"{prefix}:node:trend:{node}"


def alert_key(prefix, name):
    """The alerter's keys: ``state``, ``stall``, ``outbox``, ``lock``, ``dead``, ``silences``, ``heartbeat``."""
    return f"{prefix}:alert:{name}"


def control_key(prefix, name):
    """Fleet control's keys: ``commands`` (pending, by target) and ``log`` (the capped control log)."""
    return f"{prefix}:control:{name}"


def runs_key(prefix, spider):
    """A spider's run records, newest first."""
    return f"{prefix}:runs:{spider}"


def connect(url=None, timeout=REDIS_TIMEOUT):
    """A Redis client that fails fast: short socket timeouts and no retries with backoff.

    Clients connect lazily; the URL is checked here, so a malformed one or an option redis-py does not
    know raises ValueError (naming no password) at start rather than an error on every later call."""
    try:
        client = redis.Redis.from_url(
            url or redis_url(),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            driver_info=None,  # no CLIENT SETINFO round trips on connect
        )
        pool = client.connection_pool
        pool.connection_class(**pool.connection_kwargs)  # builds, does not connect
    except (ValueError, TypeError) as exc:
        reason = str(exc)
        unknown = re.search(r"unexpected keyword argument '([^']*)'", reason)
        reason = f"unknown option {unknown.group(1)!r}" if unknown else scrub(reason, url)
        raise ValueError(f"{redact(url or redis_url())} is not a usable Redis URL ({reason})") from None
    return client


# Query options whose value is a secret (redis-py reads ?password=; webhooks put tokens in queries).
SECRET_OPTIONS = frozenset(("password", "pass", "pw", "token", "secret", "key", "apikey", "api_key",
                            "access_token", "auth", "sig", "signature"))


def redact(url):
    """The URL with any password (``user:pw@``, ``:pw@``, ``?password=``) masked, fit for a log line."""
    try:
        parts = urlsplit(str(url))
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            if ":" in userinfo:
                userinfo = f"{userinfo.split(':', 1)[0]}:***"
            netloc = f"{userinfo}@{hostport}"
        query = parts.query
        if query:
            query = urlencode([(k, "***" if k.lower() in SECRET_OPTIONS else v)
                               for k, v in parse_qsl(query, keep_blank_values=True)], safe="*")
        url = str(url)
        head, sep, rest = url.partition(parts.netloc) if parts.netloc else ("", "", url)
        if query:
            rest = rest.replace(parts.query, query, 1)
        return head + (netloc if sep else "") + rest
    except ValueError:
        return "<unparsable URL>"


def safe_url(url):
    """Scheme and host only: a webhook's path and query are often its secret (Slack, Teams, Discord)."""
    try:
        parts = urlsplit(str(url))
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}/..."
    except ValueError:
        return "<unparsable URL>"


def scrub(text, *urls):
    """``text`` (an error message, say) with each of ``urls`` and any password in a URL it quotes masked."""
    text = str(text)
    for url in urls:
        if url:
            text = text.replace(str(url), safe_url(url))
    return re.sub(r"(\w[\w+.-]*://)([^/\s:@]*):[^@\s/]*@", r"\1\2:***@", text)


# ---------------------------------------------------------------------------- settings and outages

class ConfigError(ValueError):
    """A setting a script cannot run with: its ``main`` prints it on one line and exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes raise ConfigError, so every script reports all bad input the same way."""

    def error(self, message):
        raise ConfigError(message)


def exit_config_error(prog, exc):
    """Print a ConfigError as ``prog: error: ...`` on one line; the exit status for it, 2."""
    print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


# A setting in seconds beyond a year is a typo (1e308 would overflow every sum and sleep).
MAX_SECONDS = 365 * 86400


def seconds(name, raw, minimum=0.0, maximum=MAX_SECONDS, above=False):
    """``raw`` as a finite number of seconds from ``minimum`` (exclusive with ``above``) to ``maximum``;
    ConfigError naming the setting otherwise."""
    try:
        value = float(str(raw).strip())
    except ValueError:
        value = math.nan
    low_ok = value > minimum if above else value >= minimum
    if not (math.isfinite(value) and low_ok and value <= maximum):
        bound = f"more than {minimum:g}" if above else f"{minimum:g} or more"
        raise ConfigError(f"{name} must be a number of seconds, {bound} and at most {maximum:.0f}, not {raw!r}")
    return value


class Outage:
    """Logs a lost service once per outage, and once when it answers again, never once per attempt."""

    def __init__(self, log, level=logging.WARNING):
        self.log = log
        self.level = level
        self.down = False

    def failed(self, message, *args):
        """The service failed: log ``message`` if this starts an outage. Returns True if it did."""
        started = not self.down
        if started:
            self.log.log(self.level, message, *args)
        self.down = True
        return started

    def ok(self, message, *args):
        """The service answered: log ``message`` if an outage ends here."""
        if self.down:
            self.log.info(message, *args)
        self.down = False


# ---------------------------------------------------------------------------- read side

# Stored numbers must stay below this in size, so sums over any number of nodes stay finite and exact
# enough, and JavaScript, Prometheus and Redis read them.
NUMBER_LIMIT = 10 ** 18
# A report interval beyond a day is not a monitor's interval.
MAX_INTERVAL = 86400
# Snapshot fields that must be text when present: they become labels, keys and page text.
TEXT_FIELDS = ("node", "host", "spider", "status", "finish_reason")
# How often readers delete nodes silent for longer than the retention: housekeeping, once a minute.
PRUNE_EVERY = 60.0


def node_state(snapshot, now=None):
    """``closed``, ``stale`` (silent for more than three intervals), ``paused`` or ``live``; derived, never
    stored. ``now`` is on Redis's clock, as is the report time (see ``last_report``)."""
    if snapshot.get("status") == "closed":
        return "closed"
    now = time.time() if now is None else now
    interval = number(snapshot.get("interval"), DEFAULT_INTERVAL) or DEFAULT_INTERVAL
    if now - last_report(snapshot) > STALE_INTERVALS * interval:
        return "stale"
    return "paused" if snapshot.get("status") == "paused" else "live"


def last_report(snapshot):
    """When the node last reported, on Redis's clock: ``seen``, which Redis stamps on every write (so a node
    whose own clock is wrong is judged fairly), else the node's own ``timestamp``."""
    seen = number(snapshot.get("seen"))
    return seen if seen is not None else number(snapshot.get("timestamp"), 0)


def age(snapshot, now):
    """Whole seconds since the node last reported, at ``now`` on Redis's clock."""
    return max(int(now - last_report(snapshot)), 0)


def decode_snapshot(raw):
    """A stored snapshot as a dict, or None unless it passes the one gate every reader goes through:
    a strict JSON object with a string ``spider`` and a numeric ``timestamp``; ``node``, ``host``,
    ``spider``, ``status``, ``finish_reason`` text (or absent) that encodes as UTF-8; every number below
    1e18 in size (no NaN or infinity); ``interval`` within (0, 86400]."""
    try:
        value = json.loads(raw, parse_constant=_not_json, parse_float=_bounded_float, parse_int=_bounded_int)
    except (ValueError, TypeError, RecursionError):
        return None
    if not (isinstance(value, dict) and isinstance(value.get("spider"), str) and is_number(value.get("timestamp"))):
        return None
    for field in TEXT_FIELDS:
        text = value.get(field)
        if text is not None and not (isinstance(text, str) and _utf8(text)):
            return None
    interval = value.get("interval")
    if interval is not None and not (is_number(interval) and 0 < interval <= MAX_INTERVAL):
        return None
    if "seen" in value and not is_number(value["seen"]):
        return None
    return insight.clean(value)  # crawl insight fields of the wrong shape are dropped, the node kept


def parse_snapshot(raw, now=None):
    """``decode_snapshot`` plus the node's derived ``state``."""
    snapshot = decode_snapshot(raw)
    if snapshot is not None:
        snapshot.pop("age", None)  # readers derive it
        snapshot["state"] = node_state(snapshot, now)
    return snapshot


def parse_nodes(raw_hash, now=None):
    """Decode an HGETALL of the status hash: ``({node: snapshot with state}, malformed_count)``."""
    now = time.time() if now is None else now
    nodes, bad = {}, 0
    for field, raw in raw_hash.items():
        snapshot = parse_snapshot(raw, now)
        if snapshot is None:
            bad += 1
            continue
        nodes[_text(field)] = snapshot
    return nodes, bad


def list_nodes(r, prefix=None, now=None):
    """Every node's latest snapshot with its state, and how many stored values were malformed."""
    return parse_nodes(r.hgetall(status_key(prefix or key_prefix())), now)


def get_node(r, node, prefix=None, now=None):
    """One node's snapshot with its state, or None."""
    return parse_snapshot(r.hget(status_key(prefix or key_prefix()), node), now)


def redis_now(time_reply):
    """Redis's TIME reply (from redis-py, or raw from a script) as unix seconds."""
    return int(time_reply[0]) + int(time_reply[1]) / 1e6


class NodeEntry:
    """One node as a reader last saw it: the stored value, its snapshot (None when malformed) and the
    snapshot's JSON once a caller asked for it (``json`` is the caller's to fill)."""

    __slots__ = ("raw", "snapshot", "json", "full")

    def __init__(self, raw, snapshot):
        self.raw = raw
        self.snapshot = snapshot
        self.json = None  # without insight.BIG_FIELDS, as list views send it
        self.full = None  # with every field (?fields=all)


class NodeReader:
    """Every node's snapshot in one round trip, with Redis's clock; used by the API and the alerter.

    A value unchanged since the last read is not decoded again (1,000 nodes reporting every 10 s leave
    about 100 new values a second); its snapshot is shared between reads, so never modify one. Nodes
    silent for longer than ``retention`` seconds (0: never) are deleted with their history, at most once
    every PRUNE_EVERY seconds.
    """

    def __init__(self, client, prefix, retention=0):
        self.redis = client
        self.prefix = prefix
        self.key = status_key(prefix)
        self.retention = retention
        self.entries = {}  # node -> NodeEntry
        self.last_prune = -PRUNE_EVERY

    def read(self, now=None):
        """``(nodes, skipped, now)``: ``{node: snapshot with state}``, how many stored values failed the gate,
        and Redis's clock at the read (states are judged on it), or ``now`` when given (tests, replays)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.key)
            pipe.time()
            raw_hash, server_now = pipe.execute()
        now = redis_now(server_now) if now is None else now
        entries, nodes, skipped = {}, {}, 0
        for field, raw in raw_hash.items():
            node = _text(field)
            entry = self.entries.get(node)
            if entry is None or entry.raw != raw:
                entry = NodeEntry(raw, parse_snapshot(raw, now))
            elif entry.snapshot is not None and entry.snapshot["state"] != node_state(entry.snapshot, now):
                entry = NodeEntry(raw, dict(entry.snapshot, state=node_state(entry.snapshot, now)))
            entries[node] = entry
            if entry.snapshot is None:
                skipped += 1
            else:
                nodes[node] = entry.snapshot
        self.entries = entries
        self._prune(nodes, now)
        return nodes, skipped, now

    def node(self, name):
        """``(snapshot with state or None, malformed, now)`` for one node id, in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.key, name)
            pipe.time()
            raw, now = pipe.execute()
        now = redis_now(now)
        if raw is None:
            return None, False, now
        snapshot = parse_snapshot(raw, now)
        return snapshot, snapshot is None, now

    def _prune(self, nodes, now):
        if not self.retention or time.monotonic() - self.last_prune < PRUNE_EVERY:
            return
        self.last_prune = time.monotonic()
        try:
            gone = prune_nodes(self.redis, nodes, self.retention, self.prefix, now)
        except redis.RedisError as exc:  # a read-only replica, say: reading still works
            logger.warning("Cannot prune silent nodes: %s", exc)
            return
        for node in gone:
            del nodes[node]
            self.entries.pop(node, None)
        if gone:
            logger.info("Pruned %d node(s) silent for more than %gs", len(gone), self.retention)


def wrong_type(client, expected):
    """``"<key> is a <type>, not a <type>"`` for the first of ``expected`` (``(key, type)`` pairs) that
    exists with another Redis type: what to say when Redis answers WRONGTYPE. None if they all fit."""
    with client.pipeline(transaction=False) as pipe:
        for key, _ in expected:
            pipe.type(key)
        found = pipe.execute()
    for (key, want), got in zip(expected, found):
        got = _text(got)
        if got not in ("none", want):
            return f"{key} is a {got}, not a {want}"
    return None


def prune_nodes(r, nodes, retention, prefix=None, now=None):
    """Delete nodes silent for longer than ``retention`` seconds, with their history. Returns their ids."""
    prefix = prefix or key_prefix()
    now = time.time() if now is None else now
    gone = [n for n, s in nodes.items() if now - last_report(s) > retention]
    if gone:
        with r.pipeline(transaction=False) as pipe:
            pipe.hdel(status_key(prefix), *gone)
            for node in gone:
                pipe.delete(history_key(prefix, node), trend_key(prefix, node))
            pipe.execute()
    return gone


# ---------------------------------------------------------------------------- a spider over its nodes

# How a spider's figure combines its nodes' figures, one row per field, used alike by the cluster view,
# the spider's history, Prometheus and the alerter:
#   sum        added up over the nodes
#   host_sum   added up over hosts, each host once (by its newest report): machine figures
#   host_mean  the mean over hosts, each host once
#   newest     the newest node's reading: the scrapy-redis queue is shared, every node sees the same one
#   max        the highest: a spider's download latency p95 is at most its slowest node's (the merged
#              distribution's quantile never exceeds the largest of its parts'), and that node is the news
# Rates and machine gauges count nodes still crawling (``live`` and ``paused`` in a view; in a history
# bucket, the rows it holds); when none is, gauges fall back to every node so a finished spider still shows
# its last figures.
SPIDER_FIELDS = {
    "cpu": "host_mean", "memory": "host_mean",
    "bytes_sent": "host_sum", "bytes_recv": "host_sum", "net_sent_rate": "host_sum", "net_recv_rate": "host_sum",
    "rss": "sum", "process_cpu": "sum",
    "pages": "sum", "items": "sum", "requests": "sum", "errors": "sum",
    "pages_per_min": "sum", "items_per_min": "sum", "requests_per_min": "sum", "errors_per_min": "sum",
    "queue_requests": "newest", "queue_start_urls": "newest", "queue_dupefilter": "newest",
    "latency_p95": "max",
}
# Fields that only count crawling nodes (a closed node's last rate is not a rate any more).
CRAWLING_FIELDS = frozenset(("cpu", "memory", "net_sent_rate", "net_recv_rate", "rss", "process_cpu",
                             "pages_per_min", "items_per_min", "requests_per_min", "errors_per_min",
                             "latency_p95"))
CRAWLING_STATES = ("live", "paused")
STATES = ("live", "paused", "stale", "closed")


def combine(rows, fields, hosts=None):
    """``{field: figure}`` over ``rows`` (snapshots or history rows, each with a ``timestamp``), by
    SPIDER_FIELDS. ``hosts`` maps each row's position to its host (default: the row's ``host``). A field no
    row has a number for is None. Integer sums stay integers; other figures are rounded to 2 places."""
    hosts = hosts or [r.get("host", r.get("node")) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: number(rows[i].get("timestamp"), 0))
    per_host = list({hosts[i]: i for i in order}.values())  # newest row of each host
    out = {}
    for field in fields:
        rule = SPIDER_FIELDS[field]
        among = per_host if rule.startswith("host") else order
        values = [rows[i][field] for i in among if is_number(rows[i].get(field))]
        if not values:
            out[field] = None
        elif rule == "newest":
            out[field] = values[-1]
        elif rule == "max":
            out[field] = max(values)
        else:
            total = finite_sum(values)
            if rule == "host_mean":
                out[field] = round(total / len(values), 2)
            else:
                out[field] = total if all(isinstance(v, int) for v in values) else round(total, 2)
    return out


def finite_sum(values):
    """An exact sum of finite numbers (ints stay ints); never inf or nan, whatever the inputs' count."""
    if all(isinstance(v, int) for v in values):
        return sum(values)
    total = math.fsum(values)
    return total if math.isfinite(total) else 0.0


def cluster_view(nodes, spider):
    """One spider over its nodes: newest timestamp, figures by SPIDER_FIELDS, node counts by state, and its
    nodes. ``nodes`` is a ``{node: snapshot}`` mapping as ``list_nodes`` returns; None when it has none."""
    mine = {n: s for n, s in nodes.items() if s.get("spider") == spider}
    if not mine:
        return None
    snaps = list(mine.values())
    crawling = [s for s in snaps if s.get("state") in CRAWLING_STATES]
    states = collections.Counter(s.get("state") for s in snaps)
    rest = [f for f in SPIDER_FIELDS if f not in CRAWLING_FIELDS]
    view = {"spider": spider, "timestamp": max(int(number(s.get("timestamp"), 0)) for s in snaps)}
    view.update(combine(snaps, rest))
    gauges = combine(crawling or snaps, [f for f in CRAWLING_FIELDS if not f.endswith("_per_min")])
    rates = combine(crawling, [f for f in CRAWLING_FIELDS if f.endswith("_per_min")])
    view.update(gauges)
    view.update({f: v or 0 for f, v in rates.items()})  # no node crawling: nothing per minute
    view.update({f"nodes_{state}": states[state] for state in STATES})
    view["nodes"] = mine
    return view


def spiders_view(nodes):
    """``{spider: cluster view}`` for every spider that has nodes, each view's ``nodes`` a sorted id list."""
    out = {}
    for spider in sorted({s["spider"] for s in nodes.values()}):
        view = cluster_view(nodes, spider)
        view["nodes"] = sorted(view["nodes"])
        out[spider] = view
    return out


# ---------------------------------------------------------------------------- queue forecast

# The forecast fits the queue size over this much of the recent history: long enough to smooth a crawler's
# bursts, short enough to follow a change of pace.
QUEUE_WINDOW = 300


def queue_forecast(rows):
    """``{"queue_rate": requests per minute (negative while draining), "queue_eta": seconds until empty
    at that rate, None unless it shrinks}`` from history rows (oldest first), by a least-squares line
    through the ``queue_requests`` readings since the queue was last empty (a refill is a new batch).
    Both None with fewer than two readings."""
    points = [(row["timestamp"], row["queue_requests"]) for row in rows
              if is_number(row.get("timestamp")) and is_number(row.get("queue_requests"))]
    for i in range(len(points) - 2, -1, -1):
        if points[i][1] == 0:
            points = points[i + 1:]
            break
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return {"queue_rate": None, "queue_eta": None}
    mean_t = sum(t for t, _ in points) / len(points)
    mean_q = sum(q for _, q in points) / len(points)
    slope = (sum((t - mean_t) * (q - mean_q) for t, q in points)
             / (sum((t - mean_t) ** 2 for t, _ in points) or 1))
    eta = points[-1][1] / -slope if slope < 0 else None
    return {"queue_rate": round(slope * 60, 1), "queue_eta": None if eta is None else round(eta)}


def queue_forecasts(r, nodes, prefix=None, now=None):
    """``{spider: queue_forecast}`` for every spider of ``nodes``, in one round trip: each from the history
    of its crawling node that started first (the queue is shared, so one node's readings are the spider's;
    the longest-running one has the most of them). A spider with no crawling node gets None figures."""
    chosen = {}
    for node, s in nodes.items():
        if s.get("state") in CRAWLING_STATES:
            best = chosen.get(s["spider"])
            if best is None or number(s.get("start_time"), 0) < number(nodes[best].get("start_time"), 0):
                chosen[s["spider"]] = node
    rows = max((math.ceil(QUEUE_WINDOW / number(nodes[n].get("interval"), DEFAULT_INTERVAL)) + 2
                for n in chosen.values()), default=0)
    series = read_histories(r, list(chosen.values()), QUEUE_WINDOW / 60, prefix, now, rows) if chosen else {}
    empty = {"queue_rate": None, "queue_eta": None}
    return {spider: queue_forecast(series[chosen[spider]]) if spider in chosen else dict(empty)
            for spider in {s["spider"] for s in nodes.values()}}


def read_history(r, node, minutes=60, prefix=None, now=None):
    """One node's time series: ``read_histories`` for a single node."""
    return read_histories(r, [node], minutes, prefix, now)[node]


# A row this far past ``now`` is from a bad clock or a forgery: dropped, so it cannot widen a chart.
FUTURE_SLACK = 60


def read_histories(r, nodes, minutes=60, prefix=None, now=None, limit=None):
    """``{node: rows}`` for the last ``minutes``, oldest first, each row a dict of HISTORY_FIELDS, in one
    round trip. Up to an hour comes from the full-resolution lists, longer spans (up to a day) from the
    5-minute tier. Values that are not numbers (or too large) read as None; rows without a timestamp in the
    window (``now`` plus FUTURE_SLACK at most) are dropped, and rows are sorted by time. ``limit``: read only
    each list's newest rows."""
    prefix = prefix or key_prefix()
    now = time.time() if now is None else now
    since, until = now - minutes * 60, now + FUTURE_SLACK
    key = history_key if minutes * 60 <= HISTORY_SECONDS else trend_key
    with r.pipeline(transaction=False) as pipe:
        for node in nodes:
            pipe.lrange(key(prefix, node), 0, -1 if limit is None else limit - 1)
        lists = pipe.execute()
    out = {}
    for node, raws in zip(nodes, lists):
        rows = []
        for raw in reversed(raws):
            try:
                values = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if isinstance(values, list) and 0 < len(values) <= len(HISTORY_FIELDS):
                values = values + [None] * (len(HISTORY_FIELDS) - len(values))  # a row from before a new column
                row = {f: v if is_number(v) and abs(v) < NUMBER_LIMIT else None for f, v in zip(HISTORY_FIELDS, values)}
                if row["timestamp"] is not None and since <= row["timestamp"] <= until:
                    rows.append(row)
        rows.sort(key=lambda row: row["timestamp"])
        out[node] = rows
    return out


def is_number(value):
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number(value, default=None):
    """``value`` if it is a number (``is_number``), else ``default``."""
    return value if is_number(value) else default


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a \ud800 escape
        return False
    return True


def _not_json(name):
    raise ValueError(f"{name} is not JSON")


def _bounded_float(text):
    value = float(text)
    if not abs(value) < NUMBER_LIMIT:  # also false for nan and inf
        raise ValueError(f"{text} is out of range")
    return value


def _bounded_int(text):
    value = int(text)
    if not -NUMBER_LIMIT < value < NUMBER_LIMIT:
        raise ValueError(f"{text} is out of range")
    return value


# ---------------------------------------------------------------------------- write side

_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def history_row(snapshot, at=None):
    """The snapshot's history columns as a list, numbers rounded to keep the row small; ``at`` (Redis's
    clock) replaces the node's own timestamp."""
    row = [_compact(snapshot.get(f)) for f in HISTORY_FIELDS]
    if at is not None:
        row[0] = int(at)
    return row


def merge_rows(rows):
    """One 5-minute trend row from full-resolution rows: the bucket's start, mean of gauges, last counters."""
    merged = [int(rows[0][0]) // TREND_BUCKET * TREND_BUCKET]
    for i, field in enumerate(HISTORY_FIELDS[1:], 1):
        values = [row[i] for row in rows if row[i] is not None]
        if field in MEAN_FIELDS and values:
            merged.append(_compact(sum(values) / len(values)))
        else:
            merged.append(rows[-1][i])
    return merged


# Publishes a snapshot stamped with Redis's clock: the stored object gains ``seen``, the server's time of
# the write, which every reader judges liveness by; the reply is that time (TIME's two parts).
STAMP_LUA = """
local t = redis.call('TIME')
local seen = string.format('%d.%03d', t[1], math.floor(t[2] / 1000))
redis.call('HSET', KEYS[1], ARGV[1], string.sub(ARGV[2], 1, -2) .. ',"seen":' .. seen .. '}')
return t
"""


def write_snapshot(pipe, prefix, snapshot, history_len, trend_rows=(), stamp=False, row=None):
    """Queue the commands that publish one snapshot: status hash, capped history, trend, expiries.

    With ``stamp`` (the extension always stamps) Redis adds ``seen`` and the first reply is its clock;
    without it the snapshot is stored as given (tests on a made-up clock). ``row`` is the history row
    (default: from the snapshot)."""
    node = snapshot["node"]
    if stamp:
        pipe.eval(STAMP_LUA, 1, status_key(prefix), node, _compact_json(snapshot))
    else:
        pipe.hset(status_key(prefix), node, _compact_json(snapshot))
    hkey = history_key(prefix, node)
    pipe.lpush(hkey, _compact_json(row or history_row(snapshot)))
    pipe.ltrim(hkey, 0, history_len - 1)
    pipe.expire(hkey, HISTORY_TTL)
    if trend_rows:
        tkey = trend_key(prefix, node)
        pipe.lpush(tkey, *(_compact_json(row) for row in trend_rows))
        pipe.ltrim(tkey, 0, TREND_SECONDS // TREND_BUCKET - 1)
        pipe.expire(tkey, HISTORY_TTL)


class TrendBuffer:
    """Collects full-resolution rows and hands back one merged row per 5-minute bucket."""

    def __init__(self):
        self.rows = []

    def add(self, row):
        """Add a row; returns the previous bucket's merged row when this one starts a new bucket."""
        done = None
        if self.rows and int(self.rows[0][0]) // TREND_BUCKET != int(row[0]) // TREND_BUCKET:
            done = self.flush()
        self.rows.append(row)
        return done

    def flush(self):
        rows, self.rows = self.rows, []
        return merge_rows(rows) if rows else None


def _compact(value):
    if isinstance(value, float):
        return round(value, 1) if abs(value) >= 100 or value == int(value) else round(value, 2)
    return value


class Sampler:
    """Host, process and crawl metrics for one node; each call to ``sample`` covers the time since the last."""

    def __init__(self, process=None):
        import psutil  # here, not at the top: the API and the alerter import this module and never sample

        self.psutil = psutil
        self.process = process or psutil.Process()
        # psutil's first cpu_percent() is 0.0: prime both so the first real sample means something.
        psutil.cpu_percent(None)
        self.process.cpu_percent(None)
        self.prev = None

    def sample(self, stats, now):
        """A dict of metrics from a copy of Scrapy's stats, with rates over the time since the last call."""
        psutil = self.psutil
        net = psutil.net_io_counters()
        out = {"memory": psutil.virtual_memory().percent, "bytes_sent": net.bytes_sent,
               "bytes_recv": net.bytes_recv, "rss": self.process.memory_info().rss}
        for field, key in STAT_COUNTERS.items():
            out[field] = int(stats.get(key, 0) or 0)
        classes = {f"status_{c}xx": 0 for c in range(1, 6)}
        for key, count in stats.items():
            if isinstance(key, str) and key.startswith(STATUS_STAT):
                name = f"status_{key[len(STATUS_STAT):][:1]}xx"
                if name in classes:
                    classes[name] += int(count)
        out.update(classes)
        if self.prev and now - self.prev[0] < MIN_WINDOW:
            # Too soon after the last sample (a close right after a tick): keep its CPU figures and rates.
            out.update({k: v for k, v in self.prev[1].items() if k in WINDOW_FIELDS})
            return out
        out["cpu"] = psutil.cpu_percent(None)
        out["process_cpu"] = round(self.process.cpu_percent(None), 1)
        prev, self.prev = self.prev, (now, out)
        elapsed = now - prev[0] if prev else 0
        for field, rate_name, scale in RATES:
            rate = (out[field] - prev[1][field]) * scale / elapsed if elapsed > 0 else 0.0
            out[rate_name] = round(max(rate, 0.0), 1)
        return out


class SpiderMonitor:
    """Scrapy extension: every MONITOR_INTERVAL seconds, publish this process's metrics to Redis."""

    def __init__(self, crawler, interval, url, queue_url, node_id, prefix, insight_=None):
        self.crawler = crawler
        self.insight = insight_ or insight.Insight()
        self.stats = crawler.stats
        self.interval = interval
        self.url = url
        self.queue_url = queue_url
        self.redis = connect(url)  # clients connect lazily; a malformed URL raises ValueError here
        self.queue_redis = self.redis if queue_url == url else connect(queue_url)
        self.node_id = node_id
        self.prefix = prefix
        self.history_len = max(1, int(HISTORY_SECONDS // interval))
        self.task = None
        self.lock = None  # held while a tick's thread works: ticks never overlap
        self.outage = Outage(logger)
        self.clock_offset = None  # Redis's clock minus ours, learnt from each write's reply
        self.trend = TrendBuffer()
        self.queue_keys = None
        self.base = {}
        self.sampler = Sampler()  # primed now, so the first tick's CPU figures cover start-up

    @classmethod
    def from_crawler(cls, crawler):
        # Scrapy and Twisted are imported here and below, not at the top: the API and the alerter
        # import this module for its read side and should not pay for them.
        from scrapy import signals
        from scrapy.exceptions import NotConfigured

        settings = crawler.settings

        def setting(name, default=None):
            value = settings.get(name)
            return env(name, default) if value is None or value == "" else value

        if str(setting("MONITOR_ENABLED", "1")).strip().lower() in ("0", "false", "no", "off"):
            raise NotConfigured("MONITOR_ENABLED is off")
        raw = setting("MONITOR_INTERVAL", DEFAULT_INTERVAL)
        try:
            interval = seconds("MONITOR_INTERVAL", raw, MIN_INTERVAL, MAX_INTERVAL)
        except ConfigError:
            raise NotConfigured(f"MONITOR_INTERVAL must be a positive number of seconds from {MIN_INTERVAL:g} "
                                f"to {MAX_INTERVAL}, not {raw!r}; the monitor is off") from None
        queue_url = setting("REDIS_URL", DEFAULT_REDIS_URL)
        url = setting("MONITOR_REDIS_URL", queue_url)
        node_id = setting("MONITOR_NODE_ID")
        prefix = setting("MONITOR_KEY_PREFIX", DEFAULT_PREFIX)
        try:
            top = int(str(setting("MONITOR_TOP_DOMAINS", insight.DEFAULT_TOP_DOMAINS)).strip())
            if not 0 <= top <= insight.MAX_TOP_DOMAINS:
                raise ValueError
        except ValueError:
            raise NotConfigured(f"MONITOR_TOP_DOMAINS must be a whole number from 0 to {insight.MAX_TOP_DOMAINS}, "
                                f"not {setting('MONITOR_TOP_DOMAINS')!r}; the monitor is off") from None
        fields = setting("MONITOR_ITEM_FIELDS", "")
        fields = fields if isinstance(fields, (list, tuple)) else str(fields).split(",")
        fields = [f.strip() for f in fields if f.strip()][:insight.MAX_FIELDS]
        try:
            ext = cls(crawler, interval, url, queue_url, node_id, prefix, insight.Insight(top, fields))
        except ValueError as exc:
            raise NotConfigured(f"bad Redis URL ({exc}); the monitor is off") from None
        crawler.signals.connect(ext.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(ext.spider_closed, signal=signals.spider_closed)
        crawler.signals.connect(ext.insight.response_downloaded, signal=signals.response_downloaded)
        crawler.signals.connect(ext.insight.item_scraped, signal=signals.item_scraped)
        return ext

    def spider_opened(self, spider):
        from twisted.internet import defer, task

        host = socket.gethostname()
        pid = os.getpid()
        self.node_id = self.node_id or f"{spider.name}:{host}:{pid}"
        self.queue_keys = self._queue_keys(spider)
        self.base = {"node": self.node_id, "spider": spider.name, "host": host, "pid": pid,
                     "interval": self.interval, "start_time": int(time.time())}
        logger.info("Monitor: node %s reports to %s every %ss", self.node_id, redact(self.url), self.interval)
        self.insight.handler.spider = spider
        logging.getLogger().addHandler(self.insight.handler)  # error samples, while the spider runs
        self.lock = defer.DeferredLock()
        self.task = task.LoopingCall(self.tick)
        self.task.start(self.interval, now=True)

    async def spider_closed(self, spider, reason):
        """Stop the loop and publish the final ``closed`` snapshot (Scrapy waits for it)."""
        from scrapy.utils.defer import maybe_deferred_to_future

        if self.task and self.task.running:
            self.task.stop()
        logging.getLogger().removeHandler(self.insight.handler)
        if self.queue_keys is None:  # never opened
            return
        stats = dict(self.stats.get_stats())
        extra = {"status": "closed", "finish_reason": str(reason), **self.insight.take_interval()}
        await maybe_deferred_to_future(self.lock.run(self._in_thread, stats, extra, True))

    def tick(self):
        """Runs on the reactor thread: copy the stats and hand sampling and Redis I/O to a thread."""
        if self.lock.locked:
            return  # the previous tick is still talking to Redis: ticks never overlap
        self.lock.run(self._in_thread, dict(self.stats.get_stats()),
                      {"status": "running", **self.insight.take_interval()})

    def _in_thread(self, stats, extra, final=False):
        from twisted.internet import threads

        d = threads.deferToThread(self.collect_and_publish, stats, extra, final)
        return d.addErrback(lambda f: logger.error("Monitor: tick failed: %s", f.getErrorMessage()))

    def collect_and_publish(self, stats, extra, final=False):
        """Runs in a thread: sample, read queue sizes, write to Redis. Returns the snapshot."""
        now = time.time()
        snapshot = {"timestamp": int(now), **self.base, **self.sampler.sample(stats, now), **extra,
                    **self.insight.figures()}
        snapshot.update(self._queue_sizes())
        try:
            if self.clock_offset is None:  # the first write: history rows go on Redis's clock from the start
                self.clock_offset = redis_now(self.redis.time()) - time.time()
            row = history_row(snapshot, now + self.clock_offset)
            trend_rows = [self.trend.add(row)]
            if final:
                trend_rows.append(self.trend.flush())
            with self.redis.pipeline(transaction=False) as pipe:
                write_snapshot(pipe, self.prefix, snapshot, self.history_len, [r for r in trend_rows if r],
                               stamp=True, row=row)
                sent = time.time()
                server_time = pipe.execute()[0]
        except redis.RedisError as exc:
            self.outage.failed("Monitor: cannot write metrics to Redis at %s (%s); the crawl goes on, "
                               "retrying every %ss", redact(self.url), scrub(exc), self.interval)
            return snapshot
        self.clock_offset = redis_now(server_time) - sent
        self.outage.ok("Monitor: Redis at %s is back; node %s reports again", redact(self.url), self.node_id)
        return snapshot

    def _queue_keys(self, spider):
        """The scrapy-redis keys of this spider (requests, start URLs, dupefilter), or () if it has none."""
        settings = self.crawler.settings
        scheduler = str(settings.get("SCHEDULER", ""))
        start_key = getattr(spider, "redis_key", None)
        if "scrapy_redis" not in scheduler and not start_key:
            return ()
        name = {"spider": spider.name}
        return (
            settings.get("SCHEDULER_QUEUE_KEY", "%(spider)s:requests") % name,
            start_key or "",
            settings.get("SCHEDULER_DUPEFILTER_KEY", "%(spider)s:dupefilter") % name,
        )

    def _queue_sizes(self):
        if not self.queue_keys:
            return {}
        names = ("queue_requests", "queue_start_urls", "queue_dupefilter")
        try:
            sizes = self.queue_redis.eval(QUEUE_SIZES_LUA, 3, *self.queue_keys)
        except redis.RedisError:
            return dict.fromkeys(names)
        return dict(zip(names, (int(s) for s in sizes)))
