"""Node metrics for distributed Scrapy crawlers: the Redis schema, its readers and the writing extension.

Enable the writer in any Scrapy project with ``EXTENSIONS = {"monitors.SpiderMonitor": 500}``.
``monitor_api.py`` and ``alert.py`` import the read helpers below; every Redis key and snapshot field
the toolkit uses is named in this file.
"""

import argparse
import collections
import hashlib
import json
import logging
import math
import os
import re
import socket
import sys
import time
import uuid
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import insight

logger = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_PREFIX = "scrapy"
DEFAULT_INTERVAL = 10.0
# Run history: a node silent this long without closing is recorded lost; runs kept per spider.
DEFAULT_LOST_AFTER = 600
DEFAULT_RUNS_KEEP = 1000
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
    """Fleet control's keys: ``commands`` (the newest, by target), ``seq`` (ids), ``log`` (the capped control
    log) and ``ack:<id>`` (see ``control_ack_key``)."""
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


# A URL quoted in a message: scheme://, then anything up to a blank, a quote or an angle bracket.
QUOTED_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s<>\"']+")


def scrub(text, *urls):
    """``text`` (an error message, a log record) with each of ``urls`` cut to scheme and host, and every
    other URL it quotes ``redact``-ed: no password, no secret query option."""
    text = str(text)
    for url in urls:
        if url:
            text = text.replace(str(url), safe_url(url))
    return QUOTED_URL.sub(lambda m: redact(m.group(0)), text)


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
        value = json.loads(raw, parse_constant=not_json, parse_float=_bounded_float, parse_int=_bounded_int)
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
        nodes[as_text(field)] = snapshot
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
    every PRUNE_EVERY seconds. Nodes not closed and silent for longer than ``lost_after`` seconds (0: never)
    get a ``lost`` run record first (see ``record_lost_runs``), so pruning never loses a run.
    """

    def __init__(self, client, prefix, retention=0, lost_after=0, runs_keep=DEFAULT_RUNS_KEEP):
        self.redis = client
        self.prefix = prefix
        self.key = status_key(prefix)
        self.retention = retention
        self.entries = {}  # node -> NodeEntry
        self.last_prune = -PRUNE_EVERY
        self.lost_after, self.runs_keep = lost_after, runs_keep
        self.lost = set()  # (node, start_time) of runs recorded lost, by this process or another
        self.last_lost = -PRUNE_EVERY

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
            node = as_text(field)
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
        self._record_lost(nodes, now)
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

    def _record_lost(self, nodes, now, due=False):
        """Housekeeping for run history: a lost run for each node silent too long (before pruning takes it),
        checked every quarter of MONITOR_LOST_AFTER, at least once every PRUNE_EVERY seconds (and when ``due``)."""
        every = min(PRUNE_EVERY, max(self.lost_after / 4, 1))
        if not self.lost_after or not due and time.monotonic() - self.last_lost < every:
            return
        self.last_lost = time.monotonic()
        after = min(self.lost_after, self.retention) if self.retention else self.lost_after
        try:
            count = record_lost_runs(self.redis, self.prefix, nodes, now, after, self.runs_keep, self.lost)
        except redis.RedisError as exc:  # a read-only replica, say: reading still works
            logger.warning("Cannot record lost runs: %s", exc)
            return
        if count:
            logger.info("Recorded %d lost run(s) of nodes silent for more than %gs", count, after)
        self.lost &= {(n, s.get("start_time")) for n, s in nodes.items()}

    def _prune(self, nodes, now):
        if not self.retention or time.monotonic() - self.last_prune < PRUNE_EVERY:
            return
        self.last_prune = time.monotonic()
        candidates = nodes
        if self.lost_after:  # a node's lost run is recorded before the node goes
            self._record_lost(nodes, now, due=True)
            candidates = {n: s for n, s in nodes.items()
                          if s.get("status") == "closed" or (n, s.get("start_time")) in self.lost}
        try:
            gone = prune_nodes(self.redis, candidates, self.retention, self.prefix, now)
        except redis.RedisError as exc:  # a read-only replica, say: reading still works
            logger.warning("Cannot prune silent nodes: %s", exc)
            return
        for node in gone:
            nodes.pop(node, None)
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
        got = as_text(got)
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
            pipe.hdel(control_key(prefix, "commands"), *(f"node:{node}" for node in gone))  # ends with its node
            for node in gone:
                pipe.delete(history_key(prefix, node), trend_key(prefix, node))
                if is_number(nodes[node].get("start_time")):  # a lost run stays correctable a while longer
                    pipe.expire(run_claim_key(prefix, node, nodes[node]["start_time"]), CLAIM_AFTER_PRUNE)
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


NUMBER_TYPES = (int, float)  # exactly: a bool is not a figure


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
        # Rows come through the gate (decode_snapshot, read_histories): their numbers are finite already.
        values = [v for v in (rows[i].get(field) for i in among) if v.__class__ in NUMBER_TYPES]
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


def spiders_view(nodes, r=None, prefix=None, now=None):
    """``{spider: cluster view}`` for every spider that has nodes, each view's ``nodes`` a sorted id list;
    given a Redis client ``r``, each view also has its queue forecast (``queue_forecasts``)."""
    groups = {}
    for node, snapshot in nodes.items():
        groups.setdefault(snapshot["spider"], {})[node] = snapshot
    out = {}
    for spider in sorted(groups):
        view = cluster_view(groups[spider], spider)
        view["nodes"] = sorted(view["nodes"])
        out[spider] = view
    if r is not None:
        for spider, forecast in queue_forecasts(r, nodes, prefix, now).items():
            out[spider].update(forecast)
    return out


# ---------------------------------------------------------------------------- queue forecast

# The forecast fits the queue size over this much of the recent history: long enough to smooth a crawler's
# bursts, short enough to follow a change of pace.
QUEUE_WINDOW = 300


def queue_forecast(rows):
    """``{"queue_rate": requests per minute (negative while draining), "queue_eta": seconds until empty
    at that rate, None unless it shrinks}`` from history rows (oldest first), by a least-squares line
    through the ``queue_requests`` readings since the queue was last empty (a refill is a new batch), from
    its peak on when it has one before the newest reading.
    Both None with fewer than two readings."""
    points = [(row["timestamp"], row["queue_requests"]) for row in rows
              if is_number(row.get("timestamp")) and is_number(row.get("queue_requests"))]
    for i in range(len(points) - 2, -1, -1):
        if points[i][1] == 0:
            points = points[i + 1:]
            break
    # A queue past its peak (filled by a burst of links, now draining) is forecast from the peak on.
    peak = max(range(len(points)), key=lambda i: points[i][1], default=0)
    if len(points) - peak >= 2:
        points = points[peak:]
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


def as_text(value):
    """A Redis reply (bytes) or any value as text; undecodable bytes are replaced, never an error."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a \ud800 escape
        return False
    return True


