"""Benchmark push (GET /events) at 1,000 nodes with 200 stream clients: write to card painted, /metrics, idle cost.

    python bench/events.py [--nodes 1000] [--clients 200] [--seconds 30] [--idle 60]

Starts its own redis-server and ``monitor_api.py``, writes the nodes the way the extension does (Redis stamps each
write and publishes the change in the same script), then, while every node reports every 10 s (a tenth of them each
second, in ten batches):
- ``/metrics`` latency with no stream open, then with ``--clients`` streams open (each reading and dropping what it
  gets; they take gzip as browsers do, unless ``--identity``) and the dashboard in headless Chromium taking pushed
  changes (goal: p99 <= 25 ms); beside it the API process's CPU seconds per second in each phase (steadier than
  latency on a busy machine), and the bytes each stream got a second;
- from a node's write to the frame that shows the change in the page (window.dashboardStats.painted), p50 and p99
  (goal: p99 <= 1 s);
- how many subscriptions the API holds on Redis, whatever the number of clients (goal: 1);
- after every node's last write (with a long interval, so nothing turns stale), the bytes an idle stream gets per
  minute over ``--idle`` seconds (goal: <= 1 KB/min: keep-alive comments only).
``--root DIR`` runs another checkout's API (before/after figures in one run).
"""

import argparse
import os
import selectors
import socket
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import requests  # noqa: E402

import monitor_contract  # noqa: E402
import testbed_servers  # noqa: E402
from testbed import CHROMIUM, CHROMIUM_ARGS, publish, snapshot  # noqa: E402
from testbed_servers import ApiServer, RedisServer, cpu_seconds  # noqa: E402

INTERVAL = 10.0
BROWSER_ENCODINGS = b"gzip, deflate, br, zstd"  # what Chromium's EventSource sends


