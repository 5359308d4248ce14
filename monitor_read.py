"""The read side: what the API and the alerter read from Redis, and the figures they derive from it.

Every node's snapshot (``NodeReader``, with the housekeeping readers do: lost runs, pruning), a spider over its
nodes (SPIDER_FIELDS and ``combine``), cluster and spider views, the queue forecast and histories (run history
and the logs are monitor_records.py's). Pure functions where it can (``combine``, ``queue_forecast``,
``spider_points``), so tests prove the arithmetic without Redis. It imports nothing of Scrapy, Twisted or psutil.
"""

import collections
import contextlib
import functools
import gc
import itertools
import json
import logging
import math
import operator
import queue
import threading
import time
from typing import Iterable, Optional

import redis

from monitor_contract import (
    DEFAULT_INTERVAL,
    HISTORY_FIELDS,
    HISTORY_SECONDS,
    NUMBER_LIMIT,
    ROLLUP_COUNTERS,
    ROLLUP_TIERS,
    Snapshot,
    as_text,
    connect,
    control_key,
    events_channel,
    history_key,
    is_number,
    loads,
    markers_key,
    notify,
    number,
    redis_now,
    rollup_key,
    run_claim_key,
    slim_key,
    status_key,
    trend_key,
)
from monitor_records import RUNS_KEEP, record_lost_runs
from monitor_settings import SETTING
from monitor_snapshot import NUMBER_TYPES, last_report, node_state, parse_snapshot, parse_snapshots, stale_after

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- every node

# How often the objects frozen after a pause are looked at again for cyclic garbage (``gc_tidy``).
TIDY_EVERY = 600.0
_tidied = [time.monotonic()]


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector paused for a bulk decode or evaluation (unless paused already): what it makes
    is acyclic, freed by reference counting, and each collection of the young generation would scan again the
    thousands of snapshots decoded so far (at 10,000 nodes a third of an alert evaluation). When it resumes,
    every object alive is frozen (``gc.freeze``): the snapshots a reader keeps until their node reports again
    are then never scanned by a collection (with insight at 10,000 nodes, a full collection every other alert
    evaluation, 0.25 s each); ``gc_tidy`` collects among them now and then."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc_tidy()
            gc.freeze()
            gc.enable()


def gc_tidy(within: float = 0.0):
    """Collect cyclic garbage among the frozen objects too (unfreeze them, then a full collection), once every
    TIDY_EVERY seconds: due ``within`` seconds from now counts as due (the alerter tidies between evaluations,
    so none pays for it). What a frozen object frees by reference counting is freed at once anyway."""
    if time.monotonic() + within - _tidied[0] >= TIDY_EVERY:
        gc.unfreeze()
        gc.collect()
        _tidied[0] = time.monotonic()


# How often readers delete nodes silent for longer than the retention: housekeeping, once a minute.
PRUNE_EVERY = 60.0
# A lost node's claim outlives its pruning by this long, so a node that was very late still corrects it.
CLAIM_AFTER_PRUNE = 7 * 86400


# From this many nodes the API reads only the nodes written since its last read (``ChangeFeed``); a smaller cluster
# is read whole each time, which costs little. A whole read at least every FULL_EVERY seconds all the same.
FEED_FROM = 1000
FULL_EVERY = 30.0
FEED_BATCH = 1000  # node ids per HMGET