def not_json(name):
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


# ---------------------------------------------------------------------------- alerts and silences (read side)
# alert.py writes the alert records, the heartbeat and reads the silences; the API reads all three and writes
# silences. Both go through these functions, so neither needs the other's code.

# Silences match alerts on these labels; all given must match.
SILENCE_MATCHERS = ("node", "spider", "host", "rule")
# A silence longer than this is a typo: at most 30 days.
MAX_SILENCE = 30 * 86400
# Matcher values and comments longer than this are not names.
MAX_SILENCE_TEXT = 500
# At most this many silences at once: each evaluation checks every alert against each.
MAX_SILENCES = 1000
# Units of a duration such as ``2h`` or ``90m``.
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(name, raw, maximum=MAX_SILENCE):
    """``raw`` (``3600``, ``90m``, ``2h``, ``1d``) as seconds, more than 0 and at most ``maximum``;
    ConfigError naming the setting otherwise."""
    text = str(raw).strip().lower()
    scale = DURATION_UNITS.get(text[-1:], 1)
    try:
        value = float(text[:-1] if text[-1:] in DURATION_UNITS else text) * scale
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= maximum):
        raise ConfigError(f"{name} must be a duration such as 3600, 90m, 2h or 1d, more than 0 and at most "
                          f"{maximum / 86400:g} days, not {str(raw)[:50]!r}")
    return value


def silence_from(body, now, who):
    """A silence checked from ``{"matchers": {...}, "duration" | "until", "comment"}``: a dict to store, or
    ValueError saying what is wrong. ``until`` is unix seconds; ``duration`` seconds or ``2h``-style."""
    if not isinstance(body, dict):
        raise ValueError('send a JSON object: {"matchers": {"spider": "..."}, "duration": 3600, "comment": "..."}')
    matchers = body.get("matchers")
    if not isinstance(matchers, dict) or not matchers:
        raise ValueError(f"matchers must be a non-empty object with any of {', '.join(SILENCE_MATCHERS)}")
    for key, value in matchers.items():
        if key not in SILENCE_MATCHERS:
            raise ValueError(f"unknown matcher {str(key)[:50]!r}: matchers are {', '.join(SILENCE_MATCHERS)}")
        if not (isinstance(value, str) and value and len(value) <= MAX_SILENCE_TEXT and _utf8(value)):
            raise ValueError(f"matcher {key} must be a non-empty string of at most {MAX_SILENCE_TEXT} characters")
    if ("duration" in body) == ("until" in body):
        raise ValueError("give either duration (seconds, or like 2h) or until (unix seconds)")
    if "until" in body:
        until = body["until"]
        if not (is_number(until) and now < until <= now + MAX_SILENCE):
            raise ValueError(f"until must be unix seconds in the next {MAX_SILENCE // 86400} days")
    else:
        raw = body["duration"]
        if not (is_number(raw) or isinstance(raw, str)):
            raise ValueError("duration must be seconds or a text like 2h")
        try:
            until = now + duration("duration", raw)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    comment = body.get("comment", "")
    if not (isinstance(comment, str) and len(comment) <= MAX_SILENCE_TEXT and _utf8(comment)):
        raise ValueError(f"comment must be a string of at most {MAX_SILENCE_TEXT} characters")
    return {"matchers": dict(matchers), "until": round(until, 3), "comment": comment, "who": who,
            "created": round(now, 3)}


def add_silence(r, prefix, silence):
    """Store a checked silence (``silence_from``); returns its id. ValueError when MAX_SILENCES are active."""
    if r.hlen(alert_key(prefix, "silences")) >= MAX_SILENCES:
        read_silences(r, prefix, silence["created"])  # drops the expired ones
        if r.hlen(alert_key(prefix, "silences")) >= MAX_SILENCES:
            raise ValueError(f"{MAX_SILENCES} silences are active: delete some first")
    sid = uuid.uuid4().hex[:16]
    r.hset(alert_key(prefix, "silences"), sid, _compact_json(silence))
    return sid


