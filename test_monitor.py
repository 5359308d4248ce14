"""The node monitor end to end: real redis-server, real local website, real ``scrapy crawl`` processes."""

import glob
import io
import json
import logging
import signal
import socket
import time

import pytest
from scrapy.exceptions import NotConfigured
from scrapy.utils.test import get_crawler

import alert
import monitor_api
import monitor_contract
import monitor_nodes
import monitor_read
import monitor_settings
import monitor_snapshot
import monitors
import testbed
import testbed_servers
from main_spider import DistributedSpider
from testbed_servers import RedisServer, Site, crawl_log, wait_for

SEED_FIELDS = {"timestamp", "spider", "cpu", "memory", "bytes_sent", "bytes_recv"}
CONTRACT_FIELDS = SEED_FIELDS | {"node", "host", "pid", "status", "interval", "pages", "items"}


def nodes(client, prefix="scrapy"):
    return testbed.list_nodes(client, prefix)[0]


def crawler_env(url, **extra):
    return {"REDIS_URL": url, "MONITOR_INTERVAL": "1", **extra}


@pytest.fixture
def plain_project(tmp_path):
    """A plain Scrapy project whose settings hold nothing but its spider and the monitor's one line."""
    return testbed_servers.scrapy_project(tmp_path, "plain", testbed_servers.PLAIN_SPIDER)


def test_two_nodes_share_one_queue_and_report_separately(redis_client, redis_url, crawlers):
    site = Site(pages=60, delay=0.25).start()
    try:
        settings = {"MAX_IDLE_TIME_BEFORE_CLOSE": 5, "CONCURRENT_REQUESTS": 2}
        procs = [crawlers(env=crawler_env(redis_url), settings=settings) for _ in range(2)]
        ids = {f"main_spider:{socket.gethostname()}:{p.pid}" for p in procs}
        wait_for(lambda: set(nodes(redis_client)) == ids, 30, what="both nodes registered")
        redis_client.lpush("distributed:start_urls", json.dumps({"url": site.url}))

        first = wait_for(lambda: [n for n in nodes(redis_client).values() if n["pages"] >= 3], 20,
                         what="pages counted")[0]
        for proc in procs:
            assert proc.wait(90) == 0, crawl_log(proc)
            assert "Remote control HTTP server" not in crawl_log(proc)  # settings.py: no code-running console

        final = nodes(redis_client)
        assert set(final) == ids
        for node_id, snap in final.items():
            assert CONTRACT_FIELDS <= set(snap), snap
            assert snap["node"] == node_id and snap["spider"] == "main_spider"
            assert snap["status"] == "closed" and snap["state"] == "closed"
            assert snap["finish_reason"] == "finished"
            assert snap["interval"] == 1
            assert 0 <= snap["cpu"] <= 100 and 0 < snap["memory"] <= 100
            assert snap["bytes_recv"] > 0 and snap["rss"] > 10_000_000
            assert snap["items"] > 0, f"{node_id} crawled nothing: {snap}"
            assert snap["queue_requests"] == 0 and snap["queue_start_urls"] == 0
            assert snap["queue_dupefilter"] == 60
        grown = final[first["node"]]
        assert grown["pages"] > first["pages"] and grown["items"] >= first["items"]
        # Every page fetched exactly once across the two processes, and every item counted once.
        assert site.page_hits() == {p: 1 for p in site.page_paths()}
        assert sum(s["items"] for s in final.values()) == 60
        assert sum(s["status_2xx"] for s in final.values()) >= 60
        # The history grew while they crawled and never went backwards.
        for node_id in ids:
            points = testbed.read_history(redis_client, node_id, 10)
            pages = [p["pages"] for p in points]
            assert len(points) >= 3 and pages == sorted(pages) and pages[-1] == final[node_id]["pages"]
    finally:
        site.stop()


def test_start_urls_are_picked_up_promptly_in_both_formats(redis_client, redis_url, site, crawlers):
    proc = crawlers(env=crawler_env(redis_url, MONITOR_NODE_ID="waiting-node"))
    wait_for(lambda: "waiting-node" in nodes(redis_client), 30, what="node registered")
    # Past the node's first look at the queue, well inside the engine's 5-second idle tick. A sleep: the spider's
    # 1-second start URL poll leaves no trace to wait for.
    time.sleep(1.5)
    pushed = time.monotonic()
    redis_client.lpush("distributed:start_urls", site.url)  # a plain URL string
    wait_for(lambda: site.first_hit, 10, what="the start URL fetched")
    assert site.first_hit - pushed < 3.0
    wait_for(lambda: site.page_hits().get("/page/39"), 30, what="the whole site crawled")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert nodes(redis_client)["waiting-node"]["finish_reason"] == "shutdown"


