"""Push (issue 22, section 1): GET /events streams what nodes, the alerter and the API write, as they write it.

Against the real things: a private redis-server, the API on a real waitress server, raw sockets for the client
that reads nothing.
"""

import concurrent.futures
import contextlib
import socket
import time
import zlib

import pytest
import requests

import monitor_api
import monitor_events
from monitor_alert_state import Lock, Store
from testbed import EventReader, make_app, publish, reporting, snapshot
from testbed_servers import serving, wait_for

NODE = "main_spider:h:1"
GZIP = "gzip, deflate, br, zstd"  # what Chromium's EventSource sends


def served(redis_url, **config):
    """The app, and a context serving it that ends once every stream saw its client leave."""
    app = make_app(redis_url, **config)

    @contextlib.contextmanager
    def server():
        with serving(app, threads=monitor_api.threads(app)) as base:  # conftest stops the hub after the test
            yield base
            wait_for(lambda: app.extensions["events"].streams == 0, what="the streams to end")

    return app, server()


def test_the_stream_delivers_a_write_a_stale_transition_an_alert_and_a_control_command(redis_url, redis_client):
    app, server = served(redis_url)
    with server as base:
        stream = EventReader(base)
        try:
            assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
            hello = stream.wait("hello")
            assert hello["now"] > 0 and stream.last_id

            # A node's write: its list-view fields and state, not the big insight fields, within a push.
            written = time.monotonic()
            publish(redis_client, snapshot(NODE, interval=1.0, domains={"a.example": {"pages": 1}}), stamp=True)
            nodes = stream.wait("nodes", lambda d: NODE in d["nodes"])
            assert time.monotonic() - written < 1.0
            snap = nodes["nodes"][NODE]
            assert snap["state"] == "live" and snap["pages"] == 12345 and "seen" in snap
            assert "domains" not in snap and "latency_buckets" not in snap
            assert abs(nodes["now"] - snap["seen"]) < 2

            # Nobody writes live -> stale: the stream says so when three intervals pass in silence.
            states = stream.wait("states", lambda d: NODE in d, timeout=6)
            assert states[NODE] == "stale"
            assert time.time() - snap["seen"] >= 3  # not before it is true

            # An alert the alerter writes.
            lock = Lock(redis_client, "scrapy")
            assert lock.acquire()
            record = {"state": "firing", "since": time.time(), "alertname": "ScrapyNodeDown", "severity": "critical",
                      "spider": "main_spider", "host": "worker-1", "value": 40, "threshold": 30}
            Store(redis_client, "scrapy", lock).write({f"down:{NODE}": record}, {}, {})
            alerts = stream.wait("alerts", lambda d: d["alerts"])
            assert alerts["alerts"][0]["alertname"] == "ScrapyNodeDown" and alerts["alerts"][0]["node"] == NODE

            # A control command through the API: what it is, not who sent it or why.
            publish(redis_client, snapshot(NODE, interval=10.0), stamp=True)
            stream.wait("nodes", lambda d: d["nodes"].get(NODE, {}).get("state") == "live")
            answer = requests.post(f"{base}/control", json={"command": "pause", "node": NODE, "comment": "why"},
                                   timeout=5)
            assert answer.status_code == 202, answer.text
            control = stream.wait("control", lambda d: True)
            assert control == [{"id": answer.json()["id"], "command": "pause", "target": f"node:{NODE}",
                                "at": answer.json()["at"]}]
        finally:
            stream.close()


