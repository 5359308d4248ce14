"""The Redis contract: every key name, the Lua scripts, the snapshot's fields and how a node writes them.

Both sides import this module: the extension on crawler machines (``monitors.py``) and the readers (the API and
the alerter, which decode snapshots through ``monitor_snapshot.py``). It imports only the standard library and
redis-py (and orjson when it is installed: ``loads`` decodes faster with it). It also holds the small helpers
every script shares: strict JSON, numbers, text (a Redis URL becomes a client in ``monitor_settings``).
"""

import hashlib
import itertools
import json
import math
import re
from typing import Optional, TypedDict, Union

import redis

try:  # readers decode every node's snapshot: orjson does it in half the time; a crawler machine needs none
    import orjson
except ImportError:  # pragma: no cover - orjson is in requirements.txt
    orjson = None

# The interval assumed for a snapshot that does not say its own (the extension's default).
DEFAULT_INTERVAL = 10.0
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


# ---------------------------------------------------------------------------- keys

def status_key(prefix):
    return f"{prefix}:node:status"


def slim_key(prefix):
    """HASH beside ``status_key``, written with it: node id -> ``slim_value`` (for readers needing no insight)."""
    return f"{prefix}:node:slim"


def insight_key(prefix):
    """HASH beside ``status_key``, written with it: node id -> ``insight_value`` (what /prometheus adds up)."""
    return f"{prefix}:node:insight"


def history_key(prefix, node):
    """Full-resolution history of one node: a LIST of rows, newest first, the last hour."""
    return f"{prefix}:node:history:{node}"


def trend_key(prefix, node):
    """The 24-hour tier of one node's history: 5-minute rows, newest first."""
    return f"{prefix}:node:trend:{node}"


def alert_key(prefix, name):
    """The alerter's keys (monitor_alert_state.Store.TYPES): ``state`` (alert records), ``stall`` (stall
    trackers), ``outbox`` (messages to send), ``lock`` (the evaluation lock), ``dead`` and ``dead_total`` (dead
    letters and their count), ``silences``, ``heartbeat``, ``runs`` (the run rule's cursor), and
    ``<name>:aside`` for a key set aside as unusable."""
    return f"{prefix}:alert:{name}"


def control_key(prefix, name):
    """Fleet control's keys: ``commands`` (the newest, by target), ``seq`` (ids), ``log`` (the capped control
    log) and ``ack:<id>`` (see ``control_ack_key``)."""
    return f"{prefix}:control:{name}"


def control_ack_key(prefix, command_id):
    """HASH of one command's acknowledgements: node id -> JSON ``{"at": unix seconds}``, kept ACK_TTL."""
    return control_key(prefix, f"ack:{command_id}")


def runs_key(prefix, spider):
    """A spider's run records, newest first."""
    return f"{prefix}:runs:{spider}"


def rollup_key(prefix, spider, step, start):
    """One bucket of a spider's write-time rollups: a HASH for the ``step``-second bucket starting at ``start``
    (ROLLUP_TIERS says how long each tier is kept)."""
    return f"{prefix}:rollup:{spider}:{step}:{int(start)}"


def refusals_key(prefix, start):
    """One REFUSAL_STEP-second bucket of every spider's per-domain answers, the domain_refusing rule's figures: a
    HASH ``["spider","domain","pages"|"refused"]`` -> what the nodes counted in the bucket starting at ``start``
    (refused: 429 and 503 answers), added at write time (``write_rollup``)."""
    return f"{prefix}:refusals:{int(start)}"


def markers_key(prefix, spider):
    """The spider's version changes: a LIST of JSON ``{"at", "version", "node"}``, newest first (MARKERS_KEEP)."""
    return f"{prefix}:markers:{spider}"


def run_meta_key(prefix, name):
    """Run history's own keys, kept apart from ``<p>:runs:<spider>`` (a spider may have any name):
    ``totals`` (HASH ``["spider","reason"]`` -> runs ever recorded), ``seq`` and ``recent`` (the newest
    runs, ``<seq> <member>``, for the alerter)."""
    return f"{prefix}:runmeta:{name}"


def dead_key(prefix, spider):
    """A spider's dead letters: a sorted set of ``<id> <record JSON>`` members (all score 0, so ordered by id:
    oldest first), capped at MONITOR_DEAD_KEEP, never by TTL."""
    return f"{prefix}:dead:{spider}"


def dead_totals_key(prefix):
    """HASH spider -> dead letters ever recorded (capping the list never lowers it): Prometheus's counter."""
    return f"{prefix}:deadmeta:totals"