def test_make_request_from_data_accepts_json_and_plain_urls():
    spider = DistributedSpider.from_crawler(get_crawler(DistributedSpider, {"REDIS_URL": "redis://127.0.0.1:1"}))
    req = spider.make_request_from_data(b'{"url": "http://a.test/x", "meta": {"job": 7}}')
    assert (req.url, req.meta["job"], req.dont_filter, req.method) == ("http://a.test/x", 7, False, "GET")
    assert spider.make_request_from_data(b"http://a.test/y").url == "http://a.test/y"
    assert spider.make_request_from_data(b'"http://a.test/z"').url == "http://a.test/z"
    assert spider.make_request_from_data(b'{"url": "http://a.test/", "dont_filter": true}').dont_filter
    assert spider.make_request_from_data(b'{"no": "url"}') == []
    assert spider.make_request_from_data(b"javascript:alert(1)") == []


def test_killed_node_reads_stale_after_three_intervals(redis_client, redis_url, site, crawlers):
    proc = crawlers(env=crawler_env(redis_url, MONITOR_INTERVAL="1"))
    node = f"main_spider:{socket.gethostname()}:{proc.pid}"
    wait_for(lambda: nodes(redis_client).get(node, {}).get("state") == "live", 30, what="node live")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    last = nodes(redis_client)[node]
    assert last["status"] == "running"
    assert monitor_snapshot.node_state(last, monitor_snapshot.last_report(last) + 3) == "live"
    assert monitor_snapshot.node_state(last, monitor_snapshot.last_report(last) + 3.01) == "stale"
    wait_for(lambda: nodes(redis_client)[node]["state"] == "stale", 6, what="node stale")
    assert time.time() - last["timestamp"] > 3


def test_plain_spider_is_monitored_with_the_extension_line_only(redis_client, redis_url, site, crawlers,
                                                                plain_project):
    proc = crawlers("plain", env=crawler_env(redis_url), cwd=plain_project, args=["-a", f"url={site.url}"])
    assert proc.wait(60) == 0, crawl_log(proc)
    (node_id, snap), = nodes(redis_client).items()
    assert node_id == f"plain:{socket.gethostname()}:{proc.pid}"
    assert snap["status"] == "closed" and snap["finish_reason"] == "finished"
    assert snap["items"] == 40 and snap["pages"] >= 40
    assert snap["pages_per_min"] == snap["errors_per_min"] == snap["net_recv_rate"] == 0  # closed: no rate
    assert "queue_requests" not in snap  # not a scrapy-redis spider
    assert site.page_hits() == {p: 1 for p in site.page_paths()}


def test_monitor_redis_outage_never_stops_the_crawl(redis_url, crawlers, plain_project):
    metrics = RedisServer().start()
    site = Site(pages=80, delay=0.2).start()
    try:
        env = crawler_env(redis_url, MONITOR_REDIS_URL=metrics.url, CONCURRENT_REQUESTS="2")
        proc = crawlers("plain", env=env, cwd=plain_project,
                        args=["-a", f"url={site.url}", "-s", "CONCURRENT_REQUESTS=2"])
        wait_for(lambda: nodes(metrics.client()), 30, what="node registered")
        metrics.stop()
        hits = sum(site.page_hits().values())
        wait_for(lambda: sum(site.page_hits().values()) > hits + 5, 3,
                 what="more pages while Redis is down (the crawl stalled)")
        wait_for(lambda: "cannot write metrics to Redis" in crawl_log(proc), 15, what="the node to miss a write")
        metrics.start()  # empty: it keeps nothing on disk
        back = wait_for(lambda: [s for s in nodes(metrics.client()).values() if s["status"] == "running"],
                        15, what="node reporting again while it crawls")
        assert proc.wait(60) == 0
        snap = next(iter(nodes(metrics.client()).values()))
        assert snap["status"] == "closed" and snap["items"] == 80
        assert 0 < back[0]["items"] < 80
        assert site.page_hits() == {p: 1 for p in site.page_paths()}
        log = crawl_log(proc)
        assert log.count("cannot write metrics to Redis") == 1, log
        assert log.count("is back; node") == 1
        assert "Traceback" not in log
    finally:
        metrics.cleanup()
        site.stop()


