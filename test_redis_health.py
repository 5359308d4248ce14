"""GET /redis and the scrapy_redis_* Prometheus families: Redis's own health beside the crawl."""

import concurrent.futures

import pytest
import requests

from monitor_contract import history_key
from monitor_redis import full_in_hours, growth_per_min, spider_keys
from testbed import make_app, publish, snapshot
from testbed_servers import serving


@pytest.mark.parametrize("readings, expected", [
    ([], None),
    ([(100, 5)], None),
    ([(100, 5), (103, 50)], None),  # under 5 s of readings
    ([(100, 0), (130, 50)], 100.0),  # 50 in half a minute
    ([(0, 0), (100, 100), (160, 220), (170, 230)], 111.4),  # against the newest reading a minute old: 130 in 70 s
    ([(0, 500), (60, 440)], -60.0),  # a queue draining
])
def test_growth_per_minute_is_measured_over_a_minute_of_readings(readings, expected):
    assert growth_per_min(readings, 200) == (expected if expected is None else pytest.approx(expected, abs=0.1))


@pytest.mark.parametrize("used, limit, per_min, expected", [
    (100, 1000, 15, 1.0),  # 900 bytes to go at 900 bytes an hour
    (100, 0, 15, None),  # no limit known
    (100, 1000, 0, None),  # not growing
    (100, 1000, -5, None),  # shrinking
    (2000, 1000, 10, 0.0),  # over the limit already
])
def test_full_in_hours_forecast(used, limit, per_min, expected):
    assert full_in_hours(used, limit, per_min) == expected


@pytest.mark.parametrize("named, expected_start", [
    (None, "s:start_urls"),
    ({"start_urls": "distributed:start_urls"}, "distributed:start_urls"),
    ({"start_urls": 5, "bogus": "x"}, "s:start_urls"),  # a name that is not text, or an unknown queue: ignored
    ({"start_urls": "x" * 301}, "s:start_urls"),
])
def test_spider_keys_come_from_the_snapshot_or_scrapy_redis_defaults(named, expected_start):
    keys = spider_keys("s", {"queues": named} if named is not None else {})
    assert keys["start_urls"] == expected_start and keys["requests"] == "s:requests" and set(keys) == {
        "requests", "start_urls", "dupefilter"}


def test_redis_route_serves_info_sizes_footprint_and_prometheus_reading_info_once_a_second(redis_client, redis_url):
    queues = {"requests": "s:requests", "start_urls": "seeds", "dupefilter": "s:dupefilter", "start_urls_type": "list"}
    publish(redis_client, snapshot("a:1", spider="s", queues=queues), history=3)
    redis_client.rpush("s:requests", *range(40))  # scrapy-redis's FIFO queue: a list
    redis_client.zadd("s:requests2", {"x": 1})
    redis_client.sadd("s:dupefilter", *range(25))
    redis_client.lpush("seeds", "http://example.com/")
    redis_client.persist(history_key("scrapy", "a:1"))  # a monitor key that should expire and does not
    before = redis_client.info("commandstats").get("cmdstat_info", {}).get("calls", 0)
    with serving(make_app(redis_url, MONITOR_API_CACHE=1)) as base:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: requests.get(base + "/redis", timeout=5), range(40)))
        metrics = requests.get(base + "/prometheus", timeout=5).text
    after = redis_client.info("commandstats")["cmdstat_info"]["calls"]
    assert after - before <= 4  # 40 requests (and a scrape) in about a second: INFO read once or twice, not 41 times
    assert {r.status_code for r in replies} == {200}
    body = replies[-1].json()
    for field in ("used_memory", "maxmemory", "maxmemory_policy", "evicted_keys", "instantaneous_ops_per_sec",
                  "connected_clients", "role", "connected_slaves", "uptime_in_seconds"):
        assert field in body and field in next(iter(body["nodes"].values()))
    assert body["role"] == "master" and body["limit"] > 0
    queues = body["spiders"]["s"]
    assert (queues["requests"]["size"], queues["dupefilter"]["size"], queues["start_urls"]["size"]) == (40, 25, 1)
    assert queues["start_urls"]["key"] == "seeds" and queues["requests"]["bytes"] > 0
    assert body["monitor"]["bytes"] > 0 and body["monitor"]["no_ttl"] == [history_key("scrapy", "a:1")]
    assert 'scrapy_redis_queue_size{queue="requests",spider="s"} 40.0' in metrics
    for family in ("scrapy_redis_memory_used_bytes", "scrapy_redis_memory_max_bytes", "scrapy_redis_evicted_keys_total",
                   "scrapy_redis_connected_clients"):
        assert f"\n{family}{{" in metrics


