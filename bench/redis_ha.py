"""Benchmark highly available Redis and GET /redis: failover time, crawl throughput through a failover, the cost
of /redis, /metrics on a cluster vs plain Redis, and the monitor's connections per crawler process.

    python bench/redis_ha.py [--nodes 10] [--spiders 100] [--requests 300]

Starts its own servers on free ports (a master, a replica and three sentinels with down-after-milliseconds
1000; a three-master Redis Cluster; a plain redis-server; the API as a subprocess; crawlers) and prints:

- failover time seen by the API: SIGKILL of the master to the first 200 from /health on the new master;
- crawl throughput (pages/s of one main_spider node on the Sentinel URL) with and without a failover mid-crawl;
- GET /redis p50/p99 with --spiders spiders (response cache off, so every request reads INFO and the keys);
- GET /metrics p50/p99 with --spiders nodes on the cluster URL and on plain Redis (cache off);
- connected_clients on the monitor's Redis with --nodes crawler processes (plain Scrapy spiders reporting
  every second), and per process.
Figures only, never timed asserts. Takes about two minutes.
"""

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import requests  # noqa: E402

from monitor_settings import connect  # noqa: E402
from testbed import publish, snapshot  # noqa: E402
from testbed_servers import (  # noqa: E402
    PLAIN_SPIDER,
    ApiServer,
    ClusterServers,
    RedisServer,
    SentinelGroup,
    Site,
    scrapy_project,
    start_crawler,
    stop_process,
    wait_for,
)


def latencies(url, count):
    """p50 and p99 in ms of ``count`` sequential GETs over one keep-alive session."""
    session = requests.Session()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        assert session.get(url, timeout=10).status_code == 200
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def failover_time():
    group = SentinelGroup().start()
    api = ApiServer(group.url).start()
    try:
        group.kill_master()
        killed, seen_503 = time.monotonic(), False
        while True:
            status = requests.get(api.url + "/health", timeout=5).status_code
            seen_503 = seen_503 or status == 503
            if status == 200 and seen_503:
                return time.monotonic() - killed
            time.sleep(0.02)
    finally:
        api.stop()
        group.cleanup()


def crawl_rate(kill):
    """Pages per second of one main_spider node on a Sentinel URL over a 200-page site, killing the master
    once 40 pages are fetched when ``kill``."""
    group = SentinelGroup().start()
    site = Site(pages=200, delay=0.05).start()
    proc = None
    try:
        proc = start_crawler(env={"REDIS_URL": group.url, "MONITOR_INTERVAL": "1", "MAX_IDLE_TIME_BEFORE_CLOSE": "1"},
                             settings={"CONCURRENT_REQUESTS": "4", "ROBOTSTXT_OBEY": "0"})
        connect(group.url, timeout=5).lpush("distributed:start_urls", site.url)
        wait_for(lambda: site.page_hits(), 60, what="the first page")
        started = time.monotonic()
        if kill:
            wait_for(lambda: len(site.page_hits()) >= 40, 60, what="40 pages")
            group.kill_master()
        wait_for(lambda: len(site.page_hits()) >= 190, 120, what="the site crawled")
        return len(site.page_hits()) / (time.monotonic() - started)
    finally:
        stop_process(proc)
        if proc is not None:
            os.unlink(proc.log_path)
        site.stop()
        group.cleanup()


def fill(client, spiders, prefix):
    now = time.time()
    publish(client, *(snapshot(f"spider_{i:03d}:host:{i}", spider=f"spider_{i:03d}", now=now) for i in range(spiders)),
            prefix=prefix)
    for i in range(spiders):
        client.rpush(f"spider_{i:03d}:requests", *range(100))
        client.sadd(f"spider_{i:03d}:dupefilter", *range(300))


def api_figures(spiders, count):
    plain, cluster = RedisServer().start(), ClusterServers().start()
    out = {}
    try:
        fill(plain.client(), spiders, "scrapy")
        fill(cluster.client(), spiders, "{scrapy}")
        for name, server in (("plain", plain), ("cluster", cluster)):
            api = ApiServer(server.url, MONITOR_API_CACHE="0").start()
            try:
                out[name] = {path: latencies(api.url + path, count) for path in ("/metrics", "/redis")}
            finally:
                api.stop()
    finally:
        plain.cleanup()
        cluster.cleanup()
    return out


def connections(nodes):
    server = RedisServer().start()
    site = Site(pages=2000, delay=0.5).start()
    procs = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            project = scrapy_project(pathlib.Path(folder), "plain", PLAIN_SPIDER)
            base = server.client().info("clients")["connected_clients"]
            for _ in range(nodes):
                procs.append(start_crawler("plain", env={"REDIS_URL": server.url, "MONITOR_INTERVAL": "1"},
                                           cwd=str(project), args=["-a", f"url={site.url}"]))
            client = server.client()
            wait_for(lambda: client.hlen("scrapy:node:status") == nodes, 120, what="every node reporting")
            time.sleep(5)  # several ticks and control polls each
            return client.info("clients")["connected_clients"] - base
    finally:
        for proc in procs:
            stop_process(proc)
            os.unlink(proc.log_path)
        site.stop()
        server.cleanup()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--spiders", type=int, default=100)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    print(f"failover seen by the API (kill -9 of the master to the first 200 on the new one): {failover_time():.2f} s")
    calm, failing = crawl_rate(False), crawl_rate(True)
    print(f"crawl throughput, one node on a Sentinel URL: {calm:.1f} pages/s without a failover, "
          f"{failing:.1f} pages/s with one ({failing / calm:.0%})")
    figures = api_figures(args.spiders, args.requests)
    for name, paths in figures.items():
        for path, (p50, p99) in paths.items():
            print(f"GET {path} on {name} Redis, {args.spiders} spiders/nodes, cache off: "
                  f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    ratio = figures["cluster"]["/metrics"][0] / figures["plain"]["/metrics"][0]
    print(f"/metrics p50 on a cluster URL vs plain: x{ratio:.2f}")
    clients = connections(args.nodes)
    print(f"connected_clients with {args.nodes} crawler processes: {clients} ({clients / args.nodes:.1f} per process)")


if __name__ == "__main__":
    main()