def test_hanging_monitor_redis_does_not_slow_the_crawl(redis_url, crawlers, plain_project, hanging_port):
    # The two crawls run side by side, each on a site of its own: a loaded machine slows both alike (one after
    # the other, a busy moment could fall on either).
    envs = {"off": {"MONITOR_ENABLED": "0"}, "hanging": {"MONITOR_REDIS_URL": f"redis://127.0.0.1:{hanging_port}/0"}}
    sites = {label: Site(pages=80, delay=0.05).start() for label in envs}
    try:
        started = time.monotonic()
        procs = {label: crawlers("plain", env=crawler_env(redis_url, **extra), cwd=plain_project,
                                 args=["-a", f"url={sites[label].url}", "-s", "CONCURRENT_REQUESTS=4"])
                 for label, extra in envs.items()}
        times = {}

        def exited():
            for label, proc in procs.items():
                if label not in times and proc.poll() is not None:
                    times[label] = time.monotonic() - started
            return len(times) == len(procs)

        wait_for(exited, 60, step=0.05, what="both crawls to exit")
        for label, proc in procs.items():
            assert proc.returncode == 0, crawl_log(proc)
            assert sites[label].page_hits() == {p: 1 for p in sites[label].page_paths()}, label
        log = crawl_log(procs["hanging"])
        assert log.count("cannot write metrics to Redis") == 1, log
        # Each Redis call gives up after a second, off the reactor: the crawl and its exit barely notice.
        assert times["hanging"] < times["off"] + 4.0, times
    finally:
        for site in sites.values():
            site.stop()


def test_a_tick_before_the_crawl_starts_counts_nothing_in_flight():
    # Scrapy 2.13+ raises RuntimeError for crawler.engine until the crawl starts (it was None before).
    ext = monitors.SpiderMonitor.from_crawler(get_crawler(settings_dict={"REDIS_URL": "redis://127.0.0.1:1"}))
    assert ext._in_flight() is False


def test_disabled_monitor_raises_not_configured():
    with pytest.raises(NotConfigured):
        monitors.SpiderMonitor.from_crawler(get_crawler(settings_dict={"MONITOR_ENABLED": False}))
    with pytest.raises(NotConfigured):
        monitors.SpiderMonitor.from_crawler(get_crawler(settings_dict={"MONITOR_INTERVAL": 0}))
    ext = monitors.SpiderMonitor.from_crawler(get_crawler(settings_dict={
        "MONITOR_INTERVAL": 2.5, "MONITOR_KEY_PREFIX": "p", "MONITOR_NODE_ID": "n1",
        "REDIS_URL": "redis://q:1/0", "MONITOR_REDIS_URL": "redis://m:2/0"}))
    assert (ext.interval, ext.prefix, ext.node_id, ext.queue_url, ext.url) == (
        2.5, "p", "n1", "redis://q:1/0", "redis://m:2/0")
    assert ext.history_len == 1440


def test_history_is_bounded_and_keeps_a_day(redis_client):
    """8,640 ticks at 10 s: an hour at full resolution, a day in 5-minute rows, both expiring."""
    trend, start = monitor_contract.TrendBuffer(), 1_699_999_800  # on a 5-minute boundary
    for i in range(8640):
        snap = {"node": "n", "timestamp": start + 10 * i, "cpu": i % 100, "memory": 50.0,
                "pages": i * 3, "items": i, "errors": 0, "rss": 80_000_000 + i}
        rows = [r for r in [trend.add(monitor_contract.history_row(snap))] if r]
        with redis_client.pipeline() as pipe:
            monitor_contract.write_snapshot(pipe, "p", snap, 360, rows)
            pipe.execute()
    now = start + 10 * 8639
    hour = testbed.read_history(redis_client, "n", 60, "p", now)
    day = testbed.read_history(redis_client, "n", 1440, "p", now)
    assert len(hour) == 360 and hour[-1]["pages"] == 8639 * 3
    assert [p["timestamp"] for p in hour] == sorted(p["timestamp"] for p in hour)
    assert len(day) == 287  # the bucket in progress is still in memory
    assert day[0]["cpu"] == 14.5 and day[0]["timestamp"] == start  # mean of its 30 rows, first timestamp
    assert day[-1]["items"] == 8639 - 30  # last value of its bucket
    assert 0 < redis_client.ttl(monitor_contract.history_key("p", "n")) <= monitor_contract.HISTORY_TTL
    assert 0 < redis_client.ttl(monitor_contract.trend_key("p", "n")) <= monitor_contract.HISTORY_TTL