def delete_silence(r, prefix, sid):
    """Delete one silence; whether it existed."""
    return bool(r.hdel(alert_key(prefix, "silences"), sid))


def parse_silences(raw, now):
    """``({id: silence}, expired ids)`` from an HGETALL of the silences hash; malformed entries are skipped."""
    active, expired = {}, []
    for field, value in (raw or {}).items():
        try:
            silence = json.loads(value)
            until = silence["until"]
            ok = (is_number(until) and isinstance(silence.get("matchers"), dict) and silence["matchers"]
                  and set(silence["matchers"]) <= set(SILENCE_MATCHERS))
        except (ValueError, TypeError, KeyError, RecursionError):
            ok = False
        if not ok:
            continue
        if until <= now:
            expired.append(as_text(field))
        else:
            active[as_text(field)] = silence
    return active, expired


def read_silences(r, prefix, now=None, tidy=True):
    """The active silences ``{id: silence}``, oldest first; with ``tidy`` expired ones are deleted on the way
    (lazily; a dry run reads without writing)."""
    with r.pipeline(transaction=False) as pipe:
        pipe.hgetall(alert_key(prefix, "silences"))
        pipe.time()
        raw, server_now = pipe.execute()
    active, expired = parse_silences(raw, redis_now(server_now) if now is None else now)
    if tidy:
        _forget(r, alert_key(prefix, "silences"), expired)
    return dict(sorted(active.items(), key=lambda item: (number(item[1].get("created"), 0), item[0])))


def _forget(r, key, fields):
    if fields:
        try:
            r.hdel(key, *fields)
        except redis.RedisError as exc:  # a read-only replica: the expired ones are ignored anyway
            logger.warning("Cannot delete expired silences: %s", exc)


class SilenceIndex:
    """Active silences ``{id: silence}`` indexed by their first matcher (node, spider, host, rule), so finding
    one that matches an alert costs four lookups, however many silences there are."""

    def __init__(self, silences):
        self.by = {}
        for sid, silence in silences.items():
            matchers = silence["matchers"]
            first = next(key for key in SILENCE_MATCHERS if key in matchers)
            self.by.setdefault((first, matchers[first]), []).append((sid, matchers))

    def __bool__(self):
        return bool(self.by)

    def match(self, labels):
        """The id of a silence whose matchers all equal ``labels`` (node, spider, host, rule), or None."""
        for key in SILENCE_MATCHERS:
            for sid, matchers in self.by.get((key, labels.get(key)), ()):
                if all(labels.get(name) == value for name, value in matchers.items()):
                    return sid
        return None


# The alerter's heartbeat lives this many of its intervals (at least HEARTBEAT_MIN seconds): past it,
# readers say no alerter is running.
HEARTBEAT_INTERVALS = 3
HEARTBEAT_MIN = 30


def write_heartbeat(r, prefix, now, interval, who):
    """What an alerter writes each evaluation: ``{at, interval, who}`` (``at`` on Redis's clock), expiring
    after HEARTBEAT_INTERVALS intervals, so a reader can tell that no alerter is running."""
    r.set(alert_key(prefix, "heartbeat"), _compact_json({"at": round(now, 3), "interval": interval, "who": who}),
          ex=int(max(HEARTBEAT_INTERVALS * interval, HEARTBEAT_MIN)))


def read_alerts(r, prefix):
    """``{"alerts": [...], "alerter": heartbeat or None, "silences": n}``: every pending and firing alert from
    the alerter's state, newest first, each with ``rule, alertname, severity, node, spider, host, state,
    value, threshold, since, last_sent, silenced`` (the id of a silence matching it now, or null)."""
    with r.pipeline(transaction=False) as pipe:
        pipe.hgetall(alert_key(prefix, "state"))
        pipe.hgetall(alert_key(prefix, "silences"))
        pipe.get(alert_key(prefix, "heartbeat"))
        pipe.time()
        raw_state, raw_silences, beat, server_now = pipe.execute()
    now = redis_now(server_now)
    silences, expired = parse_silences(raw_silences, now)
    _forget(r, alert_key(prefix, "silences"), expired)
    index = SilenceIndex(silences)
    alerts = []
    for field, raw in raw_state.items():
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):
            continue
        rule, _, node = as_text(field).partition(":")
        if not (isinstance(record, dict) and record.get("state") in ("pending", "firing")
                and is_number(record.get("since"))):
            continue
        labels = {"rule": rule, "node": node, "spider": _label(record.get("spider")),
                  "host": _label(record.get("host"))}
        sent = record.get("sent") if record.get("state") == "firing" and record.get("notified", True) else None
        alerts.append({**labels, "alertname": _label(record.get("alertname")),
                       "severity": _label(record.get("severity")), "state": record["state"],
                       "value": number(record.get("value")), "threshold": number(record.get("threshold")),
                       "since": record["since"], "last_sent": number(sent),
                       "silenced": index.match(labels)})
    alerts.sort(key=lambda a: (-a["since"], a["rule"], a["node"]))
    try:
        heartbeat = json.loads(beat) if beat else None
    except (ValueError, RecursionError):
        heartbeat = None
    return {"alerts": alerts, "alerter": heartbeat if isinstance(heartbeat, dict) else None,
            "silences": len(silences), "now": now}


def _label(value):
    return value if isinstance(value, str) and _utf8(value) else None


# ---------------------------------------------------------------------------- run history

