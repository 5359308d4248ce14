"""Push for GET /events: one Redis subscription to the change notifications, fanned out to every open stream.

Writers publish on ``events_channel(prefix)`` (monitor_contract): a node's snapshot write publishes ``node <id>``
in the same script, pruning publishes the ids it deletes, the alerter and the silence routes ``alerts``, a
control command ``control <JSON>``. The API process's one subscription (``monitor_nodes.ChangeFeed``, which also
tells the node reader what changed) hands them to its ``Hub``, whose thread reads what changed (the changed nodes
in one HMGET), computes live -> stale when it becomes true (a change nobody writes), and appends numbered entries
to a bounded in-memory ring. Each stream (a waitress worker thread, see ``Stream``) sends what came after its
cursor, coalesced, at most every PUSH_EVERY seconds (longer past FANOUT streams: ``push_every``); a client that
reconnects with ``Last-Event-ID`` gets what it missed, or ``reset`` when the ring no longer holds it.
"""

import heapq
import itertools
import logging
import os
import queue
import socket
import threading
import time
import zlib

import redis

from monitor_alert_state import read_alerts
from monitor_cache import takes_gzip
from monitor_contract import DEFAULT_INTERVAL, STALE_INTERVALS, as_text, dumps, number, redis_now, slim, status_key
from monitor_nodes import ChangeFeed
from monitor_settings import Outage, connect, redact, scrub
from monitor_snapshot import last_report, parse_snapshot

logger = logging.getLogger("monitor_api")

# A stream sends at most one push (its coalesced changes) per this many seconds: 4 a second.
PUSH_EVERY = 0.25
# Past this many open streams each one pushes less often, so that all of them together push about FANOUT / PUSH_EVERY
# times a second (400): the pushes' bytes go through waitress's one I/O thread, which the other routes' answers
# wait behind (at 200 streams, every 0.5 s).
FANOUT = 100
# An idle stream sends a comment line this often (11 bytes with chunk framing: under 50 bytes a minute), which
# keeps proxies from closing it and shows when its client left.
KEEPALIVE = 15.0
# A waiting stream looks at its client (gone? reading?) at least this often.
CHECK_EVERY = 1.0
# After a notification the hub waits this long for more before it reads, so a burst costs one read.
GATHER = 0.05
# Nodes read per HMGET; the Redis timeout of the hub's reads (a read of thousands of nodes takes a while).
READ_BATCH = 1000
READ_TIMEOUT = 5.0
# A stream whose client has this many bytes not yet taken writes nothing more until they go (or it is dropped).
MAX_BACKLOG = 1 << 20
# EventSource reconnects this many milliseconds after a lost stream.
RETRY_MS = 2000
# A stream to a client that takes gzip (browsers do) is gzipped: this header, then each message block (a push, a
# keep-alive) compressed on its own (``packed``), once for every stream at the same cursor. Pushes are mostly the
# same field names again and again: gzip sends about a tenth of their bytes through the server's one I/O thread.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


