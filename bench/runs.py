"""Benchmark run history: Redis memory per run record, the cost of recording a run, and GET /runs latency.

    python bench/runs.py [--spiders 100] [--runs 1000] [--requests 2000]

Starts its own redis-server and monitor_api.py (waitress, response cache off, so every request reads
Redis). Writes ``--spiders`` x ``--runs`` realistic run records through ``monitor_contract.write_run`` (the same
Lua script a closing node runs, baseline and cap included), then measures:

- Redis memory per run (used_memory before and after, divided by the runs kept; goal under 2 KB). The
  issue's figure is 1,000 spiders x 1,000 runs; the default writes 100 x 1,000 and scales, because a
  million Lua writes take minutes on a shared machine: memory per run does not depend on the spider
  count (each spider is one sorted set; its fixed cost is a few hundred bytes, spread over 1,000 runs).
- GET /runs?spider=...&limit=50 latency on a spider with --runs runs, first page and pages further down
  (by cursor), from one keep-alive client (goal: p99 under 20 ms); limit=500, a reason filter and the
  summary for comparison (no goal: the API caches each for a second). Takes about a minute.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import requests  # noqa: E402

import monitor_contract
from testbed_servers import RedisServer, clean_env, free_port, wait_for  # noqa: E402


def snapshot(spider, i, now):
    """The closed snapshot of run ``i`` of ``spider``: every field a real one has, figures varying."""
    start = now - 86400 * 30 + i * 2000
    return {"node": f"{spider}:crawler-{i % 40:03d}.example.internal:{10000 + i}", "spider": spider,
            "host": f"crawler-{i % 40:03d}.example.internal", "pid": 10000 + i, "start_time": start,
            "timestamp": start + 1500 + i % 300, "status": "closed",
            "finish_reason": "finished" if i % 17 else "closespider_timeout",
            "pages": 20000 + i * 7, "items": 18000 + i * 5, "requests": 20500 + i * 7, "errors": i % 13,
            "retries": i % 50, "status_1xx": 0, "status_2xx": 19000 + i, "status_3xx": 300, "status_4xx": 600,
            "status_5xx": 100 + i % 9, "peak_rss": 350_000_000 + i * 1000}


def fill(client, spiders, runs, now):
    started = time.perf_counter()
    for s in range(spiders):
        spider = f"spider_{s:04d}"
        with client.pipeline(transaction=False) as pipe:
            for i in range(runs):
                snap = snapshot(spider, i, now)
                monitor_contract.write_run(pipe, "scrapy", monitor_contract.run_record(snap), snap["start_time"], 1000)
            pipe.execute()
    return time.perf_counter() - started


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def latency(session, url, paths, count):
    times = []
    for n in range(count):
        t = time.perf_counter()
        resp = session.get(url + paths[n % len(paths)])
        times.append((time.perf_counter() - t) * 1000)
        assert resp.status_code == 200, resp.text
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spiders", type=int, default=100)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    server = RedisServer().start()
    api = None
    try:
        client = server.client()
        now = int(client.time()[0])
        before = client.info("memory")["used_memory"]
        took = fill(client, args.spiders, args.runs, now)
        after = client.info("memory")["used_memory"]
        total = args.spiders * args.runs
        kept = sum(client.zcard(monitor_contract.runs_key("scrapy", f"spider_{s:04d}")) for s in range(args.spiders))
        per_run = (after - before) / kept
        sample = client.zrevrangebylex(monitor_contract.runs_key("scrapy", "spider_0000"), "+", "-", 0, 1)[0]
        print(f"wrote {total:,} runs ({args.spiders} spiders x {args.runs}) in {took:.1f} s: "
              f"{took / total * 1e6:.0f} us per run recorded (pipelined Lua, baseline of 10 included)")
        print(f"Redis memory: {per_run:,.0f} bytes per run ({kept:,} kept; a record is {len(sample)} bytes of "
              f"JSON); goal < 2,048: {'OK' if per_run < 2048 else 'OVER'}")
        print(f"  scaled to 1,000 spiders x 1,000 runs: {per_run * 1e6 / 2**30:.2f} GiB")

        port = free_port()
        env = clean_env({"REDIS_URL": server.url, "MONITOR_API_CACHE": "0"})
        api = subprocess.Popen([sys.executable, os.path.join(ROOT, "monitor_api.py"), "--port", str(port)],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        session = requests.Session()

        def up():
            try:
                return session.get(url + "/health", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(up, 15, what="monitor_api.py")
        # Cursors down the spider's runs, so requests read pages all along its history.
        cursors, cursor = [""], None
        while True:
            more = f"&before={cursor}" if cursor else ""
            body = session.get(f"{url}/runs?spider=spider_0000&limit=50{more}").json()
            cursor = body["next"]
            if not cursor:
                break
            cursors.append(cursor)
        latency(session, url, ["/runs?spider=spider_0000"], 100)  # warm up
        for label, paths in (("first page, limit=50", ["/runs?spider=spider_0000&limit=50"]),
                             (f"any of {len(cursors)} pages by cursor, limit=50",
                              [f"/runs?spider=spider_0000&limit=50&before={c}" for c in cursors]),
                             ("limit=500", ["/runs?spider=spider_0000&limit=500"]),
                             ("reason=closespider_timeout (filtered)",
                              ["/runs?spider=spider_0000&reason=closespider_timeout"]),
                             ("summary", ["/runs/spider_0000/summary"])):
            times = latency(session, url, paths, args.requests if "500" not in label else args.requests // 4)
            p99 = percentile(times, 99)
            goal = f"goal p99 < 20 ms: {'OK' if p99 < 20 else 'OVER'}; " if "limit=50" in label else ""
            print(f"GET /runs {label}: p50 {statistics.median(times):.2f} ms, p99 {p99:.2f} ms "
                  f"({goal}{len(times)} requests, no cache)")
    finally:
        if api:
            api.kill()
            api.wait()
        server.cleanup()


if __name__ == "__main__":
    main()