class ChangeFeed:
    """An API process's one subscription to the change notifications (``events_channel``), started on first use: it
    keeps the node ids written since a reader last took them (``take``: every snapshot write and pruning publishes
    ``node <id>``) and hands every notification to its listeners (``listen``: the /events hub). Its generation
    changes at each subscription: what was written while it was not subscribed is unknown, so a reader reads whole
    again and the hub reads everything again (a listener gets None)."""

    def __init__(self, url, prefix):
        self.url, self.channel = url, events_channel(prefix)
        self.lock = threading.Lock()
        self.dirty, self.generation, self.subscribed = set(), 0, False
        self.listeners = []  # a queue per listener
        self.thread, self.stopped = None, False

    def start(self):
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="monitor-feed", daemon=True)
                self.thread.start()

    def take(self):
        """``(generation, the stored fields of the nodes written since the last take)``; None while not subscribed."""
        self.start()
        with self.lock:
            if not self.subscribed:
                return None
            dirty, self.dirty = self.dirty, set()
            return self.generation, dirty

    def listen(self):
        """A queue of every notification's data (bytes) from now on, and None at each subscription; ``unlisten``
        it when done."""
        messages = queue.SimpleQueue()
        with self.lock:
            self.listeners.append(messages)
        self.start()
        return messages

    def unlisten(self, messages):
        with self.lock:
            self.listeners.remove(messages)

    def stop(self):
        self.stopped = True

    def run(self):
        client = connect(self.url)
        while not self.stopped:
            pubsub = None
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self.got(None)
                while not self.stopped:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and isinstance(message.get("data"), bytes):
                        self.got(message["data"])
            except redis.RedisError:
                with self.lock:
                    self.subscribed = False
                time.sleep(1.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(redis.RedisError):
                        pubsub.close()

    def got(self, data):
        """One notification (None: subscribed, anew)."""
        with self.lock:
            if data is None:
                self.generation += 1
                self.subscribed = True
            else:
                kind, _, name = data.partition(b" ")
                if kind == b"node" and name:
                    self.dirty.add(name)
            for messages in self.listeners:
                messages.put(data)


class NodeEntry:
    """One node as a reader last saw it: the stored value, its snapshot (None when malformed) and the
    snapshot's JSON once a caller asked for it (``json`` is the caller's to fill)."""

    __slots__ = ("raw", "snapshot", "json", "full", "projection", "flips")

    def __init__(self, raw, snapshot, flips=False):
        self.raw = raw
        self.snapshot = snapshot
        # When its state would change with time alone (stale_after), or None: never (closed, malformed).
        self.flips = (None if snapshot is None or snapshot["state"] == "closed" else stale_after(snapshot)) \
            if flips is False else flips
        self.json = None  # without insight.BIG_FIELDS, as list views send it
        self.full = None  # with every field (?fields=all)
        self.projection = None  # (fields, JSON) of the last ?fields= projection asked for

    def restated(self, now):
        """The entry anew with its snapshot's state judged at ``now`` (a state that time alone changes)."""
        return NodeEntry(self.raw, dict(self.snapshot, state=node_state(self.snapshot, now)))


class NodeReader:
    """Every node's snapshot in one round trip, with Redis's clock; used by the API and the alerter.

    A value unchanged since the last read is not decoded again (1,000 nodes reporting every 10 s leave
    about 100 new values a second); its snapshot is shared between reads, so never modify one. Nodes
    silent for longer than ``retention`` seconds (0: never) are deleted with their history, at most once
    every PRUNE_EVERY seconds. Nodes not closed and silent for longer than ``lost_after`` seconds (0: never)
    get a ``lost`` run record first (see ``record_lost_runs``), so pruning never loses a run.
    """

    def __init__(self, client, prefix, retention=0, lost_after=0, runs_keep=RUNS_KEEP, slim=False, feed=None):
        self.redis = client
        self.feed = feed  # a ChangeFeed: from FEED_FROM nodes, read only the nodes written since the last read
        self.fed = None  # (the feed's generation, monotonic time) of the last whole read, while the feed is used
        self.lock = threading.Lock()  # reads from the feed go one at a time: each builds on the last
        self.prefix = prefix
        self.key = status_key(prefix)
        self.slim = slim  # read <p>:node:slim (no insight's big fields) instead of the status hash
        self.retention = retention
        self.entries = {}  # node -> NodeEntry
        self.names = {}  # stored field -> node id, as last read
        self.last = None  # the last read, for _aligned
        self.last_prune = -PRUNE_EVERY
        self.lost_after, self.runs_keep = lost_after, runs_keep
        self.lost = set()  # (node, start_time) of runs recorded lost, by this process or another
        self.last_lost = -PRUNE_EVERY

    def read(self, now: Optional[float] = None) -> tuple[dict[str, Snapshot], int, float]:
        """``(nodes, skipped, now)``: ``{node: snapshot with state}``, how many stored values failed the gate,
        and Redis's clock at the read (states are judged on it), or ``now`` when given (tests, replays)."""
        if self.feed is not None and self.last is not None and len(self.last[0]) >= FEED_FROM:
            with self.lock:
                return self._read_fed(now)
        return self._read_whole(None, now)

    def _read_fed(self, now):
        """``read`` of the nodes written since the last read (``ChangeFeed``), the others as last read: a whole read
        when the feed was not subscribed all along since the last whole read (its generation changed), when the
        status hash does not hold as many nodes as that makes (a node added or deleted without a notification: by
        hand, a flush), once FULL_EVERY seconds passed (a value changed without one: an older extension, by hand),
        or when most nodes were written."""
        taken, (fields, raws, *_) = self.feed.take(), self.last
        if (taken is None or self.fed is None or taken[0] != self.fed[0]
                or time.monotonic() - self.fed[1] >= FULL_EVERY or len(taken[1]) * 2 > len(fields)):
            return self._read_whole(taken, now)
        names = sorted(taken[1])
        with self.redis.pipeline(transaction=False) as pipe:
            for i in range(0, len(names), FEED_BATCH):
                pipe.hmget(slim_key(self.prefix) if self.slim else self.key, names[i:i + FEED_BATCH])
            pipe.hlen(self.key)
            pipe.execute_command("TIME")
            *parts, count, server_now = pipe.execute()
        values = list(itertools.chain.from_iterable(parts))
        missing = [name for name, value in zip(names, values) if value is None]
        if missing and self.slim:  # a node without a slim value (an older extension's), or deleted
            found = dict(zip(missing, self.redis.hmget(self.key, missing)))
            values = [found.get(name) if value is None else value for name, value in zip(names, values)]
        raw_hash = dict(zip(fields, raws))
        for name, value in zip(names, values):
            if value is None:
                raw_hash.pop(name, None)
            else:
                raw_hash[name] = value
        if count != len(raw_hash):
            return self._read_whole(taken, now)
        return self._parsed(raw_hash, redis_now(server_now) if now is None else now)

    def _read_whole(self, taken, now):
        """A whole read, from which the feed's notifications (``taken``, None: without the feed) are followed."""
        with self.redis.pipeline(transaction=False) as pipe:
            self.queue(pipe)
            result = self.parse(pipe.execute(), now)
        self.fed = None if taken is None else (taken[0], time.monotonic())
        return result

    def queue(self, pipe):
        """Queue what ``read`` asks Redis on ``pipe``, so a caller can share one round trip; ``parse`` takes
        the replies (the last ``queued`` of them)."""
        pipe.hgetall(slim_key(self.prefix) if self.slim else self.key)
        if self.slim:
            pipe.hkeys(self.key)
        pipe.execute_command("TIME")  # pipe.time() is refused in a cluster pipeline

    @property
    def queued(self):
        return 3 if self.slim else 2

    def parse(self, replies, now=None):
        """``read``'s answer from the replies to ``queue``'s commands."""
        for reply in replies:
            if isinstance(reply, Exception):  # from a pipeline executed with raise_on_error=False
                raise reply
        raw_hash, *names, server_now = replies
        now = redis_now(server_now) if now is None else now
        if self.slim:
            raw_hash = self._with_status(raw_hash, names[0])
        return self._parsed(raw_hash, now)

    def _parsed(self, raw_hash, now):
        with gc_paused():
            nodes, skipped = self._decode(raw_hash, now)
        self._record_lost(nodes, now)
        self._prune(nodes, now)
        return nodes, skipped, now

    def _decode(self, raw_hash, now):
        """``(nodes, skipped)`` of the stored values, decoding only those that changed since the last read. When
        the hash holds the same fields in the same order as at the last read (nodes reporting, none coming or
        going), the changed values and the states that time alone changed are found at C speed (``_aligned``)."""
        fields, raws = list(raw_hash), list(raw_hash.values())
        last = self.last
        if last is not None and fields == last[0]:
            return self._aligned(last, raws, now)
        entries, nodes, skipped, names = {}, {}, 0, self.names
        ids = [names.get(field) or as_text(field) for field in fields]
        fresh = self._parse([i for i, (node, raw) in enumerate(zip(ids, raws))
                             if node not in self.entries or self.entries[node].raw != raw], raws, now)
        for i, node in enumerate(ids):
            entry = fresh.get(i)
            if entry is None:
                entry = self.entries[node]
                if entry.flips is not None and (now > entry.flips) != (entry.snapshot["state"] == "stale"):
                    entry = entry.restated(now)
            entries[node] = entry
            if entry.snapshot is None:
                skipped += 1
            else:
                nodes[node] = entry.snapshot
        self.entries = entries
        aligned = len(entries) == len(fields)  # else two fields read as one node id (undecodable bytes)
        self.names = dict(zip(fields, entries)) if aligned else {}
        self.last = self._last(fields, list(entries), list(entries.values())) if aligned else None
        return nodes, skipped

    def _aligned(self, last, raws, now):
        """``_decode`` of a hash whose fields are ``last``'s (``_last``: the last read's, in the hash's order): the
        entries whose value changed, or whose state time alone changed (``flips``), are made anew, found at C speed;
        the others, most of them, are not looked at one by one. Each read builds new lists and swaps them in at
        once, so readers in other threads always see one consistent read."""
        fields, old_raws, order, entries, flips, stale = last
        redo = set(itertools.compress(range(len(raws)), map(operator.ne, raws, old_raws)))
        redo.update(itertools.compress(range(len(raws)), map(operator.ne, map(operator.lt, flips,
                                                                                itertools.repeat(now)), stale)))
        entries, flips, stale = list(entries), list(flips), list(stale)
        fresh = self._parse([i for i in redo if entries[i].raw != raws[i]], raws, now)
        for i in redo:
            entries[i] = fresh.get(i) or entries[i].restated(now)
            flips[i], stale[i] = self._flip(entries[i])
        snaps = list(map(NodeEntry.snapshot.__get__, entries))
        skipped = snaps.count(None)
        nodes = dict(zip(order, snaps))
        if skipped:
            nodes = {node: s for node, s in nodes.items() if s is not None}
        self.entries = dict(zip(order, entries))
        self.last = (fields, list(map(NodeEntry.raw.__get__, entries)), order, entries, flips, stale)
        return nodes, skipped

    def _parse(self, indexes, raws, now):
        """``{index: NodeEntry}`` of the values of ``raws`` at ``indexes``, decoded together (``parse_snapshots``)."""
        values = [raws[i] for i in indexes]
        return dict(zip(indexes, map(NodeEntry, values, *parse_snapshots(values, now, self.slim))))

    @staticmethod
    def _flip(entry):
        """An entry's ``flips`` (infinity: never) and whether it is stale, as ``_aligned`` compares them."""
        return (math.inf if entry.flips is None else entry.flips,
                entry.snapshot is not None and entry.snapshot["state"] == "stale")

    def _last(self, fields, order, entries):
        """What ``_aligned`` compares the next read with: the fields, the values (the entries' own: an unchanged
        value is held once), node ids and entries in the hash's order, each entry's ``flips`` and whether it is stale
        (``_flip``)."""
        flips, stale = zip(*map(self._flip, entries)) if entries else ((), ())
        return fields, list(map(NodeEntry.raw.__get__, entries)), order, entries, list(flips), list(stale)

    def _with_status(self, raw_slim, names):
        """The slim values of the status hash's nodes (``names``); a node without one (an older extension's, or
        written by hand) is read from the status hash, in one more round trip. When both hashes name the same nodes
        (checked at C speed), the slim hash as read."""
        if len(names) == len(raw_slim) and raw_slim.keys() == set(names):
            return raw_slim
        raw = {field: raw_slim[field] for field in names if field in raw_slim}
        missing = [field for field in names if field not in raw_slim]
        if missing:
            raw.update((f, v) for f, v in zip(missing, self.redis.hmget(self.key, missing)) if v is not None)
        return raw

    def node(self, name):
        """``(snapshot with state or None, malformed, now)`` for one node id, in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.key, name)
            pipe.execute_command("TIME")  # pipe.time() is refused in a cluster pipeline
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


def read_snapshots(r, prefix, nodes, now, full=False):
    """``{node: snapshot with state}`` of some nodes, from the slim hash (the status hash for a node without
    a slim value, or with ``full``); nodes gone or malformed are left out."""
    nodes = list(nodes)
    if not nodes:
        return {}
    raws = dict(zip(nodes, r.hmget(status_key(prefix) if full else slim_key(prefix), nodes)))
    missing = [n for n, raw in raws.items() if raw is None]
    if missing:
        raws.update(zip(missing, r.hmget(status_key(prefix), missing)))
    parsed = {n: parse_snapshot(raw, now, not full) for n, raw in raws.items() if raw is not None}
    return {n: s for n, s in parsed.items() if s is not None}


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


def prune_nodes(r, nodes, retention, prefix, now=None):
    """Delete nodes silent for longer than ``retention`` seconds, with their history. Returns their ids."""
    now = time.time() if now is None else now
    gone = [n for n, s in nodes.items() if now - last_report(s) > retention]
    if gone:
        with r.pipeline(transaction=False) as pipe:
            pipe.hdel(status_key(prefix), *gone)
            pipe.hdel(slim_key(prefix), *gone)
            pipe.hdel(control_key(prefix, "commands"), *(f"node:{node}" for node in gone))  # ends with its node
            for node in gone:
                pipe.delete(history_key(prefix, node), trend_key(prefix, node))
                notify(pipe, prefix, "node", node)
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
    "dead": "sum",
}
# The 7- and 90-day history (write-time rollups, monitor_contract.ROLLUP_LUA) combines the same figures once per
# node write, as each write lands in its spider's bucket; a point's figure, by rule:
#   sum      counted since the node's previous write, added up over writes and nodes: pages, items, errors,
#            requests, dead; a point shows the bucket's total and ``<field>_per_min`` over the bucket's span
#   seconds  the node's interval added up per write while it crawls (node-seconds): ``nodes`` is the mean
#            number of nodes crawling over the bucket (node-seconds / bucket seconds); no per-node field needed
#   last     the newest reading by its write time: the queue (every node reads the same shared queue)
#   max      the highest of the nodes' p95 over the bucket, as ``max`` above
ROLLUP_RULES = {
    "pages": "sum", "items": "sum", "errors": "sum", "requests": "sum", "dead": "sum",
    "nodes": "seconds", "queue_requests": "last", "latency_p95": "max",
}
# Fields that only count crawling nodes (a closed node's last rate is not a rate any more).
CRAWLING_FIELDS = frozenset(("cpu", "memory", "net_sent_rate", "net_recv_rate", "rss", "process_cpu",
                             "pages_per_min", "items_per_min", "requests_per_min", "errors_per_min",
                             "latency_p95"))
CRAWLING_STATES = ("live", "paused")
STATES = ("live", "paused", "stale", "closed")


def combine(rows: list[dict], fields: Iterable[str], hosts: Optional[list] = None) -> dict:
    """``{field: figure}`` over ``rows`` (snapshots or history rows, each with a ``timestamp``), by
    SPIDER_FIELDS. ``hosts`` maps each row's position to its host (default: the row's ``host``). A field no
    row has a number for is None. Integer sums stay integers; other figures are rounded to 2 places."""
    order = sorted(range(len(rows)), key=lambda i: _time(rows[i]))
    fields = list(fields)
    by_host = [f for f in fields if SPIDER_FIELDS[f].startswith("host")]
    columns = _columns([rows[i] for i in order], [f for f in fields if f not in by_host])
    if by_host:
        hosts = hosts or [r.get("host", r.get("node")) for r in rows]
        columns.update(_columns({hosts[i]: rows[i] for i in order}.values(), by_host))  # newest per host
    return _combined(columns, fields)


def _combined(columns, fields):
    """``combine``'s figures from ``{field: values}``, each column in time order (a host field's: one value a
    host, its newest)."""
    out = {}
    for field in fields:
        rule = SPIDER_FIELDS[field]
        # Rows come through the gate (decode_snapshot, read_histories): their numbers are finite already.
        values = numbers(columns[field])
        if not values:
            out[field] = None
        elif rule == "newest":
            out[field] = values[-1]
        elif rule == "max":
            out[field] = max(values)
        else:
            ints = set(map(type, values)) == {int}  # checked once, at C speed
            total = sum(values) if ints else finite_sum(values)
            if rule == "host_mean":
                out[field] = round(total / len(values), 2)
            else:
                out[field] = total if ints else round(total, 2)
    return out


def _columns(rows, fields):
    """``{field: [each row's value or None]}``: every row read once."""
    values = [tuple(map(row.get, fields)) for row in rows]
    return dict(zip(fields, zip(*values))) if values else dict.fromkeys(fields, ())


def numbers(values):
    """The ints and floats (not bools) among ``values`` (a sequence), in order, picked at C speed."""
    if set(map(type, values)) <= NUMBER_TYPES:  # the usual column: every node reports the figure
        return list(values)
    return list(itertools.compress(values, map(NUMBER_TYPES.__contains__, map(type, values))))


def _time(row):
    return number(row.get("timestamp"), 0)


def finite_sum(values):
    """An exact sum of finite numbers (ints stay ints); never inf or nan, whatever the inputs' count."""
    if all(issubclass(kind, int) for kind in set(map(type, values))):  # every one an int, checked at C speed
        return sum(values)
    total = math.fsum(values)
    return total if math.isfinite(total) else 0.0


def cluster_view(nodes: dict[str, Snapshot], spider: str,
                 fields: Iterable[str] = tuple(SPIDER_FIELDS)) -> Optional[dict]:
    """One spider over its nodes: newest timestamp, figures by SPIDER_FIELDS, node counts by state, and its
    nodes. ``nodes`` is a ``{node: snapshot}`` mapping as ``list_nodes`` returns; None when it has none.
    ``fields``: only these SPIDER_FIELDS (the alerter needs few)."""
    mine = {n: s for n, s in nodes.items() if s.get("spider") == spider}
    if not mine:
        return None
    view = SpiderColumns(fields).update(list(mine), list(mine.values())).view(spider)
    view["nodes"] = mine
    return view


class SpiderColumns:
    """One spider's nodes as columns, one list per figure ``cluster_view`` reads, in the nodes' order, kept between
    read passes (``spiders_view``'s memo): a pass whose nodes are the last pass's, in the same order, updates only
    the positions whose snapshot is a new object (a NodeReader shares unchanged ones), so a spider of 10,000 nodes
    with a few hundred new reports is not read row by row again. Never modified once made: ``update`` returns a
    new one (API threads share the memo)."""

    def __init__(self, fields=tuple(SPIDER_FIELDS), ids=(), members=(), columns=None):
        self.fields, self.ids, self.members = tuple(fields), ids, members
        self.names = (*self.fields, "timestamp", "state", "host", "start_time")  # a column each
        self.columns = columns or {}

    def update(self, ids, members):
        """The columns of ``members`` (snapshots of the nodes ``ids``), from these where they still hold."""
        if ids == self.ids:
            changed = list(itertools.compress(range(len(members)), map(operator.is_not, members, self.members)))
            if not changed:
                return self
            if len(changed) * 4 <= len(members):  # a few: their positions updated (else all read at C speed)
                columns = {name: list(values) for name, values in self.columns.items()}
                for i in changed:
                    get = members[i].get
                    for name in self.names:
                        columns[name][i] = get(name)
                return SpiderColumns(self.fields, ids, members, columns)
        return SpiderColumns(self.fields, ids, members, {name: list(map(dict.get, members, itertools.repeat(name)))
                                                         for name in self.names})

    @functools.cached_property
    def crawling(self):
        """The node whose history the spider's queue forecast reads (``first_crawling``)."""
        return first_crawling(self.ids, self.columns["start_time"], self.columns["state"])

    def view(self, spider):
        """``cluster_view``'s figures of its ``fields``, without ``nodes``: the crawling nodes' for the rates and gauges
        (every node's gauges when none crawls). Sums are the same in any order; the newest reading, the highest (an
        int or a float of equal value) and each host's newest row are taken in time order (stable: the nodes' order
        among equal times)."""
        cols = self.columns
        times = cols["timestamp"]
        if not (set(map(type, times)) <= NUMBER_TYPES and all(map(math.isfinite, times))):  # gated: at C speed
            times = [number(t, 0) for t in times]
        order = sorted(range(len(self.ids)), key=times.__getitem__)
        pick = operator.itemgetter(*order) if len(order) > 1 else (lambda values: (values[order[0]],))
        crawling = list(map(CRAWLING_STATES.__contains__, cols["state"]))
        rest = [f for f in self.fields if f not in CRAWLING_FIELDS]
        crawl = [f for f in self.fields if f in CRAWLING_FIELDS]
        rates = [f for f in crawl if f.endswith("_per_min")]
        view = {"spider": spider, "timestamp": int(times[order[-1]])}
        view.update(self._combine(order, pick, rest, None))
        if any(crawling):  # gauges and rates over the same nodes
            view.update(self._combine(order, pick, crawl, crawling))
        else:
            view.update(self._combine(order, pick, [f for f in crawl if f not in rates], None))
            view.update(dict.fromkeys(rates))
        view.update({f: view[f] or 0 for f in rates})  # no node crawling: nothing per minute
        counts = collections.Counter(cols["state"])
        view.update({f"nodes_{state}": counts[state] for state in STATES})
        return view

    def _combine(self, order, pick, fields, mask):
        """``combine``'s figures over the rows (``order``: their positions in time order, ``pick`` taking them in
        that order), those of ``mask`` only if given."""
        cols = self.columns
        in_time = mask if mask is None else pick(mask)

        def rows(values, keep):
            return values if keep is None else list(itertools.compress(values, keep))

        columns = {f: rows(pick(cols[f]), in_time) if SPIDER_FIELDS[f] in ("newest", "max") else rows(cols[f], mask)
                   for f in fields if not SPIDER_FIELDS[f].startswith("host")}
        by_host = [f for f in fields if SPIDER_FIELDS[f].startswith("host")]
        if by_host:  # each host's newest row
            newest = {host: i for host, i in zip(rows(pick(self.hosts()), in_time), rows(order, in_time))}
            get = operator.itemgetter(*newest.values(), -1)  # a tuple however few
            columns.update({f: get(cols[f])[:-1] for f in by_host})
        return _combined(columns, fields)

    def hosts(self):
        """Each node's host (its node id when it names none), as ``combine`` reads them."""
        hosts = self.columns["host"]
        return hosts if None not in hosts else [s.get("host", s.get("node")) for s in self.members]

    def started(self):
        """When the first of the nodes started (None if none says)."""
        return min(filter(is_number, numbers(self.columns["start_time"])), default=None) if self.ids else None


# A spider's crawl, derived by readers (``spider_state``), never stored.
CRAWL_STATES = ("crawling", "idle", "finished", "paused")
FINISHED_AFTER = SETTING["MONITOR_FINISHED_AFTER"].default


def queued_work(figures) -> float:
    """Requests and start URLs waiting (what keeps a crawl crawling), from a view's combined queue figures."""
    return sum(number(figures.get(f), 0) for f in ("queue_requests", "queue_start_urls"))


def spider_state(snaps: list, queued, now: float, finished_after: float = FINISHED_AFTER) -> tuple:
    """``(state, idle_for)`` of a spider from its nodes' snapshots (with their ``state``), the entries waiting in
    its requests queue and start URLs (``queued``; None for unknown, as for a spider without scrapy-redis), and
    Redis's clock: ``paused`` when every live node is paused; ``crawling`` while work is queued or a live node was
    busy at its last report (a page, a request in flight or work queued over its last interval: its ``idle_since``
    is that report's ``timestamp``); else ``finished`` once every live node has been idle (its ``idle_since``) for
    ``finished_after`` seconds, ``idle`` before. A spider with no live node and nothing queued is ``finished`` once
    every node closed, ``idle`` while one is stale (it may come back). ``idle_for``: seconds since the last live
    node's last page (None without a live node)."""
    states = list(map(dict.get, snaps, itertools.repeat("state")))  # at C speed: a spider may have 10,000
    live = list(itertools.compress(snaps, map(CRAWLING_STATES.__contains__, states)))
    if live and states.count("paused") == len(live):
        return "paused", None
    if queued or any(number(s.get("idle_since"), -math.inf) >= number(s.get("timestamp"), math.inf)
                     for s in live if s.get("state") == "live"):  # a paused node's report is no work
        return "crawling", None
    if not live:
        return ("idle" if "stale" in states else "finished"), None
    since = []
    for s in live:
        idle = number(s.get("idle_since"))
        since.append(now if idle is None else idle + last_report(s) - number(s.get("timestamp"), 0))
    idle_for = max(now - max(since), 0)
    return ("finished" if idle_for >= finished_after else "idle"), round(idle_for, 1)


def slowed_domains(snaps):
    """``{domain: delay}`` of the domains the nodes report slowed cluster-wide: a slim snapshot's ``domains`` has
    a fourth column, ``delays``, only when one is set (``monitor_contract.slim_domains``); a whole snapshot's
    domains (the views of ``?fields=all``) say each domain's ``delay``."""
    out, listed = {}, list(filter(None, map(dict.get, snaps, itertools.repeat("domains"))))
    if set(map(type, listed)) == {list}:  # slim columns, which have delays only when one is set: found at C speed
        listed = list(itertools.compress(listed, map((3).__lt__, map(len, listed))))
    for domains in listed:
        if domains.__class__ is dict:
            delays = ((name, d.get("delay")) for name, d in domains.items())
        else:
            delays = zip(domains[0], domains[3]) if len(domains) > 3 else ()
        for name, delay in delays:
            if delay:
                out[name] = max(out.get(name, 0), delay)
    return out


def spiders_view(nodes: dict[str, Snapshot], r: Optional[redis.Redis] = None, prefix: Optional[str] = None,
                 now: Optional[float] = None, finished_after: float = FINISHED_AFTER,
                 fields: Iterable[str] = tuple(SPIDER_FIELDS), memo: Optional[dict] = None,
                 histories: Optional[tuple] = None) -> dict[str, dict]:
    """``{spider: cluster view}`` for every spider that has nodes, each view's ``nodes`` a sorted id list and its
    crawl ``state`` and ``idle_for`` (``spider_state``, at ``now`` on Redis's clock, default this process's);
    given a Redis client ``r``, each view also has its queue forecast (``queue_forecasts``). ``fields``: only
    these SPIDER_FIELDS (the queue's are needed for ``state``). ``memo``, a dict kept between calls by one
    reader: a spider whose snapshots are the very objects of the last call (a NodeReader shares unchanged ones)
    keeps its combined figures, so routes reading the same pass combine it once. ``histories``: the forecasts'
    histories read already (``queue_forecasts``' ``read``)."""
    with gc_paused():
        return _spiders_view(nodes, r, prefix, now, finished_after, fields, memo, histories)


def _spiders_view(nodes, r, prefix, now, finished_after, fields, memo, histories):
    groups = spider_groups(nodes)
    out, firsts = {}, {}
    for spider in sorted(groups):
        ids, members = list(groups[spider]), list(groups[spider].values())
        kept = memo.get(spider) if memo is not None else None
        if kept and kept[0].ids == ids and all(map(operator.is_, kept[0].members, members)):
            columns, view = kept[0], dict(kept[1])
        else:
            fresh = not kept or kept[0].fields != tuple(fields)
            columns = (SpiderColumns(fields) if fresh else kept[0]).update(ids, members)
            view = columns.view(spider)
            view["slowed"] = slowed_domains(members)
            view["started"] = columns.started()
            view["nodes"] = sorted(ids)
            if memo is not None:
                memo[spider] = (columns, dict(view))
        view["state"], view["idle_for"] = spider_state(members, queued_work(view), time.time() if now is None else now,
                                                       finished_after)
        out[spider] = view
        firsts[spider] = columns.crawling
    for gone in set(memo or ()) - set(groups):
        memo.pop(gone, None)
    if r is not None:
        for spider, forecast in queue_forecasts(r, nodes, firsts, prefix, now, histories).items():
            out[spider].update(forecast)
    return out


# ---------------------------------------------------------------------------- queue forecast

# The forecast fits the queue size over this much of the recent history: long enough to smooth a crawler's
# bursts, short enough to follow a change of pace.
QUEUE_WINDOW = 300


def queue_forecast(rows: list[dict]) -> dict:
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


def spider_groups(nodes):
    """``{spider: {node: snapshot}}`` of ``nodes``, in their order (one spider's nodes found at C speed)."""
    spiders = set(map(operator.itemgetter("spider"), nodes.values()))
    if len(spiders) <= 1:
        return {spider: nodes for spider in spiders}
    groups = {}
    for node, snapshot in nodes.items():
        groups.setdefault(snapshot["spider"], {})[node] = snapshot
    return groups


def first_crawling(ids, starts, states):
    """Of nodes ``ids`` with these ``start_time`` and ``state`` values (in the same order), the one whose history a
    spider's queue forecast reads, None if none crawls (see ``forecast_nodes``), found at C speed."""
    if not (set(map(type, starts)) <= NUMBER_TYPES and all(map(math.isfinite, starts))):
        starts = [number(start, 0) for start in starts]
    crawling = map(CRAWLING_STATES.__contains__, states)
    return min(itertools.compress(zip(starts, ids), crawling), default=(None, None))[1]


def forecast_nodes(nodes, firsts=None):
    """``({spider: node}, rows)``: whose history each spider's queue forecast reads (its crawling node that started
    first, the lowest id among those that started together: the queue is shared, so one node's readings are the
    spider's; the longest-running one has the most of them), and how many of each one's newest history rows.
    ``firsts``: ``{spider: that node, or None}``, found already (``SpiderColumns.crawling``, ``memo_firsts``)."""
    if firsts is None:
        firsts = {spider: SpiderColumns(()).update(list(members), list(members.values())).crawling
                  for spider, members in spider_groups(nodes).items()}
    chosen = {spider: node for spider, node in firsts.items() if node is not None}
    rows = max((math.ceil(QUEUE_WINDOW / number(nodes[n].get("interval"), DEFAULT_INTERVAL)) + 2
                for n in chosen.values()), default=0)
    return chosen, rows


def memo_firsts(memo):
    """``forecast_nodes``' ``firsts`` of the spiders a ``spiders_view`` with ``memo`` just combined."""
    return {spider: kept[0].crawling for spider, kept in memo.items()}


def queue_forecasts(r, nodes, firsts, prefix=None, now=None, read=None):
    """``{spider: queue_forecast}`` for every spider of ``firsts`` (as ``forecast_nodes`` takes them), in one round
    trip, from the histories of ``forecast_nodes``; ``read``: ``(rows, {node: history rows})`` read already
    (``queue_histories``), used for those nodes when read as many rows. A spider with no crawling node gets None
    figures."""
    chosen, rows = forecast_nodes(nodes, firsts)
    series = {}
    if read is not None and read[0] == rows:
        series = {n: read[1][n] for n in chosen.values() if n in read[1]}
    missing = [n for n in chosen.values() if n not in series]
    if missing:
        series.update(read_histories(r, missing, QUEUE_WINDOW / 60, prefix, now, rows))
    empty = {"queue_rate": None, "queue_eta": None}
    return {spider: queue_forecast(series[chosen[spider]]) if spider in chosen else dict(empty) for spider in firsts}


# ---------------------------------------------------------------------------- histories

# A row this far past ``now`` is from a bad clock or a forgery: dropped, so it cannot widen a chart.
FUTURE_SLACK = 60


def read_histories(r: redis.Redis, nodes: list[str], minutes: float, prefix: str, now: Optional[float] = None,
                   limit: Optional[int] = None) -> dict[str, list[dict]]:
    """``{node: rows}`` for the last ``minutes``, oldest first, each row a dict of HISTORY_FIELDS, in one
    round trip. Up to an hour comes from the full-resolution lists, longer spans (up to a day) from the
    5-minute tier. Values that are not numbers (or too large) read as None; rows without a timestamp in the
    window (``now`` plus FUTURE_SLACK at most) are dropped, and rows are sorted by time. ``limit``: read only
    each list's newest rows."""
    with r.pipeline(transaction=False) as pipe:
        queue_histories(pipe, nodes, minutes, prefix, limit)
        return parse_histories(nodes, pipe.execute(), minutes, now)


def queue_histories(pipe, nodes, minutes, prefix, limit=None):
    """Queue ``read_histories``' commands on ``pipe`` (a caller shares its round trip)."""
    key = history_key if minutes * 60 <= HISTORY_SECONDS else trend_key
    for node in nodes:
        pipe.lrange(key(prefix, node), 0, -1 if limit is None else limit - 1)


def parse_histories(nodes, lists, minutes, now=None):
    """``read_histories``' answer from the replies to ``queue_histories``."""
    now = time.time() if now is None else now
    since, until = now - minutes * 60, now + FUTURE_SLACK
    out = {}
    for node, raws in zip(nodes, lists):
        if isinstance(raws, Exception):  # from a pipeline executed with raise_on_error=False
            raise raws
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


def spider_points(series, holds, hosts, step, last, before=None):
    """One point per ``step``-second bucket up to ``last`` over every node's rows (sorted, in the window),
    combined by ``SPIDER_FIELDS``. A node's last row counts in later buckets until it is
    ``holds[node]`` seconds old (so a late report is not a dip in the totals); its counters (pages, items,
    errors) count for good, as in the cluster view, where a closed or dead node's pages still count.
    ``before``: ``{node: snapshot}`` of nodes whose rows all ended before the window, counted from the
    start. Each row fills at most ``holds / step + 1`` buckets, whatever the stored timestamps."""
    buckets = {}  # bucket -> {node: row}
    for node, rows in series.items():
        for row, following in zip(rows, rows[1:] + [None]):
            start = int(row["timestamp"] // step)
            end = min(int(following["timestamp"] // step) if following else last + 1, last + 1,
                      int((row["timestamp"] + holds[node]) // step) + 1)
            for b in range(start, end):
                buckets.setdefault(b, {})[node] = row
    combined = [f for f in HISTORY_FIELDS if f in SPIDER_FIELDS]
    counters = [f for f in combined if SPIDER_FIELDS[f] == "sum" and f not in CRAWLING_FIELDS]
    fields = [f for f in combined if f not in counters]
    latest = dict(before or {})  # node -> its newest row so far: where its counters stand
    points = []
    for b in sorted(buckets):
        nodes = list(buckets[b])
        rows = [buckets[b][n] for n in nodes]
        latest.update(buckets[b])
        point = {"timestamp": b * step, "nodes": len(rows)}
        point.update(combine(rows, fields, [hosts[n] for n in nodes]))
        point.update(combine(list(latest.values()), counters))
        points.append(point)
    return points


# The buckets' figures in one reply: a line per KEYS bucket, its ROLLUP_FIELDS values comma-separated ('' for a
# field it lacks), an empty line for a bucket that does not exist. Parsing one string is a tenth of the cost of
# 2,160 HGETALL replies.
ROLLUP_FIELDS = tuple(ROLLUP_COUNTERS.values()) + ("n", "q", "l")
READ_ROLLUPS_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  local ok, values = pcall(redis.call, 'HMGET', key, unpack(ARGV))
  local line = {}
  if ok then
    for j = 1, #ARGV do line[j] = (string.gsub(values[j] or '', '[,\\n]', '')) end
  end
  out[i] = (string.gsub(table.concat(line, ','), '^,*$', ''))
end
return table.concat(out, '\\n')
"""


def read_rollups(r: redis.Redis, prefix: str, spider: str, days: int, now: float) -> dict:
    """``{"spider", "days", "step", "points"}``: the spider's rollup buckets of the last ``days`` (7: 10-minute
    points, 90: hourly; monitor_contract.ROLLUP_TIERS), oldest first, one round trip. Buckets nobody wrote are
    left out; a figure a bucket lacks is None (0 for counters). Rates are over the part of the bucket gone by."""
    step = ROLLUP_STEPS[days]
    last = int(now) // step
    starts = [(last - i) * step for i in range(days * 86400 // step - 1, -1, -1)]
    keys = [rollup_key(prefix, spider, step, start) for start in starts]
    lines = as_text(r.eval(READ_ROLLUPS_LUA, len(keys), *keys, *ROLLUP_FIELDS)).split("\n")
    points = [rollup_point(line.split(","), start, step, now) for start, line in zip(starts, lines) if line]
    return {"spider": spider, "days": days, "step": step, "points": points}


ROLLUP_STEPS = {keep // 86400: step for step, keep in ROLLUP_TIERS}


def read_markers(r: redis.Redis, prefix: str, spider: str, since: float) -> list:
    """The spider's version markers since ``since``, oldest first: ``[{"at", "version", "node"}]``; malformed
    entries skipped."""
    out = []
    for raw in r.lrange(markers_key(prefix, spider), 0, -1):
        try:
            marker = loads(raw)
        except ValueError:
            continue
        if (isinstance(marker, dict) and is_number(marker.get("at")) and marker["at"] >= since
                and isinstance(marker.get("version"), str)):
            out.append({"at": marker["at"], "version": marker["version"], "node": str(marker.get("node", ""))})
    return out[::-1]


RATE_NAMES = tuple(f"{f}_per_min" for f in ROLLUP_COUNTERS)


def rollup_point(values, start, step, now):
    """One history point from a bucket's ROLLUP_FIELDS values (text; see ROLLUP_RULES). Counters and the
    queue read as whole numbers below 1e18 (else 0 and None), p95 as a finite number (else None)."""
    values = (list(values) + [""] * len(ROLLUP_FIELDS))[:len(ROLLUP_FIELDS)]
    wholes, p95 = values[:-1], values[-1]
    digits = "".join(wholes)
    if digits.isdigit() and digits.isascii() and max(map(len, wholes)) < 19:  # the usual bucket, checked at once
        ints = [int(t) if t else None for t in wholes]
    else:
        ints = [int(t) if t.isdigit() and t.isascii() and len(t) < 19 else None for t in wholes]
    span = min(step, max(now - start, 1.0))
    per_min = 60 / span
    counts = [c or 0 for c in ints[:len(ROLLUP_COUNTERS)]]
    point = {"timestamp": start}
    point.update(zip(ROLLUP_COUNTERS, counts))
    point.update(zip(RATE_NAMES, [round(c * per_min, 2) for c in counts]))
    node_ms, queue = ints[len(ROLLUP_COUNTERS):]
    point["nodes"] = round((node_ms or 0) / 1000 / span, 2)
    point["queue_requests"] = queue
    try:
        p95 = float(p95)
    except ValueError:
        p95 = None
    point["latency_p95"] = p95 if p95 is not None and math.isfinite(p95) and 0 <= p95 < NUMBER_LIMIT else None
    return point