def slow_key(prefix):
    """HASH domain -> JSON ``{"delay": seconds, "since", "by"}``: the cluster-wide download delay of slowed
    domains, which every node applies to its download slot for that domain."""
    return f"{prefix}:slow"


# A cluster-wide delay is at most this many seconds, whatever is stored.
MAX_SLOW = 3600


def slow_delays(raw):
    """``{domain: delay}`` from an HGETALL of ``slow_key``; malformed entries skipped."""
    out = {}
    for field, text in raw.items():
        try:
            delay = loads(text).get("delay")
        except (ValueError, AttributeError):
            continue
        if isinstance(delay, (int, float)) and not isinstance(delay, bool) and 0 < delay <= MAX_SLOW:
            out[as_text(field)] = float(delay)
    return out


def events_channel(prefix):
    """The change notifications channel (PUBLISH): ``node <id>`` after a snapshot write or delete, ``alerts``
    after alert or silence changes, ``control <command JSON>``; the API's /events fans them out."""
    return f"{prefix}:events"


# PUBLISH from a script named with a key of the prefix: a cluster pipeline refuses publish() (and has no eval()),
# and routes a script by its key's slot, the prefix's; the script does not touch the key.
NOTIFY_LUA = "redis.call('PUBLISH', ARGV[1], ARGV[2])"


def notify(client, prefix, kind, name=""):
    """Queue (on a pipeline, a MULTI included) or send one change notification on ``events_channel``."""
    client.execute_command("EVAL", NOTIFY_LUA, 1, status_key(prefix), events_channel(prefix),
                           f"{kind} {name}" if name else kind)


def run_claim_key(prefix, node, start_time):
    """Set once a run of ``node`` started at ``start_time`` is recorded lost; holds the lost record's member."""
    return f"{prefix}:runmeta:lost:{int(start_time)}:{node}"


# ---------------------------------------------------------------------------- the snapshot

# Stored numbers must stay below this in size, so sums over any number of nodes stay finite and exact
# enough, and JavaScript, Prometheus and Redis read them.
NUMBER_LIMIT = 10 ** 18


class Snapshot(TypedDict, total=False):
    """One node's snapshot as stored in ``<p>:node:status`` (the README documents each field). Readers add
    ``state`` (never stored) and the API ``age``; ``seen`` is stamped by Redis on every write."""

    timestamp: int  # the seed's six fields
    spider: str
    cpu: float
    memory: float
    bytes_sent: int
    bytes_recv: int
    node: str  # who reports, when and how
    host: str
    pid: int
    status: str  # running, paused or closed
    finish_reason: str
    interval: float
    start_time: int
    version: str  # MONITOR_VERSION, else the spider's version attribute, else its source file's hash
    args_hash: str  # a hash of the spider's arguments (-a), names and values
    seen: float
    command: dict
    rss: int  # the process
    peak_rss: int
    process_cpu: float
    net_sent_rate: float
    net_recv_rate: float
    pages: int  # Scrapy's stats, status classes and rates
    items: int
    requests: int
    errors: int
    warnings: int
    retries: int
    exceptions: int
    dropped: int
    pages_per_min: float
    items_per_min: float
    errors_per_min: float
    requests_per_min: float
    queue_requests: int  # scrapy-redis's queues
    queue_start_urls: int
    queue_dupefilter: int
    queues: dict  # the spider's scrapy-redis key names (see QUEUE_NAMES)
    dead: int  # dead letters this node recorded in this run
    idle_since: float  # since when (the node's clock) it downloaded nothing, had nothing in flight or queued
    reports_dropped: int  # snapshots the node could not write (Redis down, a failover)
    latency_p50: float  # crawl insight
    latency_p95: float
    latency_p99: float
    latency_sum: float
    latency_buckets: list
    domains: dict
    fields: dict
    fields_listed: bool
    error_samples: list
    fields_lowest: list  # slim values only (``slim_value``)


# The ``queues`` snapshot field: the scrapy-redis key names of the node's spider (names only), the start URL
# key's type (``list``, ``set`` or ``zset``) and ``apart`` (true when they live in another Redis than the
# monitor's: REDIS_URL differs from MONITOR_REDIS_URL, so readers cannot act on them).
QUEUE_NAMES = ("requests", "start_urls", "dupefilter")
START_URL_TYPES = ("list", "set", "zset")


def redis_now(time_reply):
    """Redis's TIME reply (from redis-py, or raw from a script) as unix seconds."""
    return int(time_reply[0]) + int(time_reply[1]) / 1e6


# ---------------------------------------------------------------------------- crawl insight fields

# Upper bounds (seconds) of the download latency histogram; a last, open bucket (+Inf) follows.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
                   15.0, 30.0, 60.0)