class Sinks:
    """``n`` stream clients on raw sockets, read by one thread that counts and drops what they get; they send
    ``encoding`` as their Accept-Encoding (a browser's EventSource takes gzip)."""

    def __init__(self, port, n, encoding):
        self.selector = selectors.DefaultSelector()
        self.bytes = [0] * n
        self.socks = []
        for i in range(n):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: %s\r\n\r\n" % encoding)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, i)
            self.socks.append(sock)
        self.stop = threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while not self.stop.is_set():
            for key, _ in self.selector.select(0.5):
                try:
                    data = key.fileobj.recv(1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    self.selector.unregister(key.fileobj)
                self.bytes[key.data] += len(data)

    def close(self):
        self.stop.set()
        for sock in self.socks:
            sock.close()


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def metrics_latency(url, count):
    """Milliseconds of ``count`` sequential GET /metrics."""
    times = []
    with requests.Session() as s:
        for _ in range(count):
            start = time.perf_counter()
            s.get(url + "/metrics", timeout=10).raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
    return times


class ApiLoad:
    """The API process's CPU seconds per second since the last ``reading``."""

    def __init__(self, pid):
        self.pid = pid
        self.reading()

    def reading(self):
        cpu, now = cpu_seconds(self.pid), time.monotonic()
        last, self.last = getattr(self, "last", None), (cpu, now)
        return "" if last is None else f"   API: {(cpu - last[0]) / (now - last[1]):.2f} CPU s/s"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the page is watched")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds an idle stream is measured")
    parser.add_argument("--requests", type=int, default=1000, help="GET /metrics timed per measurement")
    parser.add_argument("--identity", action="store_true",
                        help="the stream clients do not take gzip (browsers do; Python's http.client does not)")
    parser.add_argument("--root", default=ROOT, help="the checkout whose API is measured (default: this one)")
    args = parser.parse_args()
    testbed_servers.ROOT = os.path.abspath(args.root)  # ApiServer starts that checkout's monitor_api.py

    redis_server = RedisServer().start()
    client = redis_server.client()
    api = ApiServer(redis_server.url).start()
    names = [f"spider_{i % 4}:crawler-{i:05d}:{10000 + i}" for i in range(args.nodes)]
    publish(client, *(snapshot(n, spider=n.split(":")[0], interval=INTERVAL) for n in names), stamp=True)
    written = {}  # node -> times of its writes (time.time())
    stop = threading.Event()

    def writer():
        turn, batch = 0, max(1, len(names) // int(INTERVAL * 10))
        while not stop.is_set():
            for start in range(0, len(names), batch):
                if stop.is_set():
                    break
                chosen = names[start:start + batch]
                snaps = [snapshot(n, spider=n.split(":")[0], interval=INTERVAL, pages=1000 * turn + i,
                                  cpu=float((turn + i) % 100)) for i, n in enumerate(chosen)]
                at = time.time()
                publish(client, *snaps, stamp=True)
                for n in chosen:
                    written.setdefault(n, []).append(at)
                stop.wait(0.1)
            turn += 1

    sinks = None
    try:
        threading.Thread(target=writer, daemon=True).start()
        time.sleep(2)
        load = ApiLoad(api.proc.pid)
        alone = metrics_latency(api.url, args.requests)
        print(f"{args.nodes} nodes, each writing every {INTERVAL:g} s; API of {testbed_servers.ROOT}")
        print(f"GET /metrics, no stream open:        p50 {statistics.median(alone):6.1f} ms   "
              f"p99 {percentile(alone, 0.99):6.1f} ms{load.reading()}")
        sinks = Sinks(api.port, args.clients, b"identity" if args.identity else BROWSER_ENCODINGS)
        time.sleep(2)
        load.reading()
        received, since = sum(sinks.bytes), time.monotonic()
        subscribed = client.pubsub_numsub(monitor_contract.events_channel("scrapy"))[0][1]
        latencies, crowded = [], []
        if CHROMIUM:
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"{api.url}/")
                page.wait_for_function("() => window.dashboardStats.mode === 'live'", timeout=30000)
                probe = threading.Thread(target=lambda: crowded.extend(metrics_latency(api.url, args.requests)))
                probe.start()
                seen, deadline = {}, time.time() + args.seconds
                while time.time() < deadline:
                    time.sleep(0.5)
                    for node, ms in page.evaluate("() => window.dashboardStats.painted").items():
                        at = ms / 1000
                        if seen.get(node) == at:
                            continue
                        seen[node] = at
                        before = [w for w in written.get(node, ()) if w <= at]
                        if before:
                            latencies.append((at - before[-1]) * 1000)
                probe.join()
                browser.close()
        else:
            print("(Debian's chromium is not installed: no page, so no write-to-paint figures)")
            crowded = metrics_latency(api.url, args.requests)
        streams = sum(1 for b in sinks.bytes if b)
        rate = (sum(sinks.bytes) - received) / (time.monotonic() - since) / args.clients / 1024
        print(f"GET /metrics, {args.clients} streams open:    p50 {statistics.median(crowded):6.1f} ms   "
              f"p99 {percentile(crowded, 0.99):6.1f} ms   (goal: p99 <= 25 ms){load.reading()}\n"
              f"  each stream got {rate:.1f} KB/s ({'identity' if args.identity else 'gzip'})")
        if latencies:
            print(f"write -> card painted ({len(latencies)} writes, {args.clients} other streams): "
                  f"p50 {statistics.median(latencies):.0f} ms   p99 {percentile(latencies, 0.99):.0f} ms   "
                  f"max {max(latencies):.0f} ms   (goal: p99 <= 1000 ms)")
        print(f"Redis subscriptions held by the API for {streams} streams + the page: {subscribed} (goal: 1)")

        stop.set()
        time.sleep(0.5)
        publish(client, *(snapshot(n, spider=n.split(":")[0], interval=3600.0) for n in names), stamp=True)
        time.sleep(2)  # the last pushes go out
        before = list(sinks.bytes)
        time.sleep(args.idle)
        idle = [(after - b) * 60 / args.idle for after, b in zip(sinks.bytes, before)]
        print(f"idle stream: {statistics.mean(idle):.0f} bytes/min per client on average, {max(idle):.0f} at most "
              f"over {args.idle:g} s   (goal: <= 1024)")
    finally:
        stop.set()
        if sinks is not None:
            sinks.close()
        api.stop()
        redis_server.cleanup()


if __name__ == "__main__":
    main()