def test_reconnecting_with_last_event_id_loses_nothing_and_a_lost_id_gets_reset(redis_url, redis_client):
    app, server = served(redis_url, MONITOR_EVENTS_KEEP=100)
    with server as base:
        first = EventReader(base)
        first.wait("hello")
        publish(redis_client, snapshot("a:h:1"), stamp=True)
        first.wait("nodes", lambda d: "a:h:1" in d["nodes"])
        last = first.last_id
        first.close()

        # Written while no client listens: the reconnect with Last-Event-ID gets all of it, coalesced.
        publish(redis_client, snapshot("a:h:2"), snapshot("a:h:3"), stamp=True)
        publish(redis_client, snapshot("a:h:2", pages=7), stamp=True)
        wait_for(lambda: app.extensions["events"].known.keys() >= {"a:h:2", "a:h:3"}, what="the hub reading them")
        again = EventReader(base, headers={"Last-Event-ID": last, "Accept-Encoding": GZIP})  # as browsers ask
        try:
            got = again.wait("nodes", lambda d: True)
            assert set(got["nodes"]) == {"a:h:2", "a:h:3"} and got["nodes"]["a:h:2"]["pages"] == 7
            assert again.last_id != last
        finally:
            again.close()

        # An id this process never gave (another API, before a restart), or one the ring no longer holds: reset.
        other = EventReader(base, path="/events?last=00000000-1")
        other.wait("hello")
        assert "restarted" in other.wait("reset")["reason"]
        other.close()
        for i in range(3):
            publish(redis_client, *(snapshot(f"b:h:{n}", pages=i) for n in range(60)), stamp=True)
            time.sleep(0.2)
        wait_for(lambda: app.extensions["events"].seq > 150, what="150 changes")
        old = EventReader(base, headers={"Last-Event-ID": last, "Accept-Encoding": GZIP})
        assert "too old" in old.wait("reset")["reason"]
        old.close()


@pytest.mark.parametrize("blocks", [
    [b"retry: 2000\n\n"],
    [b":\n\n", b":\n\n"],
    [b"event: nodes\ndata: " + b'{"pages": 1}' * 500 + b"\n\n", b""],
    [bytes(range(256)) * 300, b"event: x\ndata: 1\n\n", b"abc" * 50000],
])
def test_packed_blocks_decode_as_they_arrive_whatever_came_before(blocks):
    # A packed block is decoded whole as soon as it arrives, and refers to nothing before it: streams with
    # different beginnings (each its own hello) share the same packed push.
    for opening in (b"", b"event: hello\ndata: {}\n\n", b"q" * 70000):
        unzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
        assert unzip.decompress(monitor_events.GZIP_HEADER + monitor_events.packed(opening)) == opening
        for block in blocks:
            assert unzip.decompress(monitor_events.packed(block)) == block
    assert monitor_events.PACKED_KEEPALIVE == monitor_events.packed(b":\n\n")


def test_a_client_that_takes_gzip_gets_each_push_gzipped_and_decodable_as_it_arrives(redis_url, redis_client):
    # The stream never ends, so a push the client could not decode until more came would never show: each push is
    # a block of its own, flushed. Beside it an identity stream says the same, in several times the bytes.
    app, server = served(redis_url)
    with server as base:
        zipped, plain = EventReader(base, headers={"Accept-Encoding": GZIP}), EventReader(base)
        try:
            assert zipped.headers["Content-Encoding"] == "gzip" and "Accept-Encoding" in zipped.headers["Vary"]
            assert "Content-Encoding" not in plain.headers
            names = {f"main_spider:h:{n}" for n in range(50)}
            seen = []
            for stream in (zipped, plain):
                stream.wait("hello")
            publish(redis_client, *(snapshot(n, pages=len(n)) for n in sorted(names)), stamp=True)
            for stream in (zipped, plain):
                got = {}
                while not names <= got.keys():
                    got.update(stream.wait("nodes", lambda d: True)["nodes"])
                seen.append(got)
            assert seen[0] == seen[1] and seen[0]["main_spider:h:7"]["pages"] == len("main_spider:h:7")
            assert 0 < zipped.wire * 4 < plain.wire
        finally:
            zipped.close()
            plain.close()