def test_redis_route_is_503_json_when_redis_is_down(hanging_port):
    with serving(make_app(f"redis://127.0.0.1:{hanging_port}/0")) as base:
        reply = requests.get(base + "/redis", timeout=5)
    assert reply.status_code == 503 and "error" in reply.json()


# ---------------------------------------------------------------------------- the two Redis rules

def _cfg(*argv):
    import alert

    return alert.load_config(["--for", "0", "--redis-url", "redis://127.0.0.1:1/0", *argv])


@pytest.mark.parametrize("view, argv, fired", [
    ({"used_memory": 950, "limit": 1000, "evicted": 0}, (), ["redis_memory"]),
    ({"used_memory": 900, "limit": 1000, "evicted": 0}, (), []),  # at the limit, not over it
    ({"used_memory": 950, "limit": 1000, "evicted": 0}, ("--redis-memory", "0.96"), []),
    ({"used_memory": 950, "limit": 1000, "evicted": 0}, ("--redis-memory", "0"), []),  # off
    ({"used_memory": 950, "limit": None, "evicted": 0}, (), []),  # no limit known
    ({"used_memory": 10, "limit": 1000, "evicted": 3}, (), ["redis_evictions"]),
    ({"used_memory": 10, "limit": 1000, "evicted": 3}, ("--rules", "down"), []),
])
def test_redis_rules_fire_on_a_masters_figures(view, argv, fired):
    import monitor_rules

    view = {"maxmemory_policy": "allkeys-lru", **view}
    changes, _, notes = monitor_rules.evaluate({}, {}, {}, 1e9, _cfg(*argv), redis_views={"r1:6379": view})
    assert sorted(n["rule"] for n in notes) == fired
    assert all(n["node"] == "r1:6379" and n["status"] == "firing" for n in notes)
    assert set(changes) == {f"{rule}:r1:6379" for rule in fired}
    # figures back to normal resolve them; a master gone from INFO resolves its alerts too
    for views in ({"r1:6379": {**view, "used_memory": 1, "evicted": 0}}, {}):
        _, _, over = monitor_rules.evaluate({}, changes, {}, 1e9 + 60, _cfg(*argv), redis_views=views)
        assert sorted(n["rule"] for n in over if n["status"] == "resolved") == fired


def test_the_alerter_reads_info_and_fires_on_memory_and_evictions(make, redis_client, smtp):
    alerter = make("--for", "0")
    assert alerter.tick()
    assert smtp.subjects() == []
    used = redis_client.info("memory")["used_memory"]
    try:
        redis_client.config_set("maxmemory-policy", "allkeys-random")
        redis_client.config_set("maxmemory", used + 512 * 1024)
        for i in range(40):  # 2 MB of filler into a 0.5 MB margin: Redis evicts
            redis_client.set(f"filler:{i}", "x" * 50_000)
        assert redis_client.info("stats")["evicted_keys"] > 0
        assert alerter.tick()
    finally:
        redis_client.config_set("maxmemory", 0)
        redis_client.config_set("maxmemory-policy", "noeviction")
    (subject,) = smtp.subjects()
    assert "redis_memory on 127.0.0.1:" in subject and "redis_evictions on 127.0.0.1:" in subject


# ---------------------------------------------------------------------------- the page's Redis panel

def test_the_page_shows_the_redis_panel_as_text(api, redis_client, open_page):
    hostile = '<img src=x onerror="window.__xss=1">'
    publish(redis_client, snapshot("n1", spider=hostile), snapshot("n2", spider="s"))
    redis_client.rpush(f"{hostile}:requests", *range(7))
    redis_client.sadd("s:dupefilter", *range(12))
    page = open_page(f"{api.url}/?interval=300", bypass_csp=True)  # even with the CSP off, nothing runs
    page.wait_for_selector("#redis:not([hidden]) tr[data-redis-spider]")
    rows = page.evaluate("""() => [...document.querySelectorAll('#rd-spiders tbody tr')]
        .map((r) => [...r.cells].map((c) => c.textContent))""")
    assert [r[:4] for r in rows] == [[hostile, "7", "\u2013", "0"], ["s", "0", "\u2013", "12"]] or \
        [r[:4] for r in rows] == [["s", "0", "\u2013", "12"], [hostile, "7", "\u2013", "0"]]
    figures = page.text_content("#rd-figs")
    assert " of " in figures and "clients" in figures and "ops/s" in figures and "master" in figures
    assert page.evaluate("() => window.__xss") is None
    assert page.evaluate("() => document.querySelectorAll('#redis img').length") == 0