def test_read_side_states_cluster_view_and_malformed_values(redis_client):
    now = 1_000_000
    key = monitor_contract.status_key("scrapy")
    base = {"spider": "s", "interval": 10, "bytes_sent": 1, "bytes_recv": 2, "pages": 10, "items": 5, "host": "h1"}
    redis_client.hset(key, mapping={
        "a": json.dumps({**base, "node": "a", "timestamp": now - 5, "cpu": 10, "memory": 40,
                         "status": "running", "pages_per_min": 60, "queue_requests": 7}),
        "b": json.dumps({**base, "node": "b", "timestamp": now - 31, "cpu": 90, "memory": 60, "host": "h2",
                         "status": "running", "pages_per_min": 600, "bytes_recv": 3}),
        "c": json.dumps({**base, "node": "c", "timestamp": now - 500, "status": "closed"}),
        "x": json.dumps({**base, "spider": "other", "timestamp": now, "cpu": 1, "memory": 1}),
        "bad1": "{not json", "bad2": "[1, 2]", "bad3": '{"trunc',
        "nan": '{"spider": "s", "timestamp": 1, "cpu": NaN}', "inf": '{"spider": "s", "timestamp": 1e999}',
        "huge": '{"spider": "s", "timestamp": 1, "pages": 99999999999999999999}',
        "deep": "[" * 100_000, "nospider": '{"timestamp": 1}', "oldtime": '{"spider": "s", "timestamp": "1"}',
    })
    found, bad = testbed.list_nodes(redis_client, "scrapy", now)
    assert bad == 9 and set(found) == {"a", "b", "c", "x"}
    assert [found[n]["state"] for n in "abc"] == ["live", "stale", "closed"]
    view = monitor_read.cluster_view(found, "s")
    assert (view["nodes_live"], view["nodes_stale"], view["nodes_closed"]) == (1, 1, 1)
    assert view["cpu"] == 10 and view["memory"] == 40  # means over live nodes
    assert view["pages"] == 30 and view["items"] == 15
    assert view["bytes_recv"] == 2 + 3  # host counters count each host once (a and c share h1)
    assert view["pages_per_min"] == 60 and view["queue_requests"] == 7
    assert view["timestamp"] == now - 5 and set(view["nodes"]) == {"a", "b", "c"}
    assert monitor_read.cluster_view(found, "nobody") is None
    assert set(monitor_read.spiders_view(found)) == {"s", "other"}
    assert testbed.get_node(redis_client, "a", "scrapy", now)["state"] == "live"
    assert testbed.get_node(redis_client, "bad1", "scrapy") is None
    assert monitor_nodes.prune_nodes(redis_client, found, 400, "scrapy", now) == ["c"]
    assert not redis_client.hexists(key, "c")


