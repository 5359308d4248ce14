"""A newcomer's mistakes explain themselves, and what the toolkit says is true: a wrong REDIS_URL for
``scrapy crawl main_spider`` and a busy port for ``python testbed.py`` are one line and a non-zero exit;
the demo site serves every page it counts; the first CPU reading is measured; an empty run is no baseline
(unless the spider usually scrapes nothing); a new crawl's growing queue is not an alert."""

import re
import socket
import subprocess
import sys
import threading
import time

import pytest

import alert
import monitor_contract
import monitor_records
import monitor_rules
import monitors
from testbed import ROOT
from testbed_servers import Site, clean_env, crawl_command, free_port

NOW = 1_800_000_000.0


@pytest.mark.parametrize("url, says", [
    ("redis://127.0.0.1:{port}/0", "main_spider: error: cannot reach Redis at redis://127.0.0.1:{port}/0 (Error 111"),
    ("redis://:s3cret@127.0.0.1:{port}/0", "main_spider: error: cannot reach Redis at redis://:***@127.0.0.1:{port}/0"),
    ("redis://127.0.0.1:{port}/0?bogus=1", "main_spider: error: REDIS_URL: redis://127.0.0.1:{port}/0?bogus=1 is not a "
                                           "usable Redis URL (unknown option 'bogus')"),
], ids=["refused", "password-masked", "unknown-option"])
def test_main_spider_with_a_wrong_redis_url_says_so_in_one_line(url, says):
    port = free_port()  # nothing listens there
    done = subprocess.run(crawl_command("main_spider", LOG_LEVEL="WARNING"), cwd=ROOT,
                          env=clean_env(REDIS_URL=url.format(port=port)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith(says.format(port=port)), done
    assert "s3cret" not in done.stderr


def test_main_spider_logs_no_traceback_at_info_either():
    done = subprocess.run(crawl_command("main_spider"), cwd=ROOT, env=clean_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "ERROR" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if "error" in line.lower()] == [done.stderr.splitlines()[-1]]


def test_testbed_on_a_busy_port_says_so_in_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "testbed.py", "--port", str(port)], cwd=ROOT, env=clean_env(),
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr == f"testbed.py: error: cannot serve on 127.0.0.1:{port} (Address already in use); " \
                          "stop what uses it or pass --port\n"


@pytest.mark.parametrize("pages", [2000, 500, 41, 7])
def test_the_demo_site_links_every_page_it_counts(pages):
    """The pages a crawler reaches from / by following the links of pages that answer 200 (as Scrapy does)."""
    site = Site(pages, mix=True)
    site.server.server_close()
    seen, todo = {0}, [0]
    while todo:
        i = todo.pop()
        if site.status_of(i) != 200:
            continue
        for path in re.findall(r'href="(/|/page/\d+)"', site.body(i)):
            n = 0 if path == "/" else int(path.rsplit("/", 1)[1])
            if n not in seen:
                seen.add(n)
                todo.append(n)
    assert seen == set(range(pages))
    assert {site.status_of(i) for i in seen} == ({200, 404, 500} if pages > 41 else {200, 404} if pages > 23 else {200})


# ---------------------------------------------------------------------------- small untruths

def test_the_first_cpu_readings_are_measured_whichever_thread_samples():
    """A tick samples in whichever thread of Twisted's pool runs it: psutil keeps its last host reading per
    thread, so each thread's first figure would read 0.0."""
    stop = threading.Event()
    burner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)], daemon=True)
    burner.start()  # this process keeps a core busy, so its CPU and the host's are above 0
    samples = []
    try:
        sampler = monitors.Sampler()
        time.sleep(monitors.MIN_CPU_SPAN)  # as the extension's first report waits
        for _ in range(2):  # each in a new thread, as pool threads are
            worker = threading.Thread(target=lambda: samples.append(sampler.sample({}, time.time())))
            worker.start()
            worker.join()
            time.sleep(monitors.MIN_WINDOW)
    finally:
        stop.set()
        burner.join()
    assert all(s["process_cpu"] > 0 and s["cpu"] > 0 for s in samples), samples


