"""How long one alert.py evaluation takes over 10,000 nodes:
``python bench/alert_eval.py [--nodes N] [--silences N] [--insight] [--root DIR]``.

A private redis-server holds N node snapshots written as the extension writes them (every node reports
again before each evaluation); a local HTTP receiver takes the webhook. Each figure is one
``Alerter.run_once``: read the snapshots and the alert state, evaluate, write state and outbox, deliver;
with the alerter's CPU time (less sensitive to a busy machine than the wall clock), the Redis round trips it
made (each pipeline or command sent) and the alert records it rewrote. With
``--insight`` every node carries crawl insight at its budget (20 domains, 30 fields, 5 samples, latency
histogram; its domains' figures grow between evaluations, and each write adds to the refusal buckets as the
extension's does). ``--root`` runs another checkout's code (before/after figures in one run).
The issue's budget is 0.35 s per evaluation at 10,000 nodes, with or without insight; at most 3 round trips.
"""

import argparse
import multiprocessing
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = sys.argv[sys.argv.index("--root") + 1] if "--root" in sys.argv[:-1] else HERE
sys.path.insert(0, HERE)  # bench.insight_hooks
sys.path.insert(0, ROOT)

import redis  # noqa: E402

import alert  # noqa: E402
import monitor_alert_state  # noqa: E402
import monitor_settings  # noqa: E402
import testbed  # noqa: E402
from testbed_servers import RedisServer  # noqa: E402

BUDGET = 0.35
INTERVAL = 60
INSIGHT = {}  # with --insight: crawl insight figures at their budget, on every node
ROLLED = {}  # node -> the counts of its last rollup (as the extension keeps them)


class Counting(redis.Connection):
    """A connection that counts what it sends: one send per command or pipeline, a round trip each."""

    sends = 0

    def send_packed_command(self, command, check_health=True):
        Counting.sends += 1
        return super().send_packed_command(command, check_health)


class Receiver(BaseHTTPRequestHandler):
    received = []

    def do_POST(self):
        self.received.append(len(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def grown(domains, now):
    """Insight's domains ``now``: each with a page a second more, one in ten of them 429s."""
    return {name: {**d, "pages": d["pages"] + int(now) % 100_000, "429": d["429"] + int(now) % 100_000 // 10}
            for name, d in domains.items()}


def snapshot(i, now, calm):
    """Node i's report: 1 in 10 runs hot, 1 in 20 is silent (down: it reported 300 s before the first
    evaluation, never since), 1 in 50 closed, 1 in 30 stalled."""
    stale, closed, stalled = i % 20 == 1, i % 50 == 2, i % 30 == 3
    insight = {**INSIGHT, "domains": grown(INSIGHT["domains"], now)} if INSIGHT else {}
    return testbed.snapshot(
        f"spider{i % 7}:host{i}:{i}", spider=f"spider{i % 7}", age=300 if stale else 0, now=now, host=f"host{i}",
        pid=i, status="closed" if closed else "running", cpu=95.0 if i % 10 == 0 and not calm else 20.0,
        memory=50.0, bytes_sent=1000 * i, bytes_recv=2000 * i, rss=300 * 1024 * 1024, process_cpu=30.0,
        pages=5 if stalled else int(now), items=int(now), requests=int(now), errors=0, errors_per_min=0.0,
        pages_per_min=0.0 if stalled else 60.0, items_per_min=60.0, queue_requests=500, **insight)


def publish(r, nodes, now, calm=False, first=True):
    """Every node reports, but a silent (down) one only the first time: its age grows as a real one's does."""
    snaps = [snapshot(i, now, calm) for i in range(nodes) if first or i % 20 != 1]
    try:
        testbed.publish(r, *snaps, rolled=ROLLED)
    except TypeError:  # a checkout before the refusal buckets (--root): its nodes wrote no rollups
        testbed.publish(r, *snaps)


def writer(url, requests, done):
    """The nodes' side, in a process of its own as crawlers are (their writes' garbage and rollup counts kept out of
    the alerter's heap): each request ``(nodes, now, calm, first)`` is published, then acknowledged."""
    client = redis.Redis.from_url(url)
    for request in iter(requests.get, None):
        publish(client, *request)
        done.put(True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--silences", type=int, default=0,
                        help="active silences, each on one node (one in ten matches a hot node)")
    parser.add_argument("--insight", action="store_true", help="every node carries crawl insight at its budget")
    parser.add_argument("--root", default=HERE, help="the checkout whose code is measured (default: this one)")
    args = parser.parse_args()
    if args.insight:
        import bench.insight_hooks

        INSIGHT.update(bench.insight_hooks.full_insight())
    for name, *_ in alert.SETTINGS:
        os.environ.pop(name, None)
    server = RedisServer().start()
    fork = multiprocessing.get_context("fork")
    requests, done = fork.Queue(), fork.Queue()
    nodes_side = fork.Process(target=writer, args=(server.url, requests, done), daemon=True)
    nodes_side.start()
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        cfg = alert.load_config([
            "--redis-url", server.url, "--webhook-url", f"http://127.0.0.1:{receiver.server_address[1]}/hook",
            "--for", str(INTERVAL), "--interval", str(INTERVAL), "--stall-seconds", str(2 * INTERVAL)])
        client = monitor_settings.connect(server.url, timeout=10)
        client.connection_pool.connection_class = Counting
        alerter = alert.Alerter(cfg, client=client)
        t0 = time.time()
        for i in range(args.silences):
            node = snapshot(i * 10 if i % 10 == 0 else i * 10 + 5, t0, False)["node"]
            monitor_alert_state.add_silence(server.client(), "scrapy", monitor_alert_state.silence_from(
                {"matchers": {"node": node, "spider": node.split(":")[0]}, "duration": 86400}, t0, "bench"))
        steps = [("first sight (all pending)", False), ("fires (one big message)", False),
                 ("steady (nothing new)", False), ("hot nodes cool down (resolved)", True)]
        worst = 0.0
        print(f"{args.nodes} nodes in a private Redis{' with insight at its budget' if args.insight else ''}, "
              f"{args.silences} silences, webhook to a local receiver; code of {os.path.abspath(args.root)}")
        for n, (what, calm) in enumerate(steps):
            now = t0 + n * INTERVAL
            requests.put((args.nodes, now, calm, n == 0))
            done.get()
            before = server.client().hgetall("scrapy:alert:state")
            sends, start, cpu = Counting.sends, time.perf_counter(), time.process_time()
            notes = alerter.run_once(now)
            took, cpu = time.perf_counter() - start, time.process_time() - cpu
            trips = Counting.sends - sends
            after = server.client().hgetall("scrapy:alert:state")
            rewritten = sum(1 for k, v in after.items() if k in before and before[k] != v)
            worst = max(worst, took)
            print(f"  evaluation {n + 1}, {what}: {took:.3f} s ({cpu:.3f} s CPU), {trips} round trips, "
                  f"{len(notes)} alert(s) sent, {rewritten} of {len(after)} alert records rewritten")
        firing = server.client().hlen("scrapy:alert:state")
        print(f"alert records in Redis: {firing}; webhook posts: {len(Receiver.received)}, "
              f"largest {max(Receiver.received or [0]) // 1024} KiB")
        verdict = "within" if worst <= BUDGET else "OVER"
        print(f"slowest evaluation: {worst:.3f} s, {verdict} the {BUDGET} s budget "
              f"for {args.nodes} nodes")
    finally:
        requests.put(None)
        nodes_side.join(10)
        receiver.shutdown()
        server.cleanup()


if __name__ == "__main__":
    main()