MAX_TOP_DOMAINS = 100
MAX_FIELDS = 100
SAMPLES = 5
SAMPLE_TEXT = 300
# The per-domain figures, in the order ``Insight`` keeps them (pages, errors, 4xx, 5xx, 429, 503); a domain's
# figures also say its cluster-wide ``delay`` (seconds) while it is slowed, and its ``latency_p95``.
DOMAIN_COUNTS = ("pages", "errors", "4xx", "5xx", "429", "503")
# Snapshot fields too big for list views: the API sends them for one node, or with ?fields=all.
BIG_FIELDS = frozenset(("domains", "fields", "error_samples", "latency_buckets"))


def percentile(counts, q):
    """The ``q`` quantile (0..1) of a bucket histogram, interpolated within its bucket as Prometheus's
    histogram_quantile does; None when it is empty. The open last bucket answers its lower bound."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            low = LATENCY_BUCKETS[i - 1] if i else 0.0
            return round(low + (LATENCY_BUCKETS[i] - low) * (rank - seen) / count, 3)
        seen += count
    return LATENCY_BUCKETS[-1]


def slim(snapshot):
    """The snapshot without BIG_FIELDS: what list views send unless asked for all fields."""
    return {k: v for k, v in snapshot.items() if k not in BIG_FIELDS}


def slim_value(snapshot):
    """``slim_key``'s JSON of a snapshot: ``slim(snapshot)``, ``fields_lowest`` (``[name, share]`` of its least
    covered item field: the coverage rule's figure) and, when one of its domains is slowed, ``domains`` as columns
    (``slim_domains``: what the spider views' ``slowed`` reads). The refusal rule reads ``refusals_key``."""
    fields, domains = snapshot.get("fields"), snapshot.get("domains")
    shares = {k: v for k, v in fields.items() if is_number(v)} if isinstance(fields, dict) else {}
    extra = {"fields_lowest": [min(shares, key=shares.get), min(shares.values())]} if shares else {}
    if isinstance(domains, dict) and domains:
        columns = slim_domains({name: d for name, d in domains.items() if isinstance(d, dict)})
        if len(columns) > 3:
            extra["domains"] = columns
    return dumps({**slim(snapshot), **extra})


def insight_value(snapshot):
    """``insight_key``'s JSON of a snapshot: its crawl insight as /prometheus adds it up, as columns that decode and
    add up at C speed: ``latency_buckets``, ``domains`` (``[names, *DOMAIN_COUNTS]``, one list per figure, every
    domain with ``other``) and ``fields`` (``[names, shares]``), each only when the snapshot has it (``{}``
    without insight). A figure that is not a number is null."""
    out = {}
    if snapshot.get("latency_buckets"):
        out["latency_buckets"] = snapshot["latency_buckets"]
    domains, fields = snapshot.get("domains"), snapshot.get("fields")
    if isinstance(domains, dict) and domains:
        named = [(name, d) for name, d in domains.items() if isinstance(d, dict)]
        out["domains"] = [[name for name, _ in named], *([d.get(count) if is_number(d.get(count)) else None
                                                          for _, d in named] for count in DOMAIN_COUNTS)]
    if isinstance(fields, dict) and fields:
        out["fields"] = [list(fields), list(fields.values())]
    return dumps(out)


def slim_domains(domains):
    """A slim value's ``domains``: ``[names, pages, refused (429 + 503 answers), delays]`` of each named domain of
    ``{name: figures}`` (``other``, many domains, left out), one list per figure; ``delays`` only when one is set.
    A figure that is not a number counts 0."""
    named = [(name, d) for name, d in domains.items() if name != "other"]
    columns = [[name for name, _ in named], [number(d.get("pages"), 0) for _, d in named],
               [number(d.get("429"), 0) + number(d.get("503"), 0) for _, d in named],
               [number(d.get("delay"), 0) for _, d in named]]
    return columns if any(columns[3]) else columns[:3]


# ---------------------------------------------------------------------------- what a node writes

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
# Publishes a snapshot stamped with Redis's clock: the stored object gains ``seen``, the server's time of
# the write, which every reader judges liveness by; the reply is that time (TIME's two parts). The same step
# writes the slim value (KEYS[2], ARGV[3]) and the insight value (KEYS[3], ARGV[5]), stamped alike (an empty
# object gains only the stamp), and tells readers (``events_channel``, ARGV[4]) which node changed.
STAMP_LUA = """
local t = redis.call('TIME')
local stamp = string.format('%d.%03d', t[1], math.floor(t[2] / 1000))
local seen = ',"seen":' .. stamp .. '}'
redis.call('HSET', KEYS[1], ARGV[1], string.sub(ARGV[2], 1, -2) .. seen)
redis.call('HSET', KEYS[2], ARGV[1], string.sub(ARGV[3], 1, -2) .. seen)
if ARGV[5] == '{}' then
  redis.call('HSET', KEYS[3], ARGV[1], '{"seen":' .. stamp .. '}')
else
  redis.call('HSET', KEYS[3], ARGV[1], string.sub(ARGV[5], 1, -2) .. seen)
end
redis.call('PUBLISH', ARGV[4], 'node ' .. ARGV[1])
return t
"""


def write_snapshot(pipe: redis.client.Pipeline, prefix: str, snapshot: Snapshot, history_len: int, trend_rows=(),
                   stamp: bool = False, row: Optional[list] = None, rollup: Optional[tuple] = None) -> Optional[dict]:
    """Queue the commands that publish one snapshot: status, slim and insight hashes, capped history, trend, expiries,
    the change notification (``events_channel``), and with ``rollup`` (``(at, previous counts)``, see
    ``write_rollup``) the spider's rollups, whose counts it returns.

    With ``stamp`` (the extension always stamps) Redis adds ``seen`` and the first reply is its clock;
    without it the snapshot is stored as given (tests on a made-up clock). ``row`` is the history row
    (default: from the snapshot)."""
    node = snapshot["node"]
    if stamp:
        # EVAL by name: a cluster pipeline has no eval()
        pipe.execute_command("EVAL", STAMP_LUA, 3, status_key(prefix), slim_key(prefix), insight_key(prefix), node,
                             dumps(snapshot), slim_value(snapshot), events_channel(prefix), insight_value(snapshot))
    else:
        pipe.hset(status_key(prefix), node, dumps(snapshot))
        pipe.hset(slim_key(prefix), node, slim_value(snapshot))
        pipe.hset(insight_key(prefix), node, insight_value(snapshot))
        notify(pipe, prefix, "node", node)
    hkey = history_key(prefix, node)
    pipe.lpush(hkey, dumps(row or history_row(snapshot)))
    pipe.ltrim(hkey, 0, history_len - 1)
    pipe.expire(hkey, HISTORY_TTL)
    if trend_rows:
        tkey = trend_key(prefix, node)
        pipe.lpush(tkey, *(dumps(row) for row in trend_rows))
        pipe.ltrim(tkey, 0, TREND_SECONDS // TREND_BUCKET - 1)
        pipe.expire(tkey, HISTORY_TTL)
    return write_rollup(pipe, prefix, snapshot, *rollup) if rollup else None


# ---------------------------------------------------------------------------- spider rollups and markers

# Write-time rollups, as Sidekiq keeps its metrics: every node write adds to its spider's current bucket of each
# tier, (step seconds, kept seconds): 10-minute buckets for 7 days, hourly ones for 90 days. A bucket expires
# ``keep`` after its end, on Redis's clock. monitor_read.ROLLUP_RULES says how each figure combines.
ROLLUP_TIERS = ((600, 7 * 86400), (3600, 90 * 86400))
# Counters (snapshot field -> hash field): each write adds what the node counted since its last rollup.
ROLLUP_COUNTERS = {"pages": "p", "items": "i", "errors": "e", "requests": "r", "dead": "d"}
# KEYS: the buckets, one per tier. ARGV: each bucket's expire-at, then the write's time, node-milliseconds
# (the node's interval while it crawls), queue size ('' if unknown), latency p95 ('' if none), then counter
# field, count pairs. Counters and node-milliseconds add up (HINCRBY); the queue keeps the latest reading
# (``q``, with its time ``qt``: every node sees the same shared queue); p95 keeps the bucket's max (``l``).
# pcall: a hand-edited bucket is skipped, never an error that would fail the node's write.
ROLLUP_LUA = """
local n = #KEYS
local at = tonumber(ARGV[n + 1])
for i, key in ipairs(KEYS) do
  for j = n + 5, #ARGV, 2 do redis.pcall('HINCRBY', key, ARGV[j], ARGV[j + 1]) end
  if ARGV[n + 2] ~= '0' then redis.pcall('HINCRBY', key, 'n', ARGV[n + 2]) end
  if ARGV[n + 3] ~= '' then
    local qt = redis.pcall('HGET', key, 'qt')
    if type(qt) ~= 'string' or (tonumber(qt) or 0) <= at then
      redis.pcall('HSET', key, 'q', ARGV[n + 3], 'qt', ARGV[n + 1])
    end
  end
  if ARGV[n + 4] ~= '' then
    local l = redis.pcall('HGET', key, 'l')
    if type(l) ~= 'string' or tonumber(ARGV[n + 4]) > (tonumber(l) or -1) then
      redis.pcall('HSET', key, 'l', ARGV[n + 4])
    end
  end
  redis.pcall('EXPIREAT', key, ARGV[i])
end
return 0
"""
# The domain_refusing rule's figures, added up at write time as the rollups are (its readers decode no node's
# domains): each write adds the answers the node counted per domain since its last rollup into the REFUSAL_STEP-second
# bucket of its time (``refusals_key``), kept REFUSAL_KEEP after its end (the rule's window at most).
REFUSAL_STEP = 10
REFUSAL_KEEP = 3600
# KEYS: the bucket. ARGV: its time to live (seconds from the write), then field, count pairs (HINCRBY; pcall: a
# hand-edited bucket is skipped).
REFUSALS_LUA = """
for j = 2, #ARGV, 2 do redis.pcall('HINCRBY', KEYS[1], ARGV[j], ARGV[j + 1]) end
redis.pcall('EXPIRE', KEYS[1], ARGV[1])
return 0
"""


def refusal_counts(snapshot):
    """``{(domain, "pages" | "refused"): count}`` of the snapshot's named domains (not ``other``): responses, and
    429 + 503 answers, whole numbers."""
    domains = snapshot.get("domains")
    if not isinstance(domains, dict):
        return {}
    out = {}
    for name, d in domains.items():
        if name != "other" and isinstance(d, dict):
            out[name, "pages"] = int(number(d.get("pages"), 0))
            out[name, "refused"] = int(number(d.get("429"), 0)) + int(number(d.get("503"), 0))
    return out


# Version markers kept per spider (the key itself expires MARKERS_TTL after the newest).
MARKERS_KEEP = 200
MARKERS_TTL = 90 * 86400
# KEYS: markers. ARGV: version, the marker JSON, keep, ttl. Adds the marker unless the newest one already names
# this version: atomic, so a hundred nodes starting together with a new version add one marker. A markers key of
# another type is left alone (never an error that would fail the node's write).
MARKER_LUA = """
local head = redis.pcall('LINDEX', KEYS[1], 0)
if type(head) == 'table' then return 0 end
if head then
  local ok, m = pcall(cjson.decode, head)
  if ok and type(m) == 'table' and m.version == ARGV[1] then return 0 end
end
redis.call('LPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[3]) - 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


def rollup_counts(snapshot):
    """The snapshot's rolled-up counters: ``{field: count}`` for those it has as numbers, with its
    ``refusal_counts``."""
    counts = refusal_counts(snapshot)
    counts.update((f, int(snapshot[f])) for f in ROLLUP_COUNTERS if is_bounded(snapshot.get(f)))
    return counts


def write_rollup(pipe, prefix, snapshot, at, previous):
    """Queue ROLLUP_LUA: ``snapshot``'s figures into its spider's buckets for time ``at`` (Redis's clock),
    counters as the increase since ``previous`` (the counts of the node's last rollup; {} at its start), and
    REFUSALS_LUA: its domains' increase into the refusal bucket of ``at``.
    Returns the counts to pass as ``previous`` next time, once this write succeeded."""
    counts = rollup_counts(snapshot)
    crawling = snapshot.get("status") in ("running", "paused")
    interval = number(snapshot.get("interval"), DEFAULT_INTERVAL)
    keys, expiry = [], []
    for step, keep in ROLLUP_TIERS:
        start = int(at) // step * step
        keys.append(rollup_key(prefix, snapshot["spider"], step, start))
        expiry.append(start + step + keep)
    queue, p95 = number(snapshot.get("queue_requests")), number(snapshot.get("latency_p95"))
    pairs, refusals = [], []
    for field, count in counts.items():
        grown = count - previous.get(field, 0)
        if grown > 0 and field.__class__ is tuple:
            refusals += [dumps([snapshot["spider"], *field]), grown]
        elif grown > 0:
            pairs += [ROLLUP_COUNTERS[field], grown]
    pipe.execute_command("EVAL", ROLLUP_LUA, len(keys), *keys, *expiry, repr(float(at)),
                         int(interval * 1000) if crawling else 0, "" if queue is None else int(queue),
                         "" if p95 is None else repr(round(float(p95), 3)), *pairs)
    if refusals:
        start = int(at) // REFUSAL_STEP * REFUSAL_STEP
        pipe.execute_command("EVAL", REFUSALS_LUA, 1, refusals_key(prefix, start),
                             start + REFUSAL_STEP + REFUSAL_KEEP - int(at), *refusals)
    return counts


def write_marker(pipe, prefix, spider, version, at, node=""):
    """Queue MARKER_LUA: a marker for ``version`` of ``spider`` at ``at`` unless the newest one names it already."""
    marker = dumps({"at": int(at), "version": version, "node": node[:RUN_TEXT]}, ensure_ascii=False)
    pipe.execute_command("EVAL", MARKER_LUA, 1, markers_key(prefix, spider), version, marker, MARKERS_KEEP, MARKERS_TTL)


# A dead letter's id: ``<ms on Redis's clock>-<node hash>-<seq>``, zero-padded, so ids sort by time; a member of
# ``dead_key`` is ``<id> <record JSON>``.
DEAD_ID = re.compile(r"\d{14}-[0-9a-f]{8}-\d{8}\Z")


def dead_member(record, node, seq):
    """The sorted-set member of one dead letter (``record["at"]`` on Redis's clock)."""
    digest = hashlib.sha1(str(node).encode("utf-8", "replace")).hexdigest()[:8]
    at = min(max(int(record["at"] * 1000), 0), 10 ** 14 - 1)
    return f"{at:014d}-{digest}-{seq % 10 ** 8:08d} {dumps(record, ensure_ascii=False)}"


def write_dead(pipe, prefix, spider, members, keep):
    """Queue the commands that record dead letters: add, cap at ``keep`` (oldest go), count."""
    key = dead_key(prefix, spider)
    pipe.zadd(key, dict.fromkeys(members, 0))
    pipe.zremrangebyrank(key, 0, -int(keep) - 1)
    pipe.hincrby(dead_totals_key(prefix), spider, len(members))


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


def _compact(value):
    if isinstance(value, float):
        return round(value, 1) if abs(value) >= 100 or value == int(value) else round(value, 2)
    return value


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


# ---------------------------------------------------------------------------- run records

# A run is one node's life, from its first snapshot to its closed one (or to being declared lost). Its
# record is written once, by the node with its closed snapshot or by a reader's housekeeping for a node
# silent for MONITOR_LOST_AFTER, through RECORD_RUN_LUA. A spider's records are members of the sorted set
# ``runs_key`` (all with score 0, so ordered by member), each member ``<id> <record JSON>`` where the id is
# ``<end_time>-<start_time>-<node hash>``, times zero-padded: newest last in lexical order, and a page
# boundary that is exact even among runs sharing an end_time. The id is the API's opaque cursor.
# The record's counters, read from the snapshot the run ends with.
RUN_COUNTERS = ("pages", "items", "requests", "errors", "retries",
                "status_1xx", "status_2xx", "status_3xx", "status_4xx", "status_5xx", "peak_rss")
BASELINE_RUNS = 10
MIN_BASELINE = 3
RUN_ID = re.compile(r"\d{11}-\d{11}-[0-9a-f]{12}\Z")
# A node id, host or finish reason is cut to this many characters in a record (records stay under 2 KB).
RUN_TEXT = 200
# Runs the alerter can still read in ``runs_recent`` (it reads them every ALERT_INTERVAL).
RECENT_RUNS = 1000


def run_record(snapshot: Snapshot, reason: Optional[str] = None, offset: float = 0.0) -> dict:
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
    for field in ("version", "args_hash"):
        record[field] = snapshot[field][:RUN_TEXT] if is_text(snapshot.get(field)) else None
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
# previous BASELINE_RUNS runs that count (``monitor_records.counts_for_baseline``: not lost, and not empty unless
# the spider usually scrapes nothing and the run finished) of the same version and arguments if there are
# MIN_BASELINE, else of the same arguments, else any; ``compare.baseline_of`` says which (``version``, ``args``,
# ``any``). Returns 0 when the claim was taken already, else the run's seq.
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
local me, want = cjson.decode(rec), tonumber(ARGV[8])
local kinds = {version = {cols = {}, n = 0}, args = {cols = {}, n = 0}, any = {cols = {}, n = 0}}
local function add(kind, r)
  if kind.n >= want then return end
  kind.n = kind.n + 1
  for k, v in pairs(figures(r)) do
    if type(v) == 'number' then kind.cols[k] = kind.cols[k] or {}; table.insert(kind.cols[k], v) end
  end
end
local runs, zeros = {}, 0
local prev = redis.call('ZREVRANGEBYLEX', KEYS[1], '(' .. id .. ' ', '-', 'LIMIT', 0, 10 * want)
for _, m in ipairs(prev) do
  local ok, r = pcall(cjson.decode, string.sub(m, string.len(id) + 2))
  if ok and type(r) == 'table' and r.finish_reason ~= 'lost' then
    table.insert(runs, r)
    if #runs <= 2 * want and r.items == 0 then zeros = zeros + 1 end
  end
end
local usually_none = zeros * 2 > math.min(#runs, 2 * want)
for _, r in ipairs(runs) do
  if r.items ~= 0 or (usually_none and r.finish_reason == 'finished') then
    add(kinds.any, r)
    if type(me.args_hash) == 'string' and r.args_hash == me.args_hash then
      add(kinds.args, r)
      if type(me.version) == 'string' and r.version == me.version then add(kinds.version, r) end
    end
  end
end
local of = 'any'
if kinds.version.n >= tonumber(ARGV[9]) then of = 'version'
elseif kinds.args.n >= tonumber(ARGV[9]) then of = 'args' end
local cols, n = kinds[of].cols, kinds[of].n
local compare = 'null'
if n >= tonumber(ARGV[9]) then
  local out, mine = {baseline_of = of}, figures(me)
  for k, list in pairs(cols) do
    table.sort(list)
    local c = #list
    local median = (list[math.floor((c + 1) / 2)] + list[math.floor(c / 2) + 1]) / 2
    if type(mine[k]) == 'number' and median > 0 and c >= tonumber(ARGV[9]) then
      out[k] = math.floor(mine[k] / median * 1000 + 0.5) / 1000
    end
  end
  compare = cjson.encode(out)
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
    return dumps([spider, reason])


def write_run(pipe, prefix, record, start, keep, lost=False):
    """Queue RECORD_RUN_LUA for ``record`` on ``pipe`` (a pipeline or a client): the node's close, or a
    reader's lost run (``lost``: recorded only once, whoever tries). ``start`` is the snapshots'
    ``start_time`` as the node wrote it: with the node id, it names the run's claim."""
    spider = record["spider"]
    keys = (runs_key(prefix, spider), run_meta_key(prefix, "totals"),
            run_claim_key(prefix, record["node"], number(start, 0)),
            run_meta_key(prefix, "seq"), run_meta_key(prefix, "recent"))
    body = dumps(record, ensure_ascii=False)
    return pipe.execute_command("EVAL", RECORD_RUN_LUA, len(keys), *keys, "lost" if lost else "close", run_id(record),
                                body, int(keep), totals_field(spider, record["finish_reason"]),
                                totals_field(spider, "lost"), RECENT_RUNS, BASELINE_RUNS, MIN_BASELINE)


# ---------------------------------------------------------------------------- fleet control

CONTROL_COMMANDS = ("pause", "resume", "stop", "drain")
# Finish reasons of a node closed by a command.
STOPPED, DRAINED = "stopped", "drained"
# A command's acknowledgements are kept a week: longer than anyone reads the log for a command's outcome.
ACK_TTL = 7 * 86400
def control_targets(node, spider):
    """The fields of ``<p>:control:commands`` a node obeys: its own, its spider's, everyone's."""
    return [f"node:{node}", f"spider:{spider}", "all"]


def decode_command(raw, known=CONTROL_COMMANDS):
    """A stored command as a dict, or None unless it is a JSON object with an integer ``id``, a numeric
    ``at`` and a ``command`` in ``known``."""
    try:
        value = loads(raw)
    except (ValueError, TypeError):
        return None
    if (isinstance(value, dict) and isinstance(value.get("id"), int) and not isinstance(value["id"], bool)
            and is_number(value.get("at")) and value.get("command") in known):
        return value
    return None


def newest_command(raws):
    """The command with the highest id among stored values (None or malformed ones skipped), or None."""
    commands = [c for c in (decode_command(raw) for raw in raws if raw is not None) if c is not None]
    return max(commands, key=lambda c: c["id"], default=None)


# ---------------------------------------------------------------------------- shared helpers

def is_number(value):
    """A finite int or float, not a bool."""
    kind = value.__class__  # the common cases first: readers call this for every figure of every node
    if kind is int:
        return True
    if kind is float:
        return value - value == 0  # nan and inf give nan
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_bounded(value):
    """A number (``is_number``) below NUMBER_LIMIT in size: what a stored time or count must be."""
    return is_number(value) and abs(value) < NUMBER_LIMIT


def number(value, default=None):
    """``value`` if it is a number (``is_number``), else ``default``."""
    kind = value.__class__
    if kind is int or kind is float and value - value == 0:
        return value
    return value if is_number(value) else default


def as_text(value):
    """A Redis reply (bytes) or any value as text; undecodable bytes are replaced, never an error."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def is_text(value):
    """A str that encodes as UTF-8 (no lone surrogate, from a \\ud800 escape, which labels, mail and pages
    cannot write)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def not_json(name):
    raise ValueError(f"{name} is not JSON")


def _bounded_float(text):
    value = float(text)
    if not abs(value) < NUMBER_LIMIT:  # also false for nan and inf
        raise ValueError(f"a number is out of range: {_cut(text)}")
    return value


def _cut(text):
    return text if len(text) <= 30 else f"{text[:30]}... ({len(text)} characters)"


def _bounded_int(text):
    if len(text) > 19:  # 10 ** 18 has 19 digits; longer text is never converted (4300 digits would be refused)
        raise ValueError(f"a number is out of range: {_cut(text)}")
    value = int(text)
    if not -NUMBER_LIMIT < value < NUMBER_LIMIT:
        raise ValueError(f"a number is out of range: {_cut(text)}")
    return value


def is_name(value):
    """A name readers keep (a domain, a field, a queue key): text of 1 to SAMPLE_TEXT characters."""
    return value.__class__ is str and 0 < len(value) <= SAMPLE_TEXT and (value.isascii() or is_text(value))


def loads(raw: Union[bytes, str], bounded: bool = True) -> object:
    """Strict JSON: no NaN or Infinity, and (``bounded``) every number below NUMBER_LIMIT in size; ValueError
    otherwise, a value nested too deeply included. orjson decodes what it can; what it refuses (a lone surrogate
    escape or its UTF-8 bytes, which the stdlib keeps for the reader's gate to judge; anything malformed) is
    decided by the stdlib, so both give the same value or the same ValueError."""
    if not isinstance(raw, (bytes, bytearray, str)):
        raise TypeError(f"JSON must be text, not {type(raw).__name__}")
    if orjson is not None:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
        else:
            if bounded and not (surely_in_bounds(raw) or in_bounds(value)):
                raise ValueError("a number is out of range")
            return value
    if raw.__class__ is not str:  # as json.loads reads bytes (UTF-8 here), without a decoder per call
        raw = raw.decode("utf-8", "surrogatepass")
    try:
        return (_BOUNDED if bounded else _STRICT).decode(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


# JSON text as a number's size and its nesting show in it: each digit as 0, e and E as e, [ and { as [, the rest blank.
_SHAPE = bytes(48 if 48 <= c <= 57 else 101 if c in b"eE" else 91 if c in b"[{" else 32 for c in range(256))
_LIMIT_DIGITS = b"0" * len(str(NUMBER_LIMIT))  # 19 digits in a row: a number of 1e18 or more written whole
_SHALLOW = 200  # fewer opening brackets cannot nest deeply enough for in_bounds' recursion to fail


def surely_in_bounds(*raws) -> bool:
    """True when each JSON text of ``raws`` (bytes) can hold no number of NUMBER_LIMIT or more in size and no nesting
    too deep for ``in_bounds``, told from the text at C speed: a number that large is written with an exponent (a
    digit then e or E) or with 19 digits in a row. False is only a maybe (``in_bounds`` decides): text (str), an
    exponent or a long run of digits anywhere, strings included."""
    if len(raws) == 1 and raws[0].__class__ is bytes:  # one text (as loads checks): no join, one count
        shape = raws[0].translate(_SHAPE)
        nested = shape.count(b"[")
    elif len(raws) > 1 and set(map(type, raws)) == {bytes}:  # a block: its most bracketed text
        shape = b" ".join(raws).translate(_SHAPE)
        ends = list(itertools.accumulate(map(len, raws), lambda end, size: end + 1 + size))  # each text's end
        nested = max(map(shape.count, itertools.repeat(b"["), [0, *(end + 1 for end in ends[:-1])], ends))
    else:
        return False
    return b"0e" not in shape and _LIMIT_DIGITS not in shape and nested < _SHALLOW


def in_bounds(value) -> bool:
    """Every number in a decoded JSON value below NUMBER_LIMIT in size, as ``loads`` checks (false for infinity,
    which the stdlib decodes from 1e999; decoded JSON holds no NaN); ValueError for a value nested too deeply."""
    try:
        return _in_bounds(value)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _in_bounds(value):
    kind = value.__class__
    if kind is not dict and kind is not list:
        return not (kind is int or kind is float) or -NUMBER_LIMIT < value < NUMBER_LIMIT
    for v in value.values() if kind is dict else value:
        kind = v.__class__
        if (kind is int or kind is float) and not -NUMBER_LIMIT < v < NUMBER_LIMIT:  # false for nan and inf too
            return False
        if (kind is dict or kind is list) and not _in_bounds(v):
            return False
    return True


_STRICT = json.JSONDecoder(parse_constant=not_json)
_BOUNDED = json.JSONDecoder(parse_constant=not_json, parse_float=_bounded_float, parse_int=_bounded_int)
_ASCII = json.JSONEncoder(separators=(",", ":")).encode
_UTF8 = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(value: object, ensure_ascii: bool = True) -> str:
    """Compact JSON (no blanks), as every key of the monitor stores it."""
    return _ASCII(value) if ensure_ascii else _UTF8(value)