# A run is one node's life, from its first snapshot to its closed one (or to being declared lost). Its
# record is written once, by the node with its closed snapshot or by a reader's housekeeping for a node
# silent for MONITOR_LOST_AFTER, through RECORD_RUN_LUA. A spider's records are members of the sorted set
# ``runs_key`` (all with score 0, so ordered by member), each member ``<id> <record JSON>`` where the id is
# ``<end_time>-<start_time>-<node hash>``, times zero-padded: newest last in lexical order, and a page
# boundary that is exact even among runs sharing an end_time. The id is the API's opaque cursor.
# The record's counters, read from the snapshot the run ends with.
RUN_COUNTERS = ("pages", "items", "requests", "errors", "retries",
                "status_1xx", "status_2xx", "status_3xx", "status_4xx", "status_5xx", "peak_rss")
# What ``compare`` and the baseline cover: ratios of the run to the median of the previous finished runs.
COMPARED = ("items", "pages_per_min", "items_per_min", "duration", "error_ratio")
BASELINE_RUNS = 10
MIN_BASELINE = 3
RUN_ID = re.compile(r"\d{11}-\d{11}-[0-9a-f]{12}\Z")
RUN_ID_LEN = 36
# A node id, host or finish reason is cut to this many characters in a record (records stay under 2 KB).
RUN_TEXT = 200
# Runs the alerter can still read in ``runs_recent`` (it reads them every ALERT_INTERVAL).
RECENT_RUNS = 1000
# A lost node's claim outlives its pruning by this long, so a node that was very late still corrects it.
CLAIM_AFTER_PRUNE = 7 * 86400


def run_meta_key(prefix, name):
    """Run history's own keys, kept apart from ``<p>:runs:<spider>`` (a spider may have any name):
    ``totals`` (HASH ``["spider","reason"]`` -> runs ever recorded), ``seq`` and ``recent`` (the newest
    runs, ``<seq> <member>``, for the alerter)."""
    return f"{prefix}:runmeta:{name}"


def run_claim_key(prefix, node, start_time):
    """Set once a run of ``node`` started at ``start_time`` is recorded lost; holds the lost record's member."""
    return f"{prefix}:runmeta:lost:{int(start_time)}:{node}"


def run_record(snapshot, reason=None, offset=0.0):
    """A run record from the snapshot the run ends with, on Redis's clock (``offset``: Redis's clock minus
    the node's). ``reason`` overrides the snapshot's ``finish_reason`` (``lost``)."""
    end = (number(snapshot.get("timestamp"), 0) or 0) + offset
    start = number(snapshot.get("start_time"))
    start = end if start is None else min(start + offset, end)
    duration = max(int(end) - int(start), 0)
    record = {"node": str(snapshot.get("node", ""))[:RUN_TEXT], "spider": snapshot["spider"],
              "host": str(snapshot.get("host", ""))[:RUN_TEXT], "pid": number(snapshot.get("pid")),
              "start_time": int(start), "end_time": int(end), "duration": duration,
              "finish_reason": str(reason or snapshot.get("finish_reason") or "unknown")[:RUN_TEXT]}
    for field in RUN_COUNTERS:
        value = number(snapshot.get(field))
        record[field] = int(value) if value is not None else None
    minutes = duration / 60
    for field in ("pages", "items"):
        count = record[field]
        record[f"{field}_per_min"] = round(count / minutes, 1) if minutes > 0 and count is not None else None
    return record


def run_id(record):
    """The record's id: its place in the spider's runs and the API's cursor (see above)."""
    digest = hashlib.sha1(f"{record['node']}\0{record['start_time']}".encode("utf-8", "replace")).hexdigest()
    clamp = lambda t: min(max(int(t), 0), 10 ** 11 - 1)  # noqa: E731
    return f"{clamp(record['end_time']):011d}-{clamp(record['start_time']):011d}-{digest[:12]}"


# Records a run in one step. KEYS: runs, totals, claim, seq, recent. ARGV: mode ('close' or 'lost'), id,
# record JSON (an object without compare), keep, totals field of this run, totals field of a lost run of
# the spider, recent runs kept. A lost run is recorded only if its claim is free (exactly once whoever
# tries); a close replaces the node's lost record, if it had one. ``compare`` is computed here, from the
# previous BASELINE_RUNS runs not lost. Returns 0 when the claim was taken already, else the run's seq.
RECORD_RUN_LUA = """
local mode, id, rec = ARGV[1], ARGV[2], ARGV[3]
if mode == 'lost' then
  if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
else
  local old = redis.call('GET', KEYS[3])
  if old then
    if redis.call('ZREM', KEYS[1], old) == 1 then redis.call('HINCRBY', KEYS[2], ARGV[6], -1) end
    redis.call('DEL', KEYS[3])
  end
end
local function figures(r)
  local out = {items = r.items, pages_per_min = r.pages_per_min, items_per_min = r.items_per_min,
               duration = r.duration}
  if type(r.errors) == 'number' and type(r.pages) == 'number' and r.pages > 0 then
    out.error_ratio = r.errors / r.pages
  end
  return out
end
local cols, n = {}, 0
local prev = redis.call('ZREVRANGEBYLEX', KEYS[1], '(' .. id .. ' ', '-', 'LIMIT', 0, 5 * tonumber(ARGV[8]))
for _, m in ipairs(prev) do
  if n >= tonumber(ARGV[8]) then break end
  local ok, r = pcall(cjson.decode, string.sub(m, string.len(id) + 2))
  if ok and type(r) == 'table' and r.finish_reason ~= 'lost' then
    n = n + 1
    for k, v in pairs(figures(r)) do
      if type(v) == 'number' then cols[k] = cols[k] or {}; table.insert(cols[k], v) end
    end
  end
end
local compare = 'null'
if n >= tonumber(ARGV[9]) then
  local out, mine = {}, figures(cjson.decode(rec))
  for k, list in pairs(cols) do
    table.sort(list)
    local c = #list
    local median = (list[math.floor((c + 1) / 2)] + list[math.floor(c / 2) + 1]) / 2
    if type(mine[k]) == 'number' and median > 0 and c >= tonumber(ARGV[9]) then
      out[k] = math.floor(mine[k] / median * 1000 + 0.5) / 1000
    end
  end
  compare = cjson.encode(out)
  if compare == '[]' or compare == '{}' then compare = '{}' end
end
local member = id .. ' ' .. string.sub(rec, 1, -2) .. ',"compare":' .. compare .. ',"baseline_runs":' .. n .. '}'
redis.call('ZADD', KEYS[1], 0, member)
local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4])
if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1) end
redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
if mode == 'lost' then redis.call('SET', KEYS[3], member) end
local seq = redis.call('INCR', KEYS[4])
redis.call('LPUSH', KEYS[5], seq .. ' ' .. member)
redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[7]) - 1)
return seq
"""


