"""Node monitor benchmarks: crawl throughput with the monitor on (with and without fleet control's polling),
off and with a hanging Redis; Redis memory per node-day of history; reactor-thread time per tick. Figures
are ratios within one run.

    python bench/monitor.py [--rounds 5] [--pages 1500]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench.insight_hooks as insight_bench  # noqa: E402
import monitor_contract
import monitors  # noqa: E402
from testbed_servers import HangingPort, RedisServer, Site, clean_env, crawl_command  # noqa: E402

# The crawler gets a core of its own; the site, Redis and this script share the other (less noise).
CPUS = sorted(os.sched_getaffinity(0))
CRAWLER_CPUS = set(CPUS[-1:])
OTHER_CPUS = set(CPUS[:-1]) or CRAWLER_CPUS


def crawl(server, site, env):
    """One main_spider crawl of the whole site: pages per second between first and last page, the crawler's
    CPU seconds, and seconds from the process's start to the first page (start-up, control's first read too)."""
    server.client().flushall()
    site.hits.clear()
    site.first_hit = site.last_hit = None
    server.client().lpush("distributed:start_urls", json.dumps({"url": site.url}))
    full_env = clean_env(env, REDIS_URL=server.url)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run(crawl_command("main_spider", LOG_LEVEL="INFO", MAX_IDLE_TIME_BEFORE_CLOSE=1), cwd=ROOT,
                   env=full_env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
                   preexec_fn=lambda: os.sched_setaffinity(0, CRAWLER_CPUS))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    pages = sum(site.page_hits().values())
    assert pages == site.pages, f"crawled {pages} of {site.pages} pages"
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return pages / (site.last_hit - site.first_hit), cpu, site.first_hit - started


def throughput(rounds, pages):
    os.sched_setaffinity(0, OTHER_CPUS)  # before the site and Redis start, so they inherit it
    server = RedisServer().start()
    site = Site(pages=pages).start()
    variants = {
        "off": {"MONITOR_ENABLED": "0"},
        "on (1 s)": {"MONITOR_INTERVAL": "1"},
        "on, no control": {"MONITOR_INTERVAL": "1", "MONITOR_CONTROL": "0"},
        "hanging Redis": {"MONITOR_INTERVAL": "1", "MONITOR_REDIS_URL": HangingPort().url},  # held to the end
    }
    rates = {name: [] for name in variants}
    cpus = {name: [] for name in variants}
    starts = {name: [] for name in variants}
    try:
        for i in range(rounds):
            names = list(variants)
            order = names[i % len(names):] + names[:i % len(names)]  # rotate: each variant runs in each place
            for name in order:
                rate, cpu, start = crawl(server, site, variants[name])
                starts[name].append(start)
                rates[name].append(rate)
                cpus[name].append(cpu)
            print(f"  round {i + 1}: " + ", ".join(f"{n} {rates[n][-1]:.0f} p/s {cpus[n][-1]:.2f} s CPU"
                                                 for n in variants), flush=True)
    finally:
        site.stop()
        server.cleanup()
    print(f"crawl of {pages} pages, {rounds} rounds in rotating order, crawler on its own core:")
    for name in variants:
        ratio = statistics.median(r / o for r, o in zip(rates[name], rates["off"]))
        cpu_ratio = statistics.median(c / o for c, o in zip(cpus[name], cpus["off"]))
        print(f"  {name:14s} median {statistics.median(rates[name]):6.0f} pages/s; per-round throughput ratio "
              f"to off: median {ratio:.3f}; crawler CPU time ratio: median {cpu_ratio:.3f}; start to first "
              f"page: median {statistics.median(starts[name]):.2f} s")


def memory():
    """Redis memory for one node after 8,640 ticks at 10 s (24 h), against a capped list of full snapshots."""
    server = RedisServer().start()
    r = server.client()
    try:
        sampler = monitors.Sampler()
        stats = {"response_received_count": 0, "item_scraped_count": 0, "downloader/request_count": 0,
                 "log_count/ERROR": 0, "downloader/response_status_count/200": 0}
        base = {"node": "main_spider:crawler-host-01:123456", "spider": "main_spider", "host": "crawler-host-01",
                "pid": 123456, "interval": 10, "start_time": 1_699_999_800, "status": "running",
                "queue_requests": 1234, "queue_start_urls": 0, "queue_dupefilter": 567890}
        trend = monitor_contract.TrendBuffer()
        figures = insight_bench.full_insight()  # crawl insight at its budget: 20 domains, 30 fields, 5 samples
        start = 1_699_999_800
        with r.pipeline(transaction=False) as pipe:
            for i in range(8640):
                now = start + 10 * i
                for key, step in (("response_received_count", 97), ("item_scraped_count", 91),
                                  ("downloader/request_count", 99), ("downloader/response_status_count/200", 95)):
                    stats[key] += step + i % 7
                stats["log_count/ERROR"] += i % 3 == 0
                snap = {"timestamp": now, **base, **sampler.sample(stats, now), **figures,
                        "latency_p95": round(0.3 + i % 17 / 10, 3)}
                rows = [row for row in [trend.add(monitor_contract.history_row(snap))] if row]
                monitor_contract.write_snapshot(pipe, "bench", snap, 360, rows)
                pipe.rpush("naive", json.dumps(snap))  # the plain capped list of JSON snapshots
                pipe.ltrim("naive", -8640, -1)
                if i % 500 == 0:
                    pipe.execute()
            pipe.execute()
        node = base["node"]
        parts = {
            "status hash entry": r.memory_usage(monitor_contract.status_key("bench"), samples=0),
            "1 h full-resolution history": r.memory_usage(monitor_contract.history_key("bench", node), samples=0),
            "24 h trend (5-minute rows)": r.memory_usage(monitor_contract.trend_key("bench", node), samples=0),
        }
        total = sum(parts.values())
        naive = r.memory_usage("naive", samples=0)
        print("Redis memory per node for 24 h of history (8,640 ticks at 10 s):")
        for name, size in parts.items():
            print(f"  {name:30s} {size / 1024:8.1f} KB")
        print(f"  {'total':30s} {total / 1024:8.1f} KB   (goal 200 KB; naive capped JSON list {naive / 1024:.0f} KB)")
    finally:
        server.cleanup()


def reactor_time(ticks=300):
    """Reactor-thread time of each tick: the tick itself, and all reactor CPU per tick including callbacks."""
    from scrapy.utils.test import get_crawler
    from twisted.internet import reactor, task

    server = RedisServer().start()
    crawler = get_crawler(settings_dict={"MONITOR_INTERVAL": 3600, "MONITOR_REDIS_URL": server.url,
                                         "REDIS_URL": server.url})
    for k in range(40):  # a realistic stats dict
        crawler.stats.set_value(f"downloader/response_status_count/{200 + k}", k)
    crawler.stats.set_value("response_received_count", 1000)
    ext = monitors.SpiderMonitor.from_crawler(crawler)

    class Spider:
        name = "bench"

    durations, cpu_times, cpu = [], [], {}

    def measured():
        if ext.lock.locked:
            return  # wait for the last tick's thread, as the loop itself does
        t, c = time.perf_counter(), time.thread_time()
        ext.tick()
        durations.append(time.perf_counter() - t)
        cpu_times.append(time.thread_time() - c)
        if len(durations) >= ticks:
            loop.stop()
            ext.lock.run(reactor.stop)  # once the last tick's thread is done

    def idle():
        cpu["idle_calls"] = cpu.get("idle_calls", 0) + 1
        if cpu["idle_calls"] >= ticks:
            idle_loop.stop()
            cpu["idle"] = time.thread_time() - cpu["idle_start"]
            cpu["start"] = time.thread_time()
            loop.start(0.01)

    def begin():
        ext.start(Spider())  # a real opened monitor; its own hourly loop stays out of the way
        cpu["idle_start"] = time.thread_time()
        idle_loop.start(0.01)

    loop = task.LoopingCall(measured)
    idle_loop = task.LoopingCall(idle)
    reactor.callWhenRunning(begin)
    reactor.run()
    total = time.thread_time() - cpu["start"]
    # The thread side of a tick: sampling, queue sizes and the Redis write, timed directly.
    stats = dict(crawler.stats.get_stats())
    started = time.thread_time()
    for _ in range(200):
        ext.collect_and_publish(stats, {"status": "running"})
    thread_side = (time.thread_time() - started) / 200
    server.cleanup()
    per_tick = (total - cpu["idle"]) / len(durations)
    print(f"reactor-thread time per tick over {len(durations)} ticks:")
    for name, values in (("CPU time", cpu_times), ("wall time", durations)):
        print(f"  tick() on the reactor, {name}: median {statistics.median(values) * 1e6:.0f} us, "
              f"p95 {sorted(values)[int(len(values) * 0.95)] * 1e6:.0f} us (goal: median 200 us or less)")
    print(f"  all reactor CPU per tick incl. callbacks, less an empty loop of the same rate: {per_tick * 1e6:.0f} us")
    print(f"  the tick's thread side (sample, queue sizes, Redis write): {thread_side * 1e3:.2f} ms CPU; "
          f"at a 1 s interval the monitor uses {(per_tick + thread_side) * 100:.2f}% of one core")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pages", type=int, default=1500)
    parser.add_argument("--skip-crawl", action="store_true", help="only the memory and reactor figures")
    args = parser.parse_args()
    memory()
    reactor_time()
    if not args.skip_crawl:
        throughput(args.rounds, args.pages)
