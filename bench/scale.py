"""The API at 10,000 nodes: ?fields= projection, spider views uncached, idle 304s and /prometheus.

    python bench/scale.py [--nodes 10000] [--seconds 5] [--insight] [--root DIR] [--only prometheus]

Starts a private redis-server holding N nodes of one spider (as bench/api.py writes them, eight nodes a host;
with --insight each carries crawl insight at its budget: 20 domains, 30 fields, 5 error samples, latency
histogram) and two API processes of the checkout ``--root`` (default: this one; give main's to measure before
and after in one run): one with the response cache (MONITOR_API_CACHE 1, the default), one without (0).
While every node reports again every 10 s it measures:
- uncompressed /metrics, whole and with a five-field projection (goal: >= 1,000 req/s projected), 16 clients;
- /spiders and /metrics/<spider> without the response cache, one client: median and p90 of 15 reads (goal:
  <= 100 ms);
then, with the cluster idle, whether /metrics answers If-None-Match with 304, and /prometheus without the
cache (default level, and ?detail=node): series, bytes, build time, the API's resident memory after it, and
``promtool check metrics`` (goals at 10,000 nodes with insight, default level: <= 150,000 series, <= 25 MB,
<= 1 s), with the CPU time the API spent on it. A checkout without ?fields= or ?detail= answers 400: the line
says so. ``--only prometheus``: only the /prometheus part (one API, without the cache, its slim reads warmed by one
/metrics as in the whole run).
"""

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.abspath(sys.argv[sys.argv.index("--root") + 1]) if "--root" in sys.argv[:-1] else HERE
sys.path.insert(0, HERE)  # bench.*
sys.path.insert(0, ROOT)

import requests  # noqa: E402

import testbed  # noqa: E402,F401  (the measured checkout's, before bench.api imports this one's)
from bench import api as api_bench  # noqa: E402
from testbed_servers import RedisServer, clean_env, cpu_seconds, free_port, wait_until_answers  # noqa: E402

FIVE = "state,cpu,memory,pages_per_min,age"