class Hub:
    """The API's one subscription and the ring of numbered changes every stream reads (see the module doc).
    ``keep``: entries kept for replay; ``limit``: streams open at once at most; ``drop_after``: seconds a client
    may leave sent data unread before its stream ends."""

    def __init__(self, url, prefix, keep, limit, drop_after, feed=None):
        self.url, self.prefix = url, prefix
        self.own_feed = feed is None
        self.feed = ChangeFeed(url, prefix) if feed is None else feed  # the API's one subscription
        self.key = status_key(prefix)
        self.keep, self.limit, self.drop_after = keep, limit, drop_after
        self.boot = os.urandom(4).hex()  # ids of another process (an API restart) are too old: reset
        self.cond = threading.Condition()
        self.ring = []  # (seq, kind, key, data), oldest first, at most ``keep`` (trimmed in halves)
        self.seq = 0
        self.streams = 0
        self.known = {}  # node -> (report time, stale deadline or None, state)
        self.deadlines = []  # heap of (deadline on Redis's clock, node)
        self.offset = 0.0  # Redis's clock minus time.time()
        self.alerts_seen = None
        self.memo = {}  # (cursor, gzipped) -> (seq, bytes): streams at the same cursor share one push
        self.woken, self.unwoken = 0.0, False  # streams are woken at most every ``every``, all at once
        self.thread = None
        self.stopped = False
        self.ready = threading.Event()
        self.outage = Outage(logger)

    # ------------------------------------------------------------ the subscription (one thread)

    def start(self):
        """Start the subscription thread once; wait (a little) until it is subscribed."""
        with self.cond:
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="monitor-events", daemon=True)
                self.thread.start()
        self.ready.wait(2.0)

    def stop(self):
        """End the streams and the hub's thread (it reads nothing more: it is gone within CHECK_EVERY), and the
        subscription if it is the hub's own."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.own_feed:
            self.feed.stop()

    def run(self):
        client = connect(self.url, READ_TIMEOUT)
        messages, synced = self.feed.listen(), False
        try:
            while not self.stopped:
                try:
                    if not synced:
                        subscribed = self.feed.subscribed  # else a new subscription follows: read again then
                        self.resync(client)  # after subscribing: nothing written meanwhile is missed
                        self.outage.ok("Events: Redis at %s answers again", redact(str(self.url)))
                        if subscribed:
                            self.ready.set()
                    synced = self.listen(client, messages)
                except redis.RedisError as exc:
                    synced = False
                    self.outage.failed("Events: Redis at %s is unavailable (%s): streams wait for it",
                                       redact(str(self.url)), scrub(exc, self.url))
                    time.sleep(CHECK_EVERY)
        finally:
            self.feed.unlisten(messages)

    def listen(self, client, messages):
        """Wait for notifications (until the next stale deadline at most), gather a burst, apply it; False when
        the feed subscribed anew (what came meanwhile is unknown: everything is read again)."""
        wait = CHECK_EVERY
        if self.deadlines:
            wait = min(wait, self.deadlines[0][0] - self.redis_clock())
        if self.unwoken:
            wait = min(wait, self.woken + self.every - time.monotonic())
        data = _next(messages, max(wait, 0.01))
        nodes, controls, alerts = set(), [], False
        until = time.monotonic() + GATHER
        while data is not False:
            if data is None:
                return False
            kind, _, name = as_text(data).partition(" ")
            if kind == "node" and name:
                nodes.add(name)
            elif kind == "control" and name:
                controls.append(name.encode())
            elif kind == "alerts":
                alerts = True
            left = until - time.monotonic()
            if left <= 0 or len(nodes) >= 10 * READ_BATCH:
                break
            data = _next(messages, left)
        if self.stopped:
            return True
        entries = self.read_nodes(client, nodes) if nodes else []
        if alerts:
            entries += self.read_alerts(client)
        entries += [("control", None, c) for c in controls]
        self.append(entries + self.expired())
        self.wake()
        return True

    def wake(self):
        """Wake the streams if changes wait and they were not woken within ``every``: all at once, so they push
        together, at the same cursor, sharing one push (``memo``) and the GIL's turns."""
        with self.cond:
            if self.unwoken and time.monotonic() - self.woken >= self.every:
                self.woken, self.unwoken = time.monotonic(), False
                self.cond.notify_all()

    def redis_clock(self):
        return time.time() + self.offset

    @property
    def every(self):
        """Seconds between two pushes of a stream now (``push_every`` of the streams open)."""
        return push_every(self.streams)

    def read_nodes(self, client, names):
        """Entries for the changed nodes: their list-view snapshot with state, or null once deleted."""
        names = sorted(names)
        with client.pipeline(transaction=False) as pipe:
            pipe.execute_command("TIME")  # pipe.time() is refused in a cluster pipeline
            for i in range(0, len(names), READ_BATCH):
                pipe.hmget(self.key, names[i:i + READ_BATCH])
            server_now, *parts = pipe.execute()
        now = redis_now(server_now)
        self.offset = now - time.time()
        entries = []
        for node, raw in zip(names, itertools.chain.from_iterable(parts)):
            entry = self.track(node, raw, now)
            if entry is not None:
                entries.append(entry)
        return entries

    def track(self, node, raw, now):
        """Remember one node's report time and stale deadline; its entry (None for a malformed value: readers
        skip it too)."""
        snapshot = None if raw is None else parse_snapshot(raw, now)
        if snapshot is None:
            if raw is not None or self.known.pop(node, None) is None:
                return None
            return "node", node, b"null"
        reported = last_report(snapshot)
        deadline = None
        if snapshot["state"] in ("live", "paused"):
            interval = number(snapshot.get("interval"), DEFAULT_INTERVAL) or DEFAULT_INTERVAL
            deadline = reported + STALE_INTERVALS * interval
            heapq.heappush(self.deadlines, (deadline, node))
        self.known[node] = (reported, deadline, snapshot["state"])
        return "node", node, dumps(slim(snapshot)).encode()

    def expired(self):
        """``state`` entries for the nodes that turned stale since the last look (live -> stale is written by
        nobody: it happens when a node stays silent)."""
        now, entries = self.redis_clock(), []
        while self.deadlines and self.deadlines[0][0] < now:
            deadline, node = heapq.heappop(self.deadlines)
            known = self.known.get(node)
            if known is not None and known[1] == deadline:
                self.known[node] = (known[0], None, "stale")
                entries.append(("state", node, b'"stale"'))
        return entries

    def read_alerts(self, client):
        """An ``alerts`` entry with the /alerts body, when what it lists changed."""
        body = read_alerts(client, self.prefix)
        seen = dumps({k: v for k, v in body.items() if k not in ("now", "alerter")})
        if seen == self.alerts_seen:
            return []
        self.alerts_seen = seen
        return [("alerts", None, dumps(body).encode())]

    def resync(self, client):
        """Read every node (at start, and after the subscription was lost): entries for what changed meanwhile."""
        with client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.key)
            pipe.execute_command("TIME")  # pipe.time() is refused in a cluster pipeline
            raw_hash, server_now = pipe.execute()
        now = redis_now(server_now)
        self.offset = now - time.time()
        first = not self.known and not self.seq
        before, self.known, self.deadlines = self.known, {}, []
        entries = []
        for field, raw in raw_hash.items():
            node = as_text(field)
            entry = self.track(node, raw, now)
            if entry is not None and (before.get(node) or (None,))[0] != self.known[node][0]:
                entries.append(entry)
        entries += [("node", node, b"null") for node in before if node not in self.known]
        self.alerts_seen = None
        if not first:
            self.append(entries + self.read_alerts(client))

    def append(self, entries):
        """Number ``entries`` and wake the streams."""
        if not entries:
            return
        with self.cond:
            for kind, key, data in entries:
                self.seq += 1
                self.ring.append((self.seq, kind, key, data))
            if len(self.ring) > self.keep:
                del self.ring[:len(self.ring) - self.keep // 2 or 1]
            self.memo = {}
            self.unwoken = True
        self.wake()

    # ------------------------------------------------------------ what streams read

    def open(self, last_id, environ):
        """A Stream from ``Last-Event-ID`` (None: from now), or None when ``limit`` streams are open."""
        with self.cond:
            if self.streams >= self.limit:
                return None
            self.streams += 1
        self.start()
        cursor, why = self.cursor_of(last_id)
        return Stream(self, cursor, why, environ)

    def cursor_of(self, last_id):
        """``(cursor, why a reset is needed or None)`` for a Last-Event-ID."""
        with self.cond:
            if not last_id:
                return self.seq, None
            boot, _, seq = last_id.partition("-")
            if boot != self.boot or not seq.isdigit() or int(seq) > self.seq:
                return self.seq, "the API restarted since that event"
            first = self.ring[0][0] if self.ring else self.seq + 1
            if int(seq) < first - 1:
                return self.seq, "that event is too old to replay"
            return int(seq), None

    def since(self, cursor, gzipped=False):
        """``(the push for the changes after cursor, the new cursor)``; ``gzipped``: ``packed``."""
        with self.cond:
            top = self.seq
            memo = self.memo.get((cursor, gzipped))
            if memo is not None and memo[0] == top:
                return memo[1], top
            first = self.ring[0][0] if self.ring else top + 1
            if cursor < first - 1:
                data = self.reset("the stream fell too far behind", top)
                return (packed(data) if gzipped else data), top
            entries = self.ring[cursor - first + 1:]
            now = self.redis_clock()
        data = self.push(entries, cursor, top, now)
        if gzipped:
            data = packed(data)
        with self.cond:
            if self.seq == top:
                self.memo[(cursor, gzipped)] = (top, data)
        return data, top

    def push(self, entries, cursor, top, now):
        """The SSE messages for ``entries``, coalesced: ``nodes`` (the newest snapshot of each node changed, or
        null), ``states`` (state changes not followed by a snapshot), ``alerts`` (the newest /alerts body),
        ``control`` (the commands, in order). Every message has an id: the last one the push's end, the others
        its start, so a stream cut in the middle of a push gets it whole again."""
        nodes, states, alerts, controls = {}, {}, None, []
        for _, kind, key, data in entries:
            if kind == "node":
                nodes[key] = data
                states.pop(key, None)
            elif kind == "state":
                states[key] = data
            elif kind == "alerts":
                alerts = data
            else:
                controls.append(data)
        parts = []
        if nodes:
            parts.append((b"nodes", b'{"now":%.3f,"nodes":{%s}}' % (now, b",".join(
                dumps(k).encode() + b":" + v for k, v in nodes.items()))))
        if states:
            parts.append((b"states", b"{%s}" % b",".join(dumps(k).encode() + b":" + v for k, v in states.items())))
        if alerts is not None:
            parts.append((b"alerts", alerts))
        if controls:
            parts.append((b"control", b"[%s]" % b",".join(controls)))
        return b"".join(b"event: %s\nid: %s-%d\ndata: %s\n\n" % (
            event, self.boot.encode(), top if i == len(parts) - 1 else cursor, data) for i, (event, data) in
            enumerate(parts))

    def reset(self, why, top):
        return b'event: reset\nid: %s-%d\ndata: %s\n\n' % (self.boot.encode(), top, dumps({"reason": why}).encode())

    def hello(self, cursor):
        return b'retry: %d\nevent: hello\nid: %s-%d\ndata: {"now":%.3f}\n\n' % (
            RETRY_MS, self.boot.encode(), cursor, self.redis_clock())


class Stream:
    """One client's stream: a WSGI response body that blocks its worker thread between pushes. It ends when the
    client goes, when the client leaves sent data unread for ``drop_after`` seconds (waitress: the bytes its
    channel could not hand to the socket), or when the hub stops."""

    def __init__(self, hub, cursor, why, environ):
        self.hub, self.cursor = hub, cursor
        self.gzipped = takes_gzip(environ)
        first = hub.hello(cursor) + (hub.reset(why, cursor) if why else b"")
        self.pending = [GZIP_HEADER + packed(first) if self.gzipped else first]
        self.disconnected = environ.get("waitress.client_disconnected") or (lambda: False)
        self.socket_channel = getattr(self.disconnected, "__self__", None)  # waitress's channel: its unsent bytes
        self.peer = environ.get("REMOTE_ADDR", "")
        self.pushed = 0.0
        self.wrote = time.monotonic()
        self.written = self.delivered = 0
        self.stuck_since = None
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self):
        if self.pending:
            return self.sent(self.pending.pop(0))
        hub = self.hub
        while True:
            if self.closed or hub.stopped or self.disconnected() or self.hung_up() or self.unread():
                self.close()
                raise StopIteration
            now, seen = time.monotonic(), hub.seq
            backlog = self.backlog()
            if seen > self.cursor and backlog < MAX_BACKLOG:
                wait = self.pushed + hub.every - now
                if wait <= 0:
                    data, self.cursor = hub.since(self.cursor, self.gzipped)
                    self.pushed = now
                    return self.sent(data)
                time.sleep(min(wait, CHECK_EVERY))  # news to send, not yet: more news would change nothing
                continue
            elif backlog:
                wait = CHECK_EVERY  # the client has not taken what was sent: nothing more until it does
            else:
                wait = self.wrote + KEEPALIVE - now
                if wait <= 0:
                    return self.sent(PACKED_KEEPALIVE if self.gzipped else b":\n\n")
            with hub.cond:
                if hub.seq == seen and not hub.stopped:
                    hub.cond.wait(min(max(wait, 0.01), CHECK_EVERY))

    def sent(self, data):
        self.written += len(data)
        self.wrote = time.monotonic()
        return data

    def hung_up(self):
        """Whether the client closed its end (waitress reads nothing from a connection while it serves a request,
        so the stream looks: a peek that finds the end of the data)."""
        sock = getattr(self.socket_channel, "socket", None)
        if sock is None:
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def backlog(self):
        """Bytes written to the connection that it has not sent yet (0 when the server does not say)."""
        return getattr(self.socket_channel, "total_outbufs_len", 0) or 0

    def unread(self):
        """Whether the client has taken nothing of what was sent for ``drop_after`` seconds."""
        unsent = self.backlog()
        delivered = self.written - unsent
        if not unsent or delivered > self.delivered:
            self.delivered, self.stuck_since = max(delivered, self.delivered), None
            return False
        if self.stuck_since is None:
            self.stuck_since = time.monotonic()
        if time.monotonic() - self.stuck_since < self.hub.drop_after:
            return False
        logger.info("Dropped an event stream to %s: it read nothing for %g s", self.peer, self.hub.drop_after)
        return True

    def close(self):
        if not self.closed:
            self.closed = True
            with self.hub.cond:
                self.hub.streams -= 1


def push_every(streams):
    """Seconds between two pushes of each of ``streams`` open streams: PUSH_EVERY, longer past FANOUT streams so
    that together they push at most FANOUT / PUSH_EVERY times a second."""
    return PUSH_EVERY * max(1.0, streams / FANOUT)


def packed(data):
    """``data`` as a raw deflate block that follows any other in a gzip stream: compressed alone (no reference to
    what came before) and ended on a byte boundary by a sync flush, so the client decodes it as soon as it arrives.
    The stream is never finished: it ends with its connection, as an uncompressed one does."""
    squeeze = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return squeeze.compress(data) + squeeze.flush(zlib.Z_SYNC_FLUSH)


PACKED_KEEPALIVE = packed(b":\n\n")


def _next(messages, timeout):
    """The next notification's data from a ``ChangeFeed.listen`` queue (None: subscribed anew), False if none came
    within ``timeout`` seconds."""
    try:
        return messages.get(timeout=timeout)
    except queue.Empty:
        return False