def test_a_client_that_reads_nothing_is_dropped_and_its_thread_freed(redis_url, redis_client):
    app, server = served(redis_url, MONITOR_EVENTS_DROP=1, MONITOR_EVENTS_CLIENTS=1)
    hub = app.extensions["events"]
    with server as base:
        port = int(base.rsplit(":", 1)[1])
        quiet = socket.socket()
        quiet.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window: the backlog shows soon
        quiet.connect(("127.0.0.1", port))
        quiet.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        wait_for(lambda: hub.streams == 1, what="the stream open")
        # The one stream slot is taken: another client is told to poll.
        refused = requests.get(f"{base}/events", timeout=5)
        assert refused.status_code == 503 and "poll /metrics" in refused.json()["error"]
        big = "x" * 20000
        for i in range(40):  # changes keep coming; the client takes none of them
            publish(redis_client, *(snapshot(f"n:h:{n}", pages=i, note=big) for n in range(100)), stamp=True)
            if hub.streams == 0:
                break
            time.sleep(0.25)
        wait_for(lambda: hub.streams == 0, timeout=10, what="the unread stream dropped")
        # Its slot and thread are free: a reading client gets a stream, and the other routes answer.
        assert requests.get(f"{base}/metrics", timeout=5).status_code == 200
        reader = EventReader(base)
        reader.wait("hello")
        reader.close()
        quiet.close()


def test_streams_never_take_the_other_routes_threads(redis_url, redis_client):
    publish(redis_client, snapshot(NODE), stamp=True)
    app, server = served(redis_url, MONITOR_EVENTS_CLIENTS=3)
    with server as base:
        streams = [EventReader(base) for _ in range(3)]
        for s in streams:
            s.wait("hello")
        assert EventReader(base).status == 503
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(20) as pool:  # more at once than the streams leave, if they took
            codes = list(pool.map(lambda _: requests.get(f"{base}/metrics", timeout=5).status_code, range(20)))
        assert codes == [200] * 20 and time.monotonic() - started < 5
        for s in streams:
            s.close()


def test_with_a_token_the_stream_takes_a_short_lived_ticket_not_the_token_in_its_url(redis_url, redis_client):
    app, server = served(redis_url, MONITOR_API_TOKEN="s3cret")
    with server as base:
        assert EventReader(base).status == 401
        assert requests.post(f"{base}/events/ticket", timeout=5).status_code == 401
        answer = requests.post(f"{base}/events/ticket", headers={"Authorization": "Bearer s3cret"}, timeout=5)
        assert answer.status_code == 200 and answer.json()["expires_in"] == 60
        ticket = answer.json()["ticket"]
        assert "s3cret" not in ticket
        stream = EventReader(base, path=f"/events?ticket={ticket}")
        assert stream.status == 200
        stream.wait("hello")
        stream.close()
        wrong = EventReader(base, path="/events?ticket=nope")
        assert wrong.status == 401 and "ticket" in wrong.body.decode()
        # A ticket opens /events only.
        assert requests.get(f"{base}/metrics?ticket={ticket}", timeout=5).status_code == 401


def test_past_fanout_streams_each_stream_pushes_less_often(redis_url, redis_client, monkeypatch):
    # All the streams together push about FANOUT / PUSH_EVERY times a second: with FANOUT 1, three streams push
    # each every 0.75 s, however often the node writes.
    monkeypatch.setattr(monitor_events, "FANOUT", 1)
    assert [monitor_events.push_every(n) for n in (0, 1, 2, 3)] == [0.25, 0.25, 0.5, 0.75]
    app, server = served(redis_url)
    with server as base:
        streams = [EventReader(base) for _ in range(3)]
        for s in streams:
            s.wait("hello")
        times = []
        with reporting(lambda: publish(redis_client, snapshot(NODE), stamp=True), every=0.05):
            while len(times) < 4:
                name, _, data, arrived = streams[0].events.get(timeout=5)
                if name == "nodes":
                    times.append(arrived)
        for s in streams:
            s.close()
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.7, gaps