def start_api(port, redis_url, **settings):
    env = dict(clean_env(), REDIS_URL=redis_url, **settings)
    proc = subprocess.Popen([sys.executable, "monitor_api.py", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/health", 120, "the API", proc=proc)
    except BaseException:
        proc.kill()
        raise
    return proc


def reads(url, count=15):
    """Median and p90 (ms) of ``count`` sequential uncached GETs, or the status that refused them."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        resp = requests.get(url, headers={"Accept-Encoding": "identity"}, timeout=60)
        times.append((time.perf_counter() - start) * 1000)
        if resp.status_code != 200:
            return f"HTTP {resp.status_code}"
    times.sort()
    return f"median {statistics.median(times):6.1f} ms, p90 {times[int(len(times) * 0.9)]:6.1f} ms"


def rss_mb(pid, field="VmRSS"):
    """The process's resident memory (``VmHWM``: its peak) in MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def scrape(port, proc, query=""):
    """One uncached /prometheus: a line with its series, bytes, time, the API's RSS and promtool's verdict."""
    start, cpu = time.perf_counter(), cpu_seconds(proc.pid)
    resp = requests.get(f"http://127.0.0.1:{port}/prometheus{query}", headers={"Accept-Encoding": "identity"},
                        timeout=300)
    took, cpu = time.perf_counter() - start, cpu_seconds(proc.pid) - cpu
    if resp.status_code != 200:
        return f"HTTP {resp.status_code}"
    series = sum(1 for line in resp.content.splitlines() if line and not line.startswith(b"#"))
    verdict = "promtool not run (over 50 MB)" if len(resp.content) > 50e6 else "promtool not installed"
    try:
        if len(resp.content) > 50e6:
            raise FileNotFoundError
        check = subprocess.run(["promtool", "check", "metrics"], input=resp.content, capture_output=True, timeout=300)
        problems = (check.stdout + check.stderr).decode().strip().splitlines()
        verdict = "promtool clean" if check.returncode == 0 and not problems else f"promtool: {problems[:2]}"
    except FileNotFoundError:
        pass
    return (f"{series:9,} series, {len(resp.content) / 1e6:6.1f} MB, {took:5.2f} s (API CPU {cpu:5.2f} s), "
            f"API RSS {rss_mb(proc.pid):5.0f} MB (peak {rss_mb(proc.pid, 'VmHWM'):5.0f}), {verdict}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time of each req/s case")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--insight", action="store_true", help="every node carries crawl insight at its budget")
    parser.add_argument("--root", default=HERE, help="the checkout whose API is measured")
    parser.add_argument("--only", choices=["prometheus"], help="measure only this part")
    args = parser.parse_args()
    if args.insight:
        import bench.insight_hooks

        api_bench.INSIGHT.update(bench.insight_hooks.full_insight())
    server = RedisServer().start()
    procs, stop, pause = [], threading.Event(), threading.Event()
    try:
        api_bench.fill(server.client(), args.nodes)
        if args.only == "prometheus":
            port = free_port()
            procs.append(start_api(port, server.url, MONITOR_API_CACHE="0"))
            print(f"{args.nodes} nodes of one spider{' with insight at its budget' if args.insight else ''}; "
                  f"API of {ROOT}; {os.cpu_count()} CPUs")
            requests.get(f"http://127.0.0.1:{port}/metrics", timeout=60)
            prometheus(port, procs[0])
            return
        cached_port, bare_port = free_port(), free_port()
        procs.append(start_api(cached_port, server.url))
        procs.append(start_api(bare_port, server.url, MONITOR_API_CACHE="0"))
        print(f"{args.nodes} nodes of one spider{' with insight at its budget' if args.insight else ''}; "
              f"API of {ROOT}; {os.cpu_count()} CPUs")
        writer = threading.Thread(target=api_bench.keep_reporting, args=(server.client(), args.nodes, 10, stop, pause),
                                  daemon=True)
        writer.start()
        plain = "Accept-Encoding: identity\r\n"
        api_bench.measure("/metrics, uncompressed", cached_port, "/metrics", plain, args.clients, args.seconds)
        if requests.get(f"http://127.0.0.1:{cached_port}/metrics?fields={FIVE}", timeout=60).ok:
            api_bench.measure("/metrics?fields=<5 fields>, uncompressed", cached_port, f"/metrics?fields={FIVE}",
                              plain, args.clients, args.seconds)
        else:
            print("/metrics?fields=<5 fields>: not supported by this checkout")
        base = f"http://127.0.0.1:{bare_port}"
        print(f"/spiders, uncached, nodes reporting:             {reads(base + '/spiders')}")
        print(f"/metrics/main_spider, uncached, nodes reporting: {reads(base + '/metrics/main_spider')}")
        pause.set()
        time.sleep(1)
        print(f"/spiders, uncached, idle cluster:                {reads(base + '/spiders')}")
        api_bench.fill(server.client(), args.nodes)  # every node just reported: none turns stale during the check
        first = requests.get(base + "/metrics", timeout=60)
        time.sleep(1.5)
        again = requests.get(base + "/metrics", headers={"If-None-Match": first.headers["ETag"]}, timeout=60)
        print(f"idle cluster, /metrics with If-None-Match 1.5 s later: HTTP {again.status_code}, "
              f"{len(again.content)} bytes")
        prometheus(bare_port, procs[1])
    finally:
        api_bench.stop_all(stop, procs, server)


def prometheus(port, proc):
    """/prometheus at the default level, then ?detail=node, then the default level again (its RSS after a
    node-level scrape)."""
    print(f"API RSS before /prometheus: {rss_mb(proc.pid):.0f} MB (peak so far {rss_mb(proc.pid, 'VmHWM'):.0f})")
    print(f"/prometheus, uncached, default level:  {scrape(port, proc)}")
    if '"detail"' in requests.get(f"http://127.0.0.1:{port}/openapi.json", timeout=60).text:
        print(f"/prometheus, uncached, ?detail=node:   {scrape(port, proc, '?detail=node')}")
        print(f"/prometheus, uncached, default again:  {scrape(port, proc)}")
    else:
        print("/prometheus?detail=node: not supported by this checkout (its default is every series per node)")


if __name__ == "__main__":
    main()
