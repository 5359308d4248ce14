"""Crawl insight benchmarks: per-response and per-item cost of the hooks (called directly, as Scrapy's signal
would), and the size of a snapshot with 20 domains, 30 fields and 5 error samples.

    python bench/insight_hooks.py [--calls 20000]
"""

import argparse
import json
import logging
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scrapy import Request  # noqa: E402
from scrapy.http import HtmlResponse  # noqa: E402

import monitor_contract
import monitors  # noqa: E402

# A node's base fields, as bench/monitor.py writes them.
BASE = {"node": "main_spider:crawler-host-01:123456", "spider": "main_spider", "host": "crawler-host-01",
        "pid": 123456, "interval": 10, "start_time": 1_699_999_800, "status": "running",
        "queue_requests": 1234, "queue_start_urls": 0, "queue_dupefilter": 567890}


def responses(domains=50, per_domain=20):
    """Real Scrapy responses over ``domains`` hosts, with latencies and statuses as a crawl sees them."""
    out = []
    for d in range(domains):
        for i in range(per_domain):
            url = f"https://shop-{d:02d}.example.com/catalogue/page-{i}.html"
            request = Request(url, meta={"download_latency": 0.05 + (i * 37 % 100) / 40})
            status = 429 if i == 7 else 500 if i == 13 else 200
            out.append((HtmlResponse(url, status=status, body=b"<html></html>", request=request), request))
    return out


def per_call(fn, args_list, calls, batch=1000):
    """Median and p95 of the per-call cost over batches of ``batch`` calls (seconds)."""
    costs = []
    n = len(args_list)
    for start in range(0, calls, batch):
        t = time.perf_counter()
        for k in range(start, start + batch):
            fn(*args_list[k % n])
        costs.append((time.perf_counter() - t) / batch)
    costs.sort()
    return statistics.median(costs), costs[int(len(costs) * 0.95)]


def item(i):
    """A 30-field item, one nested level, with a field that goes missing now and then."""
    out = {f"field_{k:02d}": f"value {i}" for k in range(26)}
    out["price"] = None if i % 10 == 0 else 9.99
    out["seller"] = {"name": "ACME", "rating": 4.5}
    return out


def hooks(calls):
    ins = monitors.Insight(20)
    pairs = responses()
    median, p95 = per_call(lambda resp, req: ins.response_downloaded(resp, req, None), pairs, calls)
    print(f"response_downloaded: median {median * 1e6:.2f} us, p95 {p95 * 1e6:.2f} us per response "
          f"({calls} calls over {len({p[0].url.split('/')[2] for p in pairs})} domains; goal: median 10 us or less)")
    items = [(item(i), None, None) for i in range(100)]
    median, p95 = per_call(ins.item_scraped, items, calls)
    print(f"item_scraped (30 fields, one nested): median {median * 1e6:.2f} us, p95 {p95 * 1e6:.2f} us per item")
    t = time.perf_counter()
    for _ in range(100):
        ins.take_interval()
        ins.figures()
    print(f"take_interval + figures per tick: {(time.perf_counter() - t) / 100 * 1e6:.0f} us")
    return ins


def with_errors(ins):
    """``ins`` after five real ERROR records from Scrapy's scraper logger, each naming its request."""
    log = logging.getLogger("scrapy.core.scraper")
    log.addHandler(ins.handler)
    log.propagate = False
    for i in range(5):
        request = Request(f"https://shop-{i:02d}.example.com/catalogue/category/books/page-{i * 17}.html")
        log.error("Spider error processing %(request)s (referer: %(referer)s)",
                  {"request": request, "referer": "https://shop-00.example.com/catalogue/index.html"},
                  exc_info=(KeyError, KeyError("price"), None))
    log.removeHandler(ins.handler)
    return ins


def full_insight(calls=3000):
    """Insight figures at their budget (20 domains and other, 30 fields, 5 samples), for other benchmarks."""
    ins = monitors.Insight(20)
    pairs = responses()
    for k in range(calls):
        ins.response_downloaded(*pairs[k % len(pairs)], None)
    for i in range(100):
        ins.item_scraped(item(i), None, None)
    return {**ins.take_interval(), **with_errors(ins).figures()}


def size(ins):
    """A real snapshot (base fields, sampled) plus insight figures at their budget."""
    with_errors(ins)
    snap = {"timestamp": int(time.time()), **BASE, **monitors.Sampler().sample({}, time.time()),
            "status": "running", **ins.take_interval(), **ins.figures()}
    snap["latency_p50"], snap["latency_p95"], snap["latency_p99"] = 0.412, 1.873, 2.951
    data = json.dumps(snap, separators=(",", ":"))
    parts = {k: len(json.dumps(snap[k], separators=(",", ":"))) for k in sorted(monitor_contract.BIG_FIELDS)}
    print(f"snapshot with {len(snap['domains'])} domains (incl. other), {len(snap['fields'])} fields, "
          f"{len(snap['error_samples'])} error samples: {len(data)} bytes (goal: under 6 KB = 6144); "
          + ", ".join(f"{k} {v} B" for k, v in parts.items()))
    print(f"  without them (list views): {len(json.dumps(monitor_contract.slim(snap), separators=(',', ':')))} bytes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    collected = hooks(args.calls)
    size(collected)
