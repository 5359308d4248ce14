"""Benchmark spider history for months: rollup memory, the rollup's cost per node write, history reads, CSV export.

    python bench/history.py [--writes 2000] [--requests 200] [--runs 10000]

Starts its own redis-server and monitor_api.py (waitress, response cache off). Measures:

- Redis bytes per spider for 7 and 90 days: buckets filled synthetically through the node's write path
  (``write_snapshot(..., rollup=...)``), two nodes writing every bucket's every field; MEMORY USAGE summed over
  the spider's keys, and used_memory's growth (goal: under 1 MB per spider for 90 days).
- The extra cost per node write: one node write (status, history, trend, expiries) as a pipeline, with and
  without the rollup (µs, median), and its round trips (the rollup rides in the same pipeline).
- GET /spiders/<s>/history?days=90 (and ?days=7) latency, p50 and p99, on a spider with every bucket filled.
- CSV export of ``--runs`` runs: time, size, and the API process's peak RSS (VmHWM) before and after (it
  streams: the peak should not grow with the export).
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import requests  # noqa: E402

import monitor_contract  # noqa: E402
import testbed  # noqa: E402
from testbed_servers import ApiServer, RedisServer  # noqa: E402

P = "scrapy"


def fill(client, spider, days, now):
    """Two nodes writing every 10-minute bucket of the last ``days`` (twice each) through the write path."""
    previous, counts = {}, {"a": 0, "b": 0}
    last = int(now) // 600
    with client.pipeline(transaction=False) as pipe:
        for b in range(last - days * 144 + 1, last + 1):
            for node in ("a", "b"):
                for offset in (100, 400):
                    counts[node] += 137
                    at = b * 600 + offset
                    snap = testbed.snapshot(f"{spider}:{node}", spider=spider, now=at, pages=counts[node],
                                            items=counts[node] // 2, requests=counts[node] + 3,
                                            errors=counts[node] // 50,
                                            dead=counts[node] // 100, queue_requests=123456 + b % 1000,
                                            latency_p95=0.123 + b % 7)
                    previous[node] = monitor_contract.write_rollup(pipe, P, snap, at, previous.get(node, {}))
            if len(pipe) > 2000:
                pipe.execute()
        pipe.execute()


def spider_bytes(client, spider):
    keys = list(client.scan_iter(f"{P}:rollup:{spider}:*", count=1000))
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.memory_usage(key, samples=0)
        return len(keys), sum(pipe.execute())


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def write_cost(client, writes):
    """``(client µs without, with, Redis µs without, with)`` of one node write pipeline (status, history,
    expiries), without and with the rollup: client-side medians with the two kinds interleaved (so the
    machine's load hits both alike), and Redis's time in scripts per write (INFO commandstats' EVAL: the stamp,
    and the rollup with the commands it calls)."""
    snap = testbed.snapshot("cost:node", spider="cost")
    times, server, previous = {False: [], True: []}, {False: 0, True: 0}, {}
    for i in range(2 * writes):
        with_rollup = bool(i % 2)
        snap = dict(snap, pages=snap["pages"] + 10, timestamp=snap["timestamp"] + 1)
        client.config_resetstat()
        t = time.perf_counter()
        with client.pipeline(transaction=False) as pipe:
            rolled = monitor_contract.write_snapshot(pipe, P, snap, 360, stamp=True,
                                                     rollup=(snap["timestamp"], previous) if with_rollup else None)
            pipe.execute()
        times[with_rollup].append((time.perf_counter() - t) * 1e6)
        server[with_rollup] += client.info("commandstats")["cmdstat_eval"]["usec"]  # scripts, with what they call
        previous = rolled or previous
    return (statistics.median(times[False]), statistics.median(times[True]),
            server[False] / writes, server[True] / writes)


def peak_rss(pid):
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--runs", type=int, default=10000)
    args = parser.parse_args()
    server = RedisServer().start()
    api = None
    try:
        client = server.client()
        now = monitor_contract.redis_now(client.time())
        for days in (7, 90):
            before = client.info("memory")["used_memory"]
            started = time.perf_counter()
            fill(client, f"s{days}", days, now)
            took = time.perf_counter() - started
            grown = client.info("memory")["used_memory"] - before
            keys, usage = spider_bytes(client, f"s{days}")
            print(f"rollups, a spider written for {days} days ({days * 144 * 4:,} node writes in {took:.1f} s): "
                  f"{keys:,} keys, {usage / 1024:,.0f} KiB by MEMORY USAGE, used_memory +{grown / 1024:,.0f} KiB"
                  + (f"; goal < 1 MB: {'OK' if max(usage, grown) < 2 ** 20 else 'OVER'}" if days == 90 else ""))

        without, with_rollup, redis_without, redis_with = write_cost(client, args.writes)
        print(f"one node write (status, history, expiries) as one pipeline, median of {args.writes}: "
              f"{without:.0f} us without the rollup, {with_rollup:.0f} us with it ({with_rollup - without:+.0f} us); "
              f"Redis's time in scripts {redis_without:.1f} -> {redis_with:.1f} us "
              f"({redis_with - redis_without:+.1f} us); "
              "round trips: 1 and 1 (the rollup is one more command in the same pipeline)")

        api = ApiServer(server.url, MONITOR_API_CACHE="0").start()
        url, session = api.url, requests.Session()
        for days in (90, 7):
            path = f"/spiders/s90/history?days={days}"
            session.get(url + path)  # warm up
            times = []
            for _ in range(args.requests):
                t = time.perf_counter()
                resp = session.get(url + path)
                times.append((time.perf_counter() - t) * 1000)
                assert resp.status_code == 200, resp.text
            points = len(resp.json()["points"])
            print(f"GET {path}: {points:,} points, {len(resp.content) / 1024:,.0f} KiB; p50 "
                  f"{statistics.median(times):.1f} ms, p99 {percentile(times, 99):.1f} ms ({args.requests} requests, "
                  "no cache)")

        with client.pipeline(transaction=False) as pipe:
            for i in range(args.runs):
                begin = int(now) - 86400 * 30 + i * 200
                snap = testbed.snapshot(f"csv:crawler-{i % 40}:{i}", spider="csv", now=begin + 150, status="closed",
                                        start_time=begin, version="2.3", args_hash="0123456789ab")
                monitor_contract.write_run(pipe, P, monitor_contract.run_record(snap), begin, args.runs)
                if len(pipe) >= 1000:
                    pipe.execute()
            pipe.execute()
        session.get(f"{url}/runs?spider=csv&limit=500")  # the route's code warm
        peak_before = peak_rss(api.proc.pid)
        t = time.perf_counter()
        size = rows = 0
        with session.get(f"{url}/runs?spider=csv&format=csv", stream=True) as resp:
            for chunk in resp.iter_content(65536):
                size += len(chunk)
                rows += chunk.count(b"\r\n")
        took = time.perf_counter() - t
        peak_after = peak_rss(api.proc.pid)
        print(f"GET /runs?spider=csv&format=csv: {rows - 1:,} runs, {size / 2 ** 20:.1f} MiB in {took:.2f} s "
              f"({(rows - 1) / took:,.0f} runs/s); API peak RSS {peak_before / 2 ** 20:.1f} -> "
              f"{peak_after / 2 ** 20:.1f} MiB (+{(peak_after - peak_before) / 2 ** 20:.1f} MiB for the export)")
    finally:
        if api:
            api.stop()
        server.cleanup()


if __name__ == "__main__":
    main()