@pytest.mark.parametrize("before, after, percent", [
    ((100.0, 60.0), (110.0, 65.0), 50.0), ((100.0, 60.0), (110.0, 70.0), 0.0), ((100.0, 60.0), (110.0, 60.0), 100.0),
    ((100.0, 60.0), (100.0, 60.0), 0.0), ((100.0, 60.0), (103.0, 62.0), 33.3),
])
def test_host_cpu_percent(before, after, percent):
    assert monitors.host_cpu_percent(before, after) == percent


def seed_runs(client, spider, runs, start=1_000_000):
    """One run per ``(items, finish_reason)``, oldest first, 100 s apart and 60 s long; their records."""
    out = []
    for i, (items, reason) in enumerate(runs):
        begin = start + i * 100
        snap = {"node": f"n{begin}", "spider": spider, "host": "h", "pid": i, "start_time": begin,
                "timestamp": begin + 60, "items": items, "pages": 100, "errors": 0, "finish_reason": reason,
                "status": "closed"}
        monitor_contract.write_run(client, "scrapy", monitor_contract.run_record(snap), begin, 1000)
        out.append(monitor_contract.run_record(snap))
    return out


F, S = "finished", "shutdown"


@pytest.mark.parametrize("history, used, compared", [
    # five real runs, then three empty test runs: the empty ones are no baseline, the real run still compares
    pytest.param([(100, F), (120, F), (80, F), (110, F), (90, F), (0, F), (0, S), (0, F)], 5, {"items": 1.0},
                 id="empty-test-runs-left-out"),
    # a spider that usually scrapes nothing: its finished empty runs are its usual
    pytest.param([(0, F)] * 6, 6, {}, id="usually-nothing"),
    # ...but an empty run that did not finish is never one
    pytest.param([(0, F), (0, S), (0, F), (0, F), (0, S)], 3, {}, id="usually-nothing-shutdowns-left-out"),
    # two empty runs among real ones: not the usual, left out
    pytest.param([(100, F), (0, F), (100, F), (0, F), (100, F)], 3, {"items": 1.0}, id="some-empty"),
])
def test_an_empty_run_is_no_baseline_unless_the_spider_usually_scrapes_nothing(redis_client, history, used, compared):
    last_items = 100 if compared else 0
    records = seed_runs(redis_client, "s", history + [(last_items, F)])
    newest = monitor_records.read_runs(redis_client, "scrapy", "s", 1)[0][0]
    assert newest["baseline_runs"] == used
    if used >= monitor_contract.MIN_BASELINE:
        assert {k: v for k, v in newest["compare"].items() if k == "items"} == compared
    # the summary's baseline (Python) picks the same runs as the record's compare (Lua)
    assert monitor_records.baseline(list(reversed(records[:-1])))[1] == used


def growing_spider(started_ago, now=NOW):
    node = {"node": "s:h:1", "spider": "s", "host": "h", "timestamp": int(now), "seen": now, "interval": 10,
            "status": "running", "state": "live", "start_time": int(now - started_ago)}
    view = {"spider": "s", "queue_rate": 120.0, "nodes_live": 1, "queue_requests": 5000}
    return {node["node"]: node}, {"s": view}


@pytest.mark.parametrize("started_ago, pending", [(15, False), (1799, False), (1800, True), (7200, True)])
def test_no_queue_alert_in_a_crawls_first_alert_queue_growing(started_ago, pending):
    cfg = alert.load_config(["--queue-growing", "1800", "--rules", "queue"])
    nodes, views = growing_spider(started_ago)
    changes, _, notes = monitor_rules.evaluate(nodes, {}, {}, NOW, cfg, spiders=views)
    assert notes == [] and (changes.get("queue:s", {}).get("state") == "pending") == pending


def test_a_crawl_start_is_placed_on_redis_clock():
    """A node whose clock is an hour behind started 10 s ago, not an hour and 10 s ago."""
    nodes, _ = growing_spider(10)
    [node] = nodes.values()
    node.update(timestamp=int(NOW) - 3600, start_time=int(NOW) - 3610)
    assert monitor_rules.crawl_starts(nodes) == {"s": NOW - 10}
