"""Run history end to end: real crawls that finish, are stopped, killed or paused; the lost claim raced by
API processes and alerters; baselines on seeded runs; the API's parameters; the run alert rule."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import alert
import monitor_api
import monitor_channels
import monitor_contract
import monitor_nodes
import monitor_records
import monitor_settings
import monitor_snapshot
import monitors
import testbed
from testbed import ROOT
from testbed_servers import ApiServer, clean_env, crawl_log, free_port, wait_for, wait_until_answers

P = "scrapy"


def crawler_env(url, **extra):
    return {"REDIS_URL": url, "MONITOR_INTERVAL": "1", **extra}


def runs(client, spider="main_spider"):
    return monitor_records.read_runs(client, P, spider, 500)[0]


def seed(client, spider, items_list, reason="finished", start=1_000_000, node="n", keep=1000, pages=100,
         errors=0, step=100, duration=60):
    """Write one run per items figure, oldest first, each ``step`` seconds after the last."""
    out = []
    for i, items in enumerate(items_list):
        begin = start + i * step
        snap = {"node": f"{node}{begin}", "spider": spider, "host": "h", "pid": i, "start_time": begin,
                "timestamp": begin + duration, "items": items, "pages": pages, "errors": errors,
                "finish_reason": reason, "status": "closed", "peak_rss": 1000}
        record = monitor_contract.run_record(snap)
        monitor_contract.write_run(client, P, record, begin, keep)
        out.append(record)
    return out


def make_app(url, **config):
    return monitor_api.create_app({"REDIS_URL": url, "MONITOR_API_CACHE": 0, **config})


def make_alerter(url, *argv, **env):
    saved = {name: os.environ.pop(name, None) for name, *_ in alert.SETTINGS}
    try:
        os.environ.update({"REDIS_URL": url, **env})
        cfg = alert.load_config(list(argv))
    finally:
        for name, *_ in alert.SETTINGS:
            os.environ.pop(name, None)
            if saved[name] is not None:
                os.environ[name] = saved[name]
    out = io.StringIO()
    return alert.Alerter(cfg, channels={"console": monitor_channels.Console(out)}), out


# ---------------------------------------------------------------------------- baseline and records

def test_compare_is_the_ratio_to_the_median_of_the_previous_ten_runs_not_lost(redis_client):
    # 12 finished runs: items 10..120; a lost run in between must not count.
    seed(redis_client, "s", [10 * (i + 1) for i in range(12)])
    seed(redis_client, "s", [1], reason="lost", start=1_001_250, node="gone")
    [last] = seed(redis_client, "s", [55], start=1_001_300, pages=110, errors=11, duration=120)
    newest = runs(redis_client, "s")[0]
    assert newest["node"] == last["node"] and newest["baseline_runs"] == 10
    # The previous ten not lost: items 30..120, median 75; items_per_min the same (60 s runs); duration 60.
    assert newest["compare"] == {"items": round(55 / 75, 3), "items_per_min": round(27.5 / 75, 3),
                                 "pages_per_min": round(55 / 100, 3), "duration": 2, "baseline_of": "any"}
    # error ratio: the baseline's is 0, so it cannot be compared; the summary says the same medians
    summary = monitor_records.runs_summary(redis_client, P, "s", 1_001_500)
    assert summary["baseline_runs"] == 10 and summary["baseline"]["items"] == 75  # 55, 120 ... 40
    assert summary["reasons"] == {"finished": 13, "lost": 1} and summary["runs"] == 14
    assert summary["totals"] == {"finished": 13, "lost": 1}
    # Fewer than three earlier runs: nothing compared.
    first = seed(redis_client, "t", [5, 6, 7])
    assert [r["baseline_runs"] for r in runs(redis_client, "t")] == [2, 1, 0]
    assert all(r["compare"] is None for r in runs(redis_client, "t")) and len(first) == 3
    seed(redis_client, "t", [12], start=1_000_300)
    assert runs(redis_client, "t")[0]["compare"]["items"] == 2  # median of 5, 6, 7 is 6


def test_error_ratio_is_compared_and_records_stay_small(redis_client):
    seed(redis_client, "e", [10, 10, 10, 10], errors=5)  # 5 errors per 100 pages
    seed(redis_client, "e", [10], start=1_000_400, errors=20)
    newest = runs(redis_client, "e")[0]
    assert newest["compare"]["error_ratio"] == 4 and newest["compare"]["items"] == 1
    sizes = [len(m) for m in redis_client.zrange(monitor_contract.runs_key(P, "e"), 0, -1)]
    assert max(sizes) < 2048
    # hostile, long names are cut and stay under 2 KB
    snap = {"node": "\x01" * 5000, "spider": "e", "host": "<b>" * 2000, "finish_reason": "x" * 5000,
            "start_time": 1, "timestamp": 2, "status": "closed"}
    monitor_contract.write_run(redis_client, P, monitor_contract.run_record(snap), 1, 1000)
    assert max(len(m) for m in redis_client.zrange(monitor_contract.runs_key(P, "e"), 0, -1)) < 2048


def test_runs_are_capped_per_spider_and_the_counter_never_goes_down(redis_client, redis_url):
    seed(redis_client, "cap", list(range(8)), keep=5)
    kept = runs(redis_client, "cap")
    assert [r["items"] for r in kept] == [7, 6, 5, 4, 3]  # newest first, the oldest dropped
    assert redis_client.ttl(monitor_contract.runs_key(P, "cap")) == -1  # never by TTL
    text = make_app(redis_url).test_client().get("/prometheus").get_data(as_text=True)
    assert 'scrapy_runs_total{finish_reason="finished",spider="cap"} 8.0' in text


# ---------------------------------------------------------------------------- the API

def test_runs_page_cleanly_through_runs_sharing_an_end_time(redis_client, redis_url):
    for i in range(7):  # seven nodes ending in the same second
        seed(redis_client, "same", [i], start=1_000_000, node=f"node{i}-", step=0)
    seed(redis_client, "same", [99], start=900_000, reason="shutdown")
    c = make_app(redis_url).test_client()
    seen, cursor, pages = [], None, 0
    while True:
        query = "/runs?spider=same&limit=3" + (f"&before={cursor}" if cursor else "")
        body = c.get(query).get_json()
        seen += [r["node"] for r in body["runs"]]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert pages == 3 and len(seen) == 8 == len(set(seen)) and seen[-1] == "n900000"
    # before as unix seconds; reason filter; every spider's runs without ?spider=
    assert [r["items"] for r in c.get("/runs?spider=same&before=1000060").get_json()["runs"]] == [99]
    listed = c.get("/runs?spider=same&reason=shutdown,lost").get_json()["runs"]
    assert [r["finish_reason"] for r in listed] == ["shutdown"]
    seed(redis_client, "other", [1], start=1_000_001)
    both = c.get("/runs?limit=2").get_json()
    assert [r["spider"] for r in both["runs"]] == ["other", "same"] and both["next"]
    rest = c.get(f"/runs?limit=500&before={both['next']}").get_json()
    assert len(rest["runs"]) == 7 and rest["next"] is None


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=x", "limit=-1", "before=yesterday",
                                   "before=00000000001-00000000001-zz", "before=123456789012"])
def test_bad_runs_parameters_are_400_json(redis_url, query):
    resp = make_app(redis_url).test_client().get(f"/runs?spider=s&{query}")
    assert resp.status_code == 400 and resp.is_json and resp.get_json()["error"]


def test_summary_counts_reasons_and_days_and_404s_unknown_spiders(redis_client, redis_url):
    now = int(redis_client.time()[0])
    day = 86400
    seed(redis_client, "sum", [10, 20], start=now - 2 * day)
    seed(redis_client, "sum", [30], start=now - 1000, reason="lost")
    seed(redis_client, "sum", [40], start=now - 40 * day)  # beyond 30 days: counted, not in days
    c = make_app(redis_url).test_client()
    body = c.get("/runs/sum/summary").get_json()
    assert body["runs"] == 4 and body["reasons"] == {"finished": 2, "lost": 1}
    assert body["totals"] == {"finished": 3, "lost": 1}
    assert [d["runs"] for d in body["days"]] == [2, 1] and body["days"][0]["items"] == 30
    assert body["days"][0]["pages"] == 200 and set(body["days"][0]) == {"day", "runs", "pages", "items", "errors"}
    assert body["baseline_runs"] == 3 and body["baseline"]["items"] == 20
    resp = c.get("/runs/nobody/summary")
    assert resp.status_code == 404 and resp.get_json()["error"]
    # hostile names are data: a spider called __proto__ with a slash
    seed(redis_client, "__proto__/x", [1])
    assert c.get("/runs/__proto__/x/summary").get_json()["runs"] == 1
    assert c.get("/runs?spider=__proto__/x").get_json()["runs"][0]["spider"] == "__proto__/x"


def test_malformed_run_members_are_skipped(redis_client, redis_url):
    seed(redis_client, "m", [1, 2])
    key = monitor_contract.runs_key(P, "m")
    redis_client.zadd(key, {"99999999999-00000000000-000000000000 {not json": 0,
                            "junk": 0, '99999999998-00000000000-000000000000 {"spider":1}': 0})
    body = make_app(redis_url).test_client().get("/runs?spider=m").get_json()
    assert [r["items"] for r in body["runs"]] == [2, 1]


# ---------------------------------------------------------------------------- real crawls

def test_a_crawl_that_finishes_and_one_stopped_by_sigterm_record_their_runs(redis_client, redis_url, site, crawlers):
    finishing = crawlers(env=crawler_env(redis_url), settings={"MAX_IDLE_TIME_BEFORE_CLOSE": 3})
    stopped = crawlers(env=crawler_env(redis_url))
    host = socket.gethostname()
    redis_client.lpush("distributed:start_urls", json.dumps({"url": site.url}))
    assert finishing.wait(120) == 0, crawl_log(finishing)
    wait_for(lambda: testbed.get_node(redis_client, f"main_spider:{host}:{stopped.pid}") is not None, 30,
             what="second node reporting")
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(60) == 0, crawl_log(stopped)
    by_node = {r["node"]: r for r in runs(redis_client)}
    done, shut = by_node[f"main_spider:{host}:{finishing.pid}"], by_node[f"main_spider:{host}:{stopped.pid}"]
    assert done["finish_reason"] == "finished" and shut["finish_reason"] == "shutdown"
    assert done["pages"] + shut["pages"] >= 41 and done["items"] + shut["items"] == 40
    assert done["peak_rss"] > 10_000_000 and done["duration"] >= 3 and done["host"] == host
    assert done["pid"] == finishing.pid and done["status_2xx"] + shut["status_2xx"] >= 40
    assert done["end_time"] - done["start_time"] == done["duration"]
    closed = testbed.get_node(redis_client, done["node"])
    assert closed["peak_rss"] == done["peak_rss"] >= closed["rss"]
    assert monitor_records.run_totals(redis_client.hgetall(monitor_contract.run_meta_key(P, "totals"))) == {
        ("main_spider", "finished"): 1, ("main_spider", "shutdown"): 1}


def start_api(url, lost_after):
    port = free_port()
    env = clean_env({"REDIS_URL": url, "MONITOR_LOST_AFTER": str(lost_after), "MONITOR_API_CACHE": "0"})
    proc = subprocess.Popen([sys.executable, "monitor_api.py", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.url = f"http://127.0.0.1:{port}"
    return proc


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.load(resp)
    except OSError:
        return None


def test_a_sigkilled_crawl_is_recorded_lost_once_with_two_apis_and_two_alerters(redis_client, redis_url, site,
                                                                                crawlers):
    proc = crawlers(env=crawler_env(redis_url))
    node = f"main_spider:{socket.gethostname()}:{proc.pid}"
    redis_client.lpush("distributed:start_urls", json.dumps({"url": site.url}))
    wait_for(lambda: (testbed.get_node(redis_client, node) or {}).get("pages", 0) > 0, 60, what="pages")
    apis = [start_api(redis_url, 3) for _ in range(2)]
    alerters = [make_alerter(redis_url, "--once", MONITOR_LOST_AFTER="3", ALERT_INTERVAL="1")[0] for _ in range(2)]
    try:
        for a in apis:
            wait_until_answers(a.url + "/health", 30, "APIs up", proc=a)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        stop = threading.Event()
        reads = [0] * (len(apis) + len(alerters))  # each reader's finished reads

        def hammer(i, read):
            while not stop.is_set():
                read()
                reads[i] += 1

        readers = [lambda a=a: get(a.url + "/metrics") for a in apis] + [lambda a=a: a.reader.read() for a in alerters]
        threads = [threading.Thread(target=hammer, args=(i, read)) for i, read in enumerate(readers)]
        for t in threads:
            t.start()
        try:
            lost = wait_for(lambda: [r for r in runs(redis_client) if r["finish_reason"] == "lost"], 60,
                            what="the lost run")
            counted = list(reads)
            wait_for(lambda: all(n >= c + 10 for n, c in zip(reads, counted)), 30,
                     what="every reader to have ten more goes at it")
        finally:
            stop.set()
            for t in threads:
                t.join()
    finally:
        for a in apis:
            a.kill()
            a.wait()
    assert len(runs(redis_client)) == 1 and lost[0]["node"] == node
    last = testbed.get_node(redis_client, node)
    assert lost[0]["pages"] == last["pages"] and lost[0]["end_time"] == int(monitor_snapshot.last_report(last))
    assert monitor_records.run_totals(redis_client.hgetall(monitor_contract.run_meta_key(P, "totals"))) == {
        ("main_spider", "lost"): 1}
    assert redis_client.llen(monitor_contract.run_meta_key(P, "recent")) == 1


def test_a_late_node_keeps_its_run_and_corrects_the_lost_record(redis_client, redis_url, site, crawlers):
    proc = crawlers(env=crawler_env(redis_url), settings={"MAX_IDLE_TIME_BEFORE_CLOSE": 4})
    node = f"main_spider:{socket.gethostname()}:{proc.pid}"
    wait_for(lambda: testbed.get_node(redis_client, node) is not None, 60, what="node reporting")
    reader = monitor_nodes.NodeReader(redis_client, P, 0, lost_after=2)
    proc.send_signal(signal.SIGSTOP)  # late, not dead
    try:
        wait_for(lambda: reader.read() and [r for r in runs(redis_client) if r["finish_reason"] == "lost"], 30,
                 what="the lost run")
    finally:
        proc.send_signal(signal.SIGCONT)
    redis_client.lpush("distributed:start_urls", json.dumps({"url": site.url}))
    assert proc.wait(120) == 0, crawl_log(proc)
    [run] = runs(redis_client)
    assert run["node"] == node and run["finish_reason"] == "finished" and run["items"] == 40
    assert monitor_records.run_totals(redis_client.hgetall(monitor_contract.run_meta_key(P, "totals"))) == {
        ("main_spider", "finished"): 1, ("main_spider", "lost"): 0}
    reader.read()  # closed now: never lost again
    assert len(runs(redis_client)) == 1
    assert not redis_client.keys(monitor_contract.run_meta_key(P, "lost:*"))


def test_pruning_waits_for_the_lost_run(redis_client, redis_url):
    now = int(redis_client.time()[0])
    snap = {"node": "old:1", "spider": "p", "host": "h", "pid": 1, "start_time": now - 9000,
            "timestamp": now - 8000, "seen": now - 8000, "status": "running", "interval": 10, "pages": 3}
    redis_client.hset(monitor_contract.status_key(P), "old:1", json.dumps(snap))
    c = make_app(redis_url, MONITOR_RETENTION=3600).test_client()
    assert "old:1" not in c.get("/metrics").get_json()
    [run] = runs(redis_client, "p")
    assert run["finish_reason"] == "lost" and run["pages"] == 3 and run["duration"] == 1000
    claim = monitor_contract.run_claim_key(P, "old:1", now - 9000)
    assert 0 < redis_client.ttl(claim) <= monitor_nodes.CLAIM_AFTER_PRUNE


# ---------------------------------------------------------------------------- the alert rule

def test_the_run_rule_sends_each_bad_run_once_even_with_two_alerters(redis_client, redis_url):
    alerters = [make_alerter(redis_url, "--ok-reasons", "finished,shutdown,closespider_*") for _ in range(2)]
    assert alerters[0][0].run_once() == []  # the first evaluation starts the cursor: old runs are not news
    seed(redis_client, "r", [100, 100, 100, 100])  # good runs
    seed(redis_client, "r", [30], start=1_000_400)  # items 30% of usual
    seed(redis_client, "r", [100], start=1_000_500, reason="closespider_timeout")  # listed as fine
    seed(redis_client, "r", [100], start=1_000_600, reason="memusage_exceeded")
    seed(redis_client, "r", [100], start=1_000_700, reason="lost")
    barrier = threading.Barrier(2)
    sent = []

    def evaluate(alerter):
        for _ in range(3):
            barrier.wait()
            while alerter.run_once() is None:  # the other holds the lock: try again
                time.sleep(0.05)  # no event tells when the lock is free: a short pause between tries

    threads = [threading.Thread(target=evaluate, args=(a,)) for a, _ in alerters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _, out in alerters:
        sent += [line for line in out.getvalue().splitlines() if line.strip().startswith("FIRING")]
    assert len(sent) == 3, sent
    text = "\n".join(sent)
    assert "run     n1000400: run items 30% of usual (limit 50%)" in text
    assert "ended memusage_exceeded" in text and "run lost" in text and "closespider" not in text
    subjects = [line for _, out in alerters for line in out.getvalue().splitlines() if "FIRING 3:" in line]
    assert len(subjects) == 1 and "run on n1000400" in subjects[0]
    # no resolved message later, and nothing again
    for a, _ in alerters:
        assert a.run_once() == []


def test_the_run_rule_is_off_when_not_listed_and_settings_are_checked(redis_url):
    alerter, _ = make_alerter(redis_url, "--rules", "down")
    assert alerter.run_once() == []
    with pytest.raises(monitor_settings.ConfigError, match="MONITOR_LOST_AFTER"):
        make_alerter(redis_url, "--lost-after", "-1")
    with pytest.raises(monitor_settings.ConfigError, match="ALERT_RUN_ITEMS_RATIO"):
        make_alerter(redis_url, "--run-items-ratio", "x")
    with pytest.raises(monitor_settings.ConfigError, match="MONITOR_RUNS_KEEP"):
        monitor_api.create_app({"REDIS_URL": redis_url, "MONITOR_RUNS_KEEP": "0"})


def test_help_lists_the_run_settings():
    for script in ("monitor_api.py", "alert.py"):
        out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True).stdout
        assert "MONITOR_LOST_AFTER" in out and "MONITOR_RUNS_KEEP" in out
        if script == "alert.py":
            assert "ALERT_OK_REASONS" in out and "ALERT_RUN_ITEMS_RATIO" in out


# ---------------------------------------------------------------------------- the dashboard's Runs view

@pytest.fixture
def page_on_api(redis_url, open_page):
    """``open(fragment)``: the dashboard served by a real ``monitor_api.py``, in headless Chromium (conftest's
    ``open_page``: no page error allowed)."""
    server = ApiServer(redis_url, MONITOR_API_CACHE="0").start()
    try:
        yield lambda fragment: open_page(f"{server.url}/?interval=300#{fragment}")
    finally:
        server.stop()


def test_runs_view_shows_runs_bad_ones_comparisons_chart_and_pages(redis_client, page_on_api):
    spider = '<img src=x onerror="window.__xss=1">'
    seed(redis_client, spider, [100] * 25)  # 25 good runs
    seed(redis_client, spider, [38], start=1_010_000)  # 38 % of usual: −62 %
    seed(redis_client, spider, [5], start=1_020_000, reason="lost", node="gone")
    page = page_on_api("runs=" + urllib.request.quote(spider, safe=""))
    page.wait_for_function("() => document.querySelectorAll('#r-rows tr').length === 20", timeout=15000)
    # "Few items" is judged with run_items_ratio from GET /alerts settings: wait for that answer too.
    page.wait_for_function("() => document.querySelector('#r-bad').textContent === '2 of the last 27 runs bad'",
                           timeout=15000)
    rows = page.eval_on_selector_all("#r-rows tr", "trs => trs.map(t => [t.hasAttribute('data-bad'), "
                                     "[...t.children].map(c => c.textContent)])")
    assert rows[0][0] and rows[0][1][2] == "lost" and rows[0][1][1] == "gone1020000"
    assert rows[1][0] and rows[1][1][8] == "\u221262 % items vs usual" and rows[1][1][5] == "38"
    assert not rows[2][0] and rows[2][1][8] == "+0 % items vs usual" and rows[2][1][3] == "1 min 0 s"
    assert page.eval_on_selector_all("#r-chart rect", "rs => rs.length") == 27
    assert page.eval_on_selector_all("#r-chart rect.bad", "rs => rs.length") == 2
    assert page.text_content("#r-bad") == "2 of the last 27 runs bad"
    assert page.input_value("#r-spider") == spider and page.evaluate("() => window.__xss") is None
    os.makedirs(os.path.join(ROOT, "artifacts"), exist_ok=True)
    page.screenshot(path=os.path.join(ROOT, "artifacts", "dashboard-runs.png"), full_page=True)
    page.click("#r-older")
    page.wait_for_function("() => document.querySelectorAll('#r-rows tr').length === 7", timeout=15000)
    assert page.is_disabled("#r-older") and not page.is_disabled("#r-newer")
    last = page.eval_on_selector_all("#r-rows tr td:nth-child(2)", "tds => tds.map(t => t.textContent)")
    assert last[-1] == "n1000000"
    page.click("#r-newer")
    page.wait_for_function("() => document.querySelectorAll('#r-rows tr').length === 20", timeout=15000)
    page.click("#r-close")
    assert page.is_hidden("#runs") and "runs=" not in page.evaluate("() => location.hash")


def test_a_node_is_never_lost_between_its_reports(redis_client):
    now = int(redis_client.time()[0])
    slow = {"node": "slow:1", "spider": "q", "start_time": now - 100, "timestamp": now - 20, "seen": now - 20,
            "status": "running", "interval": 10}
    redis_client.hset(monitor_contract.status_key(P), "slow:1", json.dumps(slow))
    reader = monitor_nodes.NodeReader(redis_client, P, lost_after=1)
    reader.read()
    assert runs(redis_client, "q") == []  # 20 s silent, reports every 10 s: not stale yet
    redis_client.hset(monitor_contract.status_key(P), "slow:1", json.dumps(dict(slow, seen=now - 31)))
    reader.last_lost = -1e9
    reader.read()
    assert [r["finish_reason"] for r in runs(redis_client, "q")] == ["lost"]


def test_a_runs_key_of_the_wrong_type_is_named(redis_client, redis_url):
    redis_client.set(monitor_contract.runs_key(P, "w"), "oops")
    c = make_app(redis_url).test_client()
    for path in ("/runs?spider=w", "/runs/w/summary"):
        resp = c.get(path)
        assert resp.status_code == 500 and resp.get_json() == {"error": "scrapy:runs:w is a string, not a zset"}
    redis_client.delete(monitor_contract.runs_key(P, "w"))
    redis_client.set(monitor_contract.run_meta_key(P, "totals"), "oops")
    resp = c.get("/runs")
    assert resp.status_code == 500 and resp.get_json() == {"error": "scrapy:runmeta:totals is a string, not a hash"}


def test_the_extension_reads_monitor_runs_keep(caplog):
    from scrapy.exceptions import NotConfigured
    from scrapy.utils.test import get_crawler

    ext = monitors.SpiderMonitor.from_crawler(get_crawler(settings_dict={"MONITOR_RUNS_KEEP": "7"}))
    assert ext.runs_keep == 7
    for bad in ("0", "x", "-3", "+5", "5_000"):
        caplog.clear()
        with pytest.raises(NotConfigured):
            monitors.SpiderMonitor.from_crawler(get_crawler(settings_dict={"MONITOR_RUNS_KEEP": bad}))
        assert f"MONITOR_RUNS_KEEP must be a whole number from 1 to 999999999, not {bad!r}" in caplog.text
