"""Every node's snapshot, as the API and the alerter read it: ``NodeReader`` (one round trip, decoding only what
changed, with the housekeeping readers do: lost runs, pruning), the API's change feed (``ChangeFeed``: from
FEED_FROM nodes a read takes only the nodes written since the last one) and the garbage collector's pause around
bulk decodes. The figures derived from the nodes (spider views, forecasts, histories) are monitor_read.py's. It
imports nothing of Scrapy, Twisted or psutil.
"""

import contextlib
import gc
import itertools
import logging
import math
import operator
import queue
import threading
import time
from typing import Optional

import redis

from monitor_contract import (
    Snapshot,
    as_text,
    control_key,
    events_channel,
    history_key,
    insight_key,
    is_number,
    notify,
    redis_now,
    run_claim_key,
    slim_key,
    status_key,
    trend_key,
)
from monitor_records import RUNS_KEEP, record_lost_runs
from monitor_settings import connect  # every Redis URL a setting takes: Sentinel and Cluster too
from monitor_snapshot import last_report, node_state, parse_snapshot, parse_snapshots, stale_after

logger = logging.getLogger(__name__)


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
    """An API process's one subscription to the change notifications (``events_channel``), started with its reader: it
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
        """``(generation, the stored fields of the nodes written since the last take)``; None while not subscribed (its
        reader started it)."""
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
        # (JSON, its digest): without insight.BIG_FIELDS, as list views send it; with every field (?fields=all)
        self.json = self.full = None
        self.projection = None  # (fields, (JSON, digest)) of the last ?fields= projection asked for

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
        if feed is not None:
            feed.start()  # subscribed by the first read, which the next one can then build on
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
        if self.feed is None:
            return self._read_whole(None, now)
        with self.lock:
            if self.last is not None and len(self.last[0]) >= FEED_FROM:
                return self._read_fed(now)
            return self._read_whole(self.feed.take(), now)  # from here on the feed's notifications are followed

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
            pipe.hdel(insight_key(prefix), *gone)
            pipe.hdel(control_key(prefix, "commands"), *(f"node:{node}" for node in gone))  # ends with its node
            for node in gone:
                pipe.delete(history_key(prefix, node), trend_key(prefix, node))
                notify(pipe, prefix, "node", node)
                if is_number(nodes[node].get("start_time")):  # a lost run stays correctable a while longer
                    pipe.expire(run_claim_key(prefix, node, nodes[node]["start_time"]), CLAIM_AFTER_PRUNE)
            pipe.execute()
    return gone