def totals_field(spider, reason):
    return _compact_json([spider, reason])


def write_run(pipe, prefix, record, start, keep=DEFAULT_RUNS_KEEP, lost=False):
    """Queue RECORD_RUN_LUA for ``record`` on ``pipe`` (a pipeline or a client): the node's close, or a
    reader's lost run (``lost``: recorded only once, whoever tries). ``start`` is the snapshots'
    ``start_time`` as the node wrote it: with the node id, it names the run's claim."""
    spider = record["spider"]
    keys = (runs_key(prefix, spider), run_meta_key(prefix, "totals"),
            run_claim_key(prefix, record["node"], number(start, 0)),
            run_meta_key(prefix, "seq"), run_meta_key(prefix, "recent"))
    body = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
    return pipe.eval(RECORD_RUN_LUA, len(keys), *keys, "lost" if lost else "close", run_id(record), body,
                     int(keep), totals_field(spider, record["finish_reason"]), totals_field(spider, "lost"),
                     RECENT_RUNS, BASELINE_RUNS, MIN_BASELINE)


def record_lost_runs(r, prefix, nodes, now, lost_after, keep=DEFAULT_RUNS_KEEP, done=None):
    """Write a ``lost`` run for each node not closed and silent for more than ``lost_after`` seconds and
    three of its intervals (stale: a short setting never loses a node between reports), on Redis's clock
    ``now``, once across processes; ``done`` (a set of ``(node, start_time)``, updated)
    skips those already handled. Returns how many this call recorded."""
    done = set() if done is None else done
    todo = []
    for node, snapshot in nodes.items():
        claim = (node, snapshot.get("start_time"))
        silent = now - last_report(snapshot) > lost_after and node_state(snapshot, now) == "stale"
        if silent and claim not in done:
            offset = last_report(snapshot) - number(snapshot.get("timestamp"), 0)
            todo.append((claim, run_record(dict(snapshot, node=node), "lost", offset)))
    if not todo:
        return 0
    with r.pipeline(transaction=False) as pipe:
        for claim, record in todo:
            write_run(pipe, prefix, record, claim[1], keep, lost=True)
        written = pipe.execute()
    done.update(claim for claim, _ in todo)
    return sum(1 for w in written if w)


def parse_run(member):
    """``(id, record)`` from a stored member, or None unless it passes the snapshot gate's number rules."""
    text = as_text(member)
    rid, _, body = text.partition(" ")
    if not RUN_ID.match(rid):
        return None
    try:
        record = json.loads(body, parse_constant=not_json, parse_float=_bounded_float, parse_int=_bounded_int)
    except (ValueError, RecursionError):
        return None
    if not (isinstance(record, dict) and isinstance(record.get("spider"), str)
            and isinstance(record.get("finish_reason"), str) and is_number(record.get("end_time"))):
        return None
    return rid, record


def run_bound(before):
    """The ZREVRANGEBYLEX bound for runs older than ``before``: a cursor (a run id) or unix seconds; None
    when it is neither."""
    if before is None or before == "":
        return "+"
    if RUN_ID.match(before):
        return f"({before} "
    if before.isascii() and before.isdigit() and len(before) <= 11:
        return f"({int(before):011d}"
    return None


def read_runs(r, prefix, spider=None, limit=50, before=None, reason=None):
    """``(runs, next cursor or None)``: the spider's runs (every spider's, without one) newest first, older
    than ``before`` (see ``run_bound``), with ``finish_reason`` in ``reason`` (a set) when given. Malformed
    members are skipped."""
    if spider is None:
        spiders = sorted({s for s, _ in run_totals(r.hgetall(run_meta_key(prefix, "totals")))})
    else:
        spiders = [spider]
    found = []
    for name in spiders:
        found += _spider_runs(r, runs_key(prefix, name), limit + 1, run_bound(before), reason)
    found.sort(key=lambda pair: pair[0], reverse=True)
    more = len(found) > limit
    found = found[:limit]
    return [record for _, record in found], (found[-1][0] if more else None)