def test_sampler_rates_and_redacted_urls():
    sampler = monitors.Sampler()
    stats = {"response_received_count": 10, "item_scraped_count": 4, "log_count/ERROR": 1,
             "downloader/response_status_count/200": 8, "downloader/response_status_count/404": 2}
    first = sampler.sample(stats, 100.0)
    assert (first["pages"], first["items"], first["errors"], first["pages_per_min"]) == (10, 4, 1, 0.0)
    assert (first["status_2xx"], first["status_4xx"], first["status_5xx"]) == (8, 2, 0)
    later = sampler.sample({**stats, "response_received_count": 40, "log_count/ERROR": 3}, 110.0)
    assert later["pages_per_min"] == 180.0 and later["errors_per_min"] == 12.0
    assert 0 <= later["cpu"] <= 100 and later["rss"] > 0
    too_soon = sampler.sample({**stats, "response_received_count": 41}, 110.1)
    assert too_soon["pages"] == 41 and too_soon["pages_per_min"] == 180.0
    assert monitor_settings.redact("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert monitor_settings.redact("rediss://user:pw@h/1") == "rediss://user:***@h/1"
    assert monitor_settings.redact("redis://h:6379/0") == "redis://h:6379/0"
    assert "s3cret" not in monitor_settings.redact("redis://u:s3cret@[::1]:7/0")
    # A message quoting a URL: passwords and secret query options are masked, named URLs cut to the host.
    assert monitor_settings.scrub("Error downloading <GET https://api.example/v1?api_key=s3cret&q=1>") == \
        "Error downloading <GET https://api.example/v1?api_key=***&q=1>"
    assert monitor_settings.scrub("refused redis://:s3c@ret@h:1/0") == "refused redis://:***@h:1/0"
    assert monitor_settings.scrub("POST https://hooks.example/T0/s3cret: 404", "https://hooks.example/T0/s3cret") == \
        "POST https://hooks.example/...: 404"


def test_bad_settings_turn_the_monitor_off_with_a_clear_reason(redis_url, site, crawlers, plain_project):
    for bad, reason in (({"MONITOR_INTERVAL": "soon"}, "ERROR: Monitor: MONITOR_INTERVAL must be a number of seconds"),
                        ({"MONITOR_REDIS_URL": "http://not-redis/"},
                         "ERROR: Monitor: MONITOR_REDIS_URL: http://not-redis/ is not a usable Redis URL")):
        proc = crawlers("plain", env=crawler_env(redis_url, **bad), cwd=plain_project, args=["-a", f"url={site.url}"])
        assert proc.wait(60) == 0
        log = crawl_log(proc)
        assert reason in log and "Traceback" not in log, log
    assert site.page_hits()["/page/39"] == 2  # both crawls still ran to the end


def refused_at_start(caplog, settings):
    """The one ERROR line the extension logs when a setting turns it off (and that it is off)."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="monitors"), pytest.raises(NotConfigured):
        monitors.SpiderMonitor.from_crawler(get_crawler(settings_dict=settings))
    [record] = [r for r in caplog.records if r.name == "monitors"]
    assert record.levelno == logging.ERROR
    return record.getMessage()


def test_short_or_odd_intervals_and_unknown_url_options_turn_the_monitor_off_at_start(caplog):
    for interval in (0.5, "inf", "nan", "-1", 86401, "1e308"):
        assert "MONITOR_INTERVAL must be a number of seconds, 1 or more and at most 86400" in \
            refused_at_start(caplog, {"MONITOR_INTERVAL": interval})
    assert monitors.SpiderMonitor.from_crawler(get_crawler(settings_dict={"MONITOR_INTERVAL": 1})).interval == 1
    for url in ("redis://:s3cret@localhost:6379/0?bogus=1", "redis://u:s3cret@localhost:99999/0",
                "redis://localhost/0?socket_timeout=soon"):
        message = refused_at_start(caplog, {"MONITOR_REDIS_URL": url})
        assert "is not a usable Redis URL" in message and "s3cret" not in message


def test_the_decode_gate_turns_away_what_would_break_a_reader(redis_client):
    """Text fields must be text that encodes as UTF-8, numbers below 1e18, interval within (0, 86400]."""
    good = {"spider": "s", "timestamp": 1000, "node": "n", "host": "h", "status": "running", "interval": 10,
            "pages": 10 ** 18 - 1, "cpu": -9.9e17, "finish_reason": None}
    bad = {
        "surrogate_node": '{"spider": "s", "timestamp": 1, "node": "\\ud800"}',
        "surrogate_spider": '{"spider": "\\udfff", "timestamp": 1}',
        "number_host": '{"spider": "s", "timestamp": 1, "host": 5}',
        "list_status": '{"spider": "s", "timestamp": 1, "status": ["running"]}',
        "dict_reason": '{"spider": "s", "timestamp": 1, "finish_reason": {}}',
        "big_int": '{"spider": "s", "timestamp": 1, "pages": 1000000000000000000}',
        "big_float": '{"spider": "s", "timestamp": 1, "cpu": -1e18}',
        "nested_big": '{"spider": "s", "timestamp": 1, "x": [1, {"y": 1e300}]}',
        "zero_interval": '{"spider": "s", "timestamp": 1, "interval": 0}',
        "long_interval": '{"spider": "s", "timestamp": 1, "interval": 86401}',
        "text_interval": '{"spider": "s", "timestamp": 1, "interval": "10"}',
        "text_seen": '{"spider": "s", "timestamp": 1, "seen": "now"}',
    }
    redis_client.hset(monitor_contract.status_key("scrapy"), mapping={"good": json.dumps(good), **bad})
    found, skipped = testbed.list_nodes(redis_client, "scrapy", 1000)
    assert skipped == len(bad) and set(found) == {"good"} and found["good"]["state"] == "live"
    # Sums over many nodes at the limit stay finite and exact.
    many = {f"n{i}": dict(found["good"], node=f"n{i}", host=f"h{i}") for i in range(1000)}
    view = monitor_read.cluster_view(many, "s")
    assert view["pages"] == 1000 * (10 ** 18 - 1)


def test_liveness_is_judged_on_redis_clock_and_a_stored_age_is_ignored(redis_client):
    snapshot = {"spider": "s", "timestamp": 1000, "interval": 10, "node": "n", "age": 99999}
    with redis_client.pipeline() as pipe:
        monitor_contract.write_snapshot(pipe, "scrapy", snapshot, 10, stamp=True)
        server = monitor_contract.redis_now(pipe.execute()[0])
    reader = monitor_nodes.NodeReader(redis_client, "scrapy")
    nodes, skipped, now = reader.read()
    stored = nodes["n"]
    assert skipped == 0 and "age" not in stored
    assert abs(stored["seen"] - server) < 0.002 and now >= server
    assert stored["state"] == "live"  # its own clock says 1970, Redis's says it just reported
    assert monitor_snapshot.node_state(stored, stored["seen"] + 30.01) == "stale"
    assert monitor_snapshot.age(stored, stored["seen"] + 12.5) == 12


FAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)


@pytest.mark.skipif(FAKETIME is None, reason="Debian's faketime package is missing (make test installs it as root)")
@pytest.mark.parametrize("shift", [-300, 300])
def test_a_crawler_whose_clock_is_five_minutes_off_is_live_then_stale_on_time(shift, redis_client, redis_url, site,
                                                                               crawlers):
    env = crawler_env(redis_url, LD_PRELOAD=FAKETIME, FAKETIME=f"{shift:+d}", FAKETIME_DONT_FAKE_MONOTONIC="1")
    proc = crawlers(env=env)
    node = f"main_spider:{socket.gethostname()}:{proc.pid}"
    api = monitor_api.create_app({"REDIS_URL": redis_url, "MONITOR_KEY_PREFIX": "scrapy", "MONITOR_API_CACHE": 0,
                                  "MONITOR_API_TOKEN": None, "MONITOR_RETENTION": 86400}).test_client()

    def snapshot():
        resp = api.get(f"/metrics/{node}")
        return resp.get_json() if resp.status_code == 200 else {}

    alerter = alert.Alerter(alert.load_config(["--redis-url", redis_url, "--for", "0", "--dry-run"]),
                            dry_run=True, out=io.StringIO())

    def down_alerts():
        return [n for n in alerter.run_once() or () if n["rule"] == "down"]

    wait_for(lambda: snapshot().get("state") == "live", 30, what="the node's first report")
    assert abs(snapshot()["timestamp"] - time.time() - shift) < 5  # it does write its own clock
    for _ in range(5):  # live for more than three intervals while it reports
        snap = snapshot()
        assert snap["state"] == "live" and snap["age"] <= 2, snap
        assert down_alerts() == []
        seen = monitor_snapshot.last_report(testbed.get_node(redis_client, node))
        wait_for(lambda seen=seen: monitor_snapshot.last_report(testbed.get_node(redis_client, node)) > seen, 5,
                 what="the node's next report")
    points = api.get(f"/metrics/{node}/history?minutes=5").get_json()["points"]
    assert len(points) >= 3 and all(abs(p["timestamp"] - time.time()) < 10 for p in points)  # Redis's clock
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    killed = time.time()
    wait_for(lambda: snapshot()["state"] == "stale", 6, what="the killed node to go stale")
    assert time.time() - killed < 5  # three 1 s intervals after its last report, plus a read
    assert [n["node"] for n in wait_for(down_alerts, 3, what="the down alert")] == [node]
