"""Benchmark acting on the queues: a 10,000-URL seed, a dead letter's cost on the crawl, the finished detection.

    python bench/queues.py [--urls 10000] [--nodes 1000]

Starts its own redis-server. Measures, printing figures (no timed asserts):

- Seeding ``--urls`` URLs through ``POST /queues/<spider>/seed`` (the Flask app in-process, so the figure is
  the route's own: parse, check, one Lua script): wall time (median of 3) and Redis round trips (commands
  Redis processed during the request, from INFO), against a client pushing one RPUSH per URL and one
  pipeline of RPUSHes.
- A dead letter's cost on the crawl, per failed request (µs): ``DeadLetters.handle`` of Scrapy's give-up
  record on the reactor thread, against the cost every other INFO record pays the handler (a check of its
  format string), and the write's share in the node's pipeline (member built, ZADD + cap + count).
- The finished detection per reader pass: ``spiders_view`` over ``--nodes`` nodes of 10 spiders, and the
  part of it that is ``spider_state``.
"""

import argparse
import logging
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import redis  # noqa: E402
from scrapy import Request  # noqa: E402

import monitor_contract  # noqa: E402
import monitor_read  # noqa: E402
import monitors  # noqa: E402
from testbed import make_app, snapshot, store  # noqa: E402
from testbed_servers import RedisServer  # noqa: E402

SPIDER = "shop"
QUEUES = {"requests": "shop:requests", "start_urls": "shop:start_urls", "dupefilter": "shop:dupefilter",
          "start_urls_type": "list", "apart": False}


def measured(work):
    """``(seconds, round trips to Redis)`` of ``work()``: redis-py sends each command, pipeline or script in one
    ``send_packed_command`` call, counted here."""
    sent = [0]
    original = redis.connection.Connection.send_packed_command

    def counting(self, *args, **kwargs):
        sent[0] += 1
        return original(self, *args, **kwargs)

    redis.connection.Connection.send_packed_command = counting
    try:
        started = time.perf_counter()
        work()
        return time.perf_counter() - started, sent[0]
    finally:
        redis.connection.Connection.send_packed_command = original


def bench_seed(server, n):
    client = server.client()
    client.flushall()
    store(client, snapshot("shop:h:1", spider=SPIDER, queues=QUEUES))
    app = make_app(server.url).test_client()
    urls = [f"https://shop.example.com/products/{i:06d}?ref=seed" for i in range(n)]
    rows = {}

    def api():
        resp = app.post(f"/queues/{SPIDER}/seed", json={"urls": urls})
        assert resp.status_code == 200 and resp.get_json()["pushed"] == n, resp.get_json()

    def one_by_one():
        for u in urls:
            client.rpush("shop:start_urls", monitor_contract.dumps({"url": u}))

    def pipelined():
        with client.pipeline(transaction=False) as pipe:
            for u in urls:
                pipe.rpush("shop:start_urls", monitor_contract.dumps({"url": u}))
            pipe.execute()

    for name, work in (("POST /queues/<spider>/seed", api), ("RPUSH per URL", one_by_one),
                       ("one pipeline of RPUSHes", pipelined)):
        runs = []
        for _ in range(3):
            client.delete("shop:start_urls")
            runs.append(measured(work))
        rows[name] = (statistics.median(t for t, _ in runs), runs[0][1])
    print(f"\nSeeding {n:,} URLs (median of 3):")
    for name, (took, count) in rows.items():
        print(f"  {name:30} {took * 1000:9.1f} ms   {count:6,} round trips to Redis")
    print("  (the route: one read of the nodes, one script that pushes, logs and audits)")


def record(kind, request):
    if kind == "give-up":
        return logging.LogRecord("scrapy.downloadermiddlewares.retry", logging.ERROR, "", 0,
                                 "Gave up retrying %(request)s (failed %(retry_times)d times): %(reason)s",
                                 ({"request": request, "retry_times": 3, "reason": "500 Internal Server Error"},), None)
    return logging.LogRecord("scrapy.core.engine", logging.INFO, "", 0, "Crawled %(count)d pages",
                             ({"count": 1},), None)


def bench_dead(server, n=20000):
    dead = monitors.DeadLetters(n * 2)
    requests = [Request(f"https://shop.example.com/products/{i}", meta={"retry_times": 2, "job": "nightly",
                                                                         "download_slot": "shop.example.com"})
                for i in range(n)]
    records = [record("give-up", r) for r in requests]
    other = [record("other", r) for r in requests]
    started = time.perf_counter()
    for rec in other:
        dead.handle(rec)
    passing = (time.perf_counter() - started) / n
    started = time.perf_counter()
    for rec in records:
        dead.handle(rec)
    handled = (time.perf_counter() - started) / n
    assert dead.count == n
    client = server.client()
    client.flushall()
    taken = dead.take()
    started = time.perf_counter()
    batch = 100  # a busy node's interval of failures
    for i in range(0, n, batch):
        with client.pipeline(transaction=False) as pipe:
            monitor_contract.write_dead(pipe, "scrapy", SPIDER, dead.members(taken[i:i + batch], "n1", 0.0), 10000)
            pipe.execute()
    written = (time.perf_counter() - started) / n
    memory = client.memory_usage(monitor_contract.dead_key("scrapy", SPIDER)) / client.zcard(
        monitor_contract.dead_key("scrapy", SPIDER))
    print(f"\nA dead letter's cost, per failed request ({n:,} give-ups):")
    print(f"  on the reactor thread (DeadLetters.handle)  {handled * 1e6:7.1f} us")
    print(f"  any other INFO record passing the handler   {passing * 1e6:7.2f} us")
    print(f"  its write, in the node's thread, {batch} per pipeline {written * 1e6:7.1f} us")
    print(f"  Redis memory per dead letter kept           {memory:7.0f} bytes")


def bench_finished(n_nodes):
    now = time.time()
    nodes = {}
    for i in range(n_nodes):
        s = snapshot(f"spider{i % 10}:h{i}:1", spider=f"spider{i % 10}", now=now, idle_since=now - 100,
                     queue_requests=0, queue_start_urls=0)
        s["state"] = "live"
        nodes[s["node"]] = s
    groups = {}
    for s in nodes.values():
        groups.setdefault(s["spider"], []).append(s)
    passes = 50
    started = time.perf_counter()
    for _ in range(passes):
        monitor_read.spiders_view(nodes, now=now)
    whole = (time.perf_counter() - started) / passes
    started = time.perf_counter()
    for _ in range(passes):
        for snaps in groups.values():
            monitor_read.spider_state(snaps, 0, now, 60)
    state = (time.perf_counter() - started) / passes
    print(f"\nFinished detection per reader pass ({n_nodes:,} nodes, 10 spiders):")
    print(f"  spiders_view, all of it      {whole * 1000:7.2f} ms")
    print(f"  of which spider_state        {state * 1000:7.3f} ms ({state / whole * 100:.1f}%)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=1000)
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        bench_seed(server, args.urls)
        bench_dead(server)
        bench_finished(args.nodes)
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