def _spider_runs(r, key, count, bound, reason):
    """Up to ``count`` ``(id, record)`` of one runs key from ``bound`` down, those of ``reason`` only."""
    out, chunk = [], count if reason is None else max(count * 4, 200)
    # A member holds its reason as written by write_run: most members need no decoding to be passed over.
    needles = None if reason is None else [b'"finish_reason":' + json.dumps(x, ensure_ascii=False).encode()
                                           for x in reason]
    while True:
        members = r.zrevrangebylex(key, bound, "-", 0, chunk)
        wanted = members if needles is None else [m for m in members if any(n in m for n in needles)]
        for parsed in filter(None, map(parse_run, wanted)):
            if reason is None or parsed[1]["finish_reason"] in reason:
                out.append(parsed)
                if len(out) == count:
                    return out
        if len(members) < chunk:
            return out
        bound = "(" + as_text(members[-1])


def run_figures(record):
    """The figures ``compare`` covers, for one run (error_ratio is errors per page)."""
    out = {f: number(record.get(f)) for f in COMPARED if f != "error_ratio"}
    pages, errors = number(record.get("pages")), number(record.get("errors"))
    out["error_ratio"] = errors / pages if pages and errors is not None else None
    return out


def baseline(records):
    """The medians of COMPARED over the first BASELINE_RUNS records not lost (newest first given), and how
    many records they used: what a run ending now is compared with (as RECORD_RUN_LUA does)."""
    used = [run_figures(r) for r in records if r.get("finish_reason") != "lost"][:BASELINE_RUNS]
    medians = {}
    for field in COMPARED:
        values = sorted(v[field] for v in used if v[field] is not None)
        medians[field] = ((values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2
                          if len(values) >= MIN_BASELINE else None)
    return (medians if len(used) >= MIN_BASELINE else None), len(used)


SUMMARY_DAYS = 30


def runs_summary(r, prefix, spider, now):
    """A spider's runs at a glance: count kept, all-time totals by reason, the baseline a run ending now
    would be compared with, reasons among kept runs, and per-day totals (UTC) for the last 30 days."""
    with r.pipeline(transaction=False) as pipe:
        pipe.zcard(runs_key(prefix, spider))
        pipe.zrevrangebylex(runs_key(prefix, spider), "+", "-", 0, 5 * BASELINE_RUNS)
        pipe.zrevrangebylex(runs_key(prefix, spider), "+", f"[{int(now - SUMMARY_DAYS * 86400):011d}")
        pipe.hgetall(run_meta_key(prefix, "totals"))
        count, newest, month, totals = pipe.execute()
    recent = [p[1] for p in map(parse_run, newest) if p]
    medians, used = baseline(recent)
    days, reasons = {}, collections.Counter()
    for parsed in filter(None, map(parse_run, month)):
        record = parsed[1]
        reasons[record["finish_reason"]] += 1
        day = time.strftime("%Y-%m-%d", time.gmtime(record["end_time"]))
        totals_of_day = days.setdefault(day, {"day": day, "runs": 0, "pages": 0, "items": 0, "errors": 0})
        totals_of_day["runs"] += 1
        for field in ("pages", "items", "errors"):
            totals_of_day[field] += int(number(record.get(field), 0))
    return {"spider": spider, "runs": count, "baseline": medians, "baseline_runs": used,
            "reasons": dict(reasons), "totals": {reason: n for (s, reason), n in run_totals(totals).items()
                                                  if s == spider},
            "days": sorted(days.values(), key=lambda d: d["day"])}


def recent_runs(r, prefix):
    """The newest runs recorded (up to RECENT_RUNS), as ``[(seq, record)]``: what the alerter judges."""
    out = []
    for raw in r.lrange(run_meta_key(prefix, "recent"), 0, -1):
        seq, _, member = as_text(raw).partition(" ")
        parsed = parse_run(member)
        if seq.isdigit() and parsed:
            out.append((int(seq), parsed[1]))
    return out


def run_totals(raw):
    """``{(spider, reason): runs ever recorded}`` from an HGETALL of the totals hash; malformed fields skipped."""
    out = {}
    for field, value in raw.items():
        try:
            spider, reason = json.loads(field)
            count = int(value)
        except (ValueError, TypeError):
            continue
        if isinstance(spider, str) and isinstance(reason, str) and 0 <= count < NUMBER_LIMIT:
            out[(spider, reason)] = count
    return out


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
        self.peak_rss = 0  # the run's largest RSS, for its run record
        self.runs_keep = DEFAULT_RUNS_KEEP
        self.control = None  # a NodeControl when MONITOR_CONTROL is on

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
        keep = str(setting("MONITOR_RUNS_KEEP", DEFAULT_RUNS_KEEP)).strip()
        if not (keep.isascii() and keep.isdigit() and int(keep) > 0):
            raise NotConfigured(f"MONITOR_RUNS_KEEP must be a whole number above 0, not {keep!r}; the monitor is off")
        ext.runs_keep = int(keep)
        if str(setting("MONITOR_CONTROL", "1")).strip().lower() not in ("0", "false", "no", "off"):
            ext.control = NodeControl(ext)
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
        return self.control.open(spider) if self.control else None

    async def spider_closed(self, spider, reason):
        """Stop the loop and publish the final ``closed`` snapshot (Scrapy waits for it)."""
        from scrapy.utils.defer import maybe_deferred_to_future

        if self.task and self.task.running:
            self.task.stop()
        logging.getLogger().removeHandler(self.insight.handler)
        if self.queue_keys is None:  # never opened
            return
        stats = dict(self.stats.get_stats())
        extra = {**self.control_fields(), "status": "closed", "finish_reason": str(reason),
                 **self.insight.take_interval()}
        await maybe_deferred_to_future(self.lock.run(self._in_thread, stats, extra, True))
        if self.control:
            from twisted.internet import threads

            await maybe_deferred_to_future(threads.deferToThread(self.control.forget))

    def tick(self, queued=False):
        """Runs on the reactor thread: copy the stats and hand sampling and Redis I/O to a thread. With
        ``queued`` (a control command was applied) it runs after the tick in progress instead of skipping."""
        if self.lock.locked and not queued:
            return  # the previous tick is still talking to Redis: ticks never overlap
        self.lock.run(self._in_thread, dict(self.stats.get_stats()),
                      {"status": "running", **self.control_fields(), **self.insight.take_interval()})

    def control_fields(self):
        return self.control.status() if self.control else {}

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
        self.peak_rss = snapshot["peak_rss"] = max(self.peak_rss, snapshot.get("rss") or 0)
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
                if final:  # the run's record, in the same round trip
                    write_run(pipe, self.prefix, run_record(snapshot, offset=self.clock_offset),
                              self.base["start_time"], self.runs_keep)
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


# ---------------------------------------------------------------------------- fleet control

CONTROL_COMMANDS = ("pause", "resume", "stop", "drain")
# Finish reasons of a node closed by a command.
STOPPED, DRAINED = "stopped", "drained"
# A node reads its commands this often, whatever its MONITOR_INTERVAL (the issue's goal: applied within 2 s).
CONTROL_POLL = 1.0
# The control log keeps the newest this many commands.
CONTROL_LOG_KEEP = 1000
# A command's acknowledgements are kept a week: longer than anyone reads the log for a command's outcome.
ACK_TTL = 7 * 86400

# Issues one command atomically, so ids are ordered and unique across API processes and the newest id is
# always the one stored: INCR the sequence, stamp Redis's clock, splice both into the JSON (ARGV[2], an
# object without them), store it under its target, push it onto the capped log. Replies ``{id, at}``.
ISSUE_LUA = """
local id = redis.call('INCR', KEYS[1])
local t = redis.call('TIME')
local at = string.format('%d.%03d', t[1], math.floor(t[2] / 1000))
local entry = '{"id":' .. id .. ',"at":' .. at .. ',' .. string.sub(ARGV[2], 2)
redis.call('HSET', KEYS[2], ARGV[1], entry)
redis.call('LPUSH', KEYS[3], entry)
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
return {id, at}
"""


def control_ack_key(prefix, command_id):
    """HASH of one command's acknowledgements: node id -> JSON ``{"at": unix seconds}``, kept ACK_TTL."""
    return control_key(prefix, f"ack:{command_id}")


def control_targets(node, spider):
    """The fields of ``<p>:control:commands`` a node obeys: its own, its spider's, everyone's."""
    return [f"node:{node}", f"spider:{spider}", "all"]


def issue_command(r, prefix, command, target, **fields):
    """Store ``command`` for ``target`` (``node:<id>``, ``spider:<name>`` or ``all``) and log it, with
    ``fields`` (comment, who...). Returns the stored entry, with its ``id`` and ``at`` (Redis's clock)."""
    entry = {"command": command, "target": target, **fields}
    command_id, at = r.eval(ISSUE_LUA, 3, control_key(prefix, "seq"), control_key(prefix, "commands"),
                            control_key(prefix, "log"), target, _compact_json(entry), CONTROL_LOG_KEEP)
    return {"id": int(command_id), "at": float(at), **entry}


def decode_command(raw):
    """A stored command as a dict, or None unless it is a JSON object with an integer ``id``, a numeric
    ``at`` and a known ``command``."""
    try:
        value = json.loads(raw, parse_constant=not_json, parse_float=_bounded_float, parse_int=_bounded_int)
    except (ValueError, TypeError, RecursionError):
        return None
    if (isinstance(value, dict) and isinstance(value.get("id"), int) and not isinstance(value["id"], bool)
            and is_number(value.get("at")) and value.get("command") in CONTROL_COMMANDS):
        return value
    return None


def newest_command(raws):
    """The command with the highest id among stored values (None or malformed ones skipped), or None."""
    commands = [c for c in (decode_command(raw) for raw in raws if raw is not None) if c is not None]
    return max(commands, key=lambda c: c["id"], default=None)


def read_control_log(r, prefix, limit):
    """The newest ``limit`` log entries, each with ``acks``: ``{node: when it applied the command}``."""
    raws = r.lrange(control_key(prefix, "log"), 0, limit - 1)
    entries = [c for c in map(decode_command, raws) if c is not None]
    with r.pipeline(transaction=False) as pipe:
        for entry in entries:
            pipe.hgetall(control_ack_key(prefix, entry["id"]))
        acks = pipe.execute()
    for entry, ack in zip(entries, acks):
        entry["acks"] = {}
        for node, raw in ack.items():
            try:
                at = json.loads(raw).get("at")
            except (ValueError, AttributeError, RecursionError):
                continue
            if is_number(at):
                entry["acks"][as_text(node)] = at
    return entries


class NodeControl:
    """Fleet control on one node: reads its commands every CONTROL_POLL seconds in a thread of its own (one
    HMGET, never on the reactor), applies each new one on the reactor once, and acknowledges it."""

    def __init__(self, monitor):
        self.monitor = monitor
        self.engine = None
        self.fields = None
        self.seen = set()  # (id, at) of every command taken: each is applied once, across Redis outages
        self.command = None  # {id, name, at} of the last applied, for the snapshot
        self.acks = collections.deque()  # (command id, at) to write
        self.draining = False
        self.done = None
        self.outage = Outage(logger)

    def open(self, spider):
        """Read the commands once before the crawl starts (a paused spider's new node starts paused), then
        poll. Returns a Deferred Scrapy waits for; a Redis outage delays the start by its timeout at most."""
        import threading

        from twisted.internet import threads

        try:
            self.engine = self.monitor.crawler.engine
        except RuntimeError:  # a crawler that is not crawling (the benchmark's): nothing to apply commands to
            self.engine = None
        self.fields = control_targets(self.monitor.node_id, spider.name)
        self.done = threading.Event()

        def start(command):
            if command is not None:
                self.apply(command)
            threading.Thread(target=self.poll, name="monitor-control", daemon=True).start()

        return threads.deferToThread(self.read).addCallback(start)

    def read(self):
        """Runs in a thread: write pending acknowledgements and read the three targets in one round trip;
        the newest command if this node has not taken it yet (it is then taken), else None."""
        r, prefix = self.monitor.redis, self.monitor.prefix
        acks = []
        while self.acks:
            acks.append(self.acks.popleft())
        try:
            with r.pipeline(transaction=False) as pipe:
                self._write_acks(pipe, acks)
                pipe.hmget(control_key(prefix, "commands"), self.fields)
                raws = pipe.execute()[-1]
        except redis.RedisError as exc:
            self.acks.extendleft(reversed(acks))
            self.outage.failed("Control: cannot read commands from Redis (%s); retrying every %gs",
                               scrub(exc), CONTROL_POLL)
            return None
        self.outage.ok("Control: Redis answers again; node %s reads its commands", self.monitor.node_id)
        command = newest_command(raws)
        if command is None or (command["id"], command["at"]) in self.seen:
            return None
        self.seen.add((command["id"], command["at"]))
        return command

    def poll(self):
        """The thread: read every CONTROL_POLL seconds until the node closes; hand new commands, and the
        drain check, to the reactor."""
        from twisted.internet import reactor

        while not self.done.wait(CONTROL_POLL):
            command = self.read()
            if command is not None:
                reactor.callFromThread(self.apply, command)
            if self.draining:
                sizes = self.monitor._queue_sizes()
                reactor.callFromThread(self.check_drain, sizes)

    def apply(self, command):
        """Runs on the reactor: carry out one command, note it for the snapshot and ack, publish at once."""
        engine, name = self.engine, command["command"]
        if engine is None or engine.spider is None:
            return
        logger.info("Control: %s (command %d, %s)", name, command["id"], command.get("target"))
        if name == "pause":
            engine.pause()
        elif name == "resume":
            self.draining = False
            engine.unpause()
            slot = getattr(engine, "_slot", None)
            if slot is not None:
                slot.nextcall.schedule()  # start downloading now, not at the engine's next 5-second heartbeat
        elif name == "stop":
            self.close(STOPPED)
        elif name == "drain":
            self.draining = True
        at = round(time.time(), 3)
        self.command = {"id": command["id"], "name": name, "at": at}
        self.acks.append((command["id"], at))
        self.monitor.tick(queued=True)

    def check_drain(self, sizes):
        """Runs on the reactor: close with ``drained`` once this node is idle and the shared queue and start
        URLs are empty (``sizes`` as the poll thread just read them; a failed read is not empty)."""
        engine = self.engine
        if not self.draining or engine is None or engine.spider is None:
            return
        if engine.paused or any(sizes.get(k) != 0 for k in ("queue_requests", "queue_start_urls") if k in sizes):
            return
        try:
            idle = engine.spider_is_idle()
        except (redis.RedisError, RuntimeError):
            return
        if idle:
            self.close(DRAINED)

    def close(self, reason):
        """Close the spider gracefully: in-flight requests finish; the scrapy-redis queue keeps the rest."""
        from scrapy.utils.defer import deferred_from_coro

        self.draining = False
        if self.engine.spider is not None:
            deferred_from_coro(self.engine.close_spider_async(reason=reason))

    def status(self):
        """Snapshot fields: ``status`` ``paused`` while the engine is paused, and the last ``command``."""
        out = {"command": self.command} if self.command else {}
        if self.engine is not None and self.engine.paused:
            out["status"] = "paused"
        return out

    def forget(self):
        """Runs in a thread at close: stop polling, write pending acks, delete this node's own command."""
        if self.done is not None:
            self.done.set()
        if self.monitor.outage.down:
            return  # the final snapshot just failed: do not hold up the exit another timeout
        r, prefix = self.monitor.redis, self.monitor.prefix
        try:
            with r.pipeline(transaction=False) as pipe:
                self._write_acks(pipe, list(self.acks))
                pipe.hdel(control_key(prefix, "commands"), f"node:{self.monitor.node_id}")
                pipe.execute()
        except redis.RedisError:
            pass  # the readers' pruning deletes it with the node

    def _write_acks(self, pipe, acks):
        for command_id, at in acks:
            key = control_ack_key(self.monitor.prefix, command_id)
            pipe.hset(key, self.monitor.node_id, _compact_json({"at": at}))
            pipe.expire(key, ACK_TTL)
