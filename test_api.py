"""The Monitor API end to end: a private redis-server, Flask's test client, a real waitress server, curl,
and a real ``scrapy crawl`` node."""

import gzip
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import pytest
import requests
from flask import g
from prometheus_client.parser import text_string_to_metric_families

import monitor_api
import monitor_contract
import monitor_gate
import monitor_nodes
from testbed import ROOT, make_app, snap, store
from testbed_servers import RedisServer, clean_env, free_port, serving, wait_for

SEED_FIELDS = {"timestamp", "spider", "cpu", "memory", "bytes_sent", "bytes_recv"}
CONTRACT_FIELDS = SEED_FIELDS | {"node", "host", "pid", "status", "interval", "pages", "items", "state"}
LOAD_CLIENTS = 64
LOAD_SECONDS = 30


@pytest.fixture
def client(redis_url):
    return make_app(redis_url).test_client()


def path_of(name):
    """The URL path of a node or spider: every character but letters and digits escaped (dots too, or
    clients would resolve a node named ".." as a relative path)."""
    return "/metrics/" + quote(name, safe="").replace(".", "%2E")


def strict_json(data):
    """Parse as a browser would: NaN and Infinity are not JSON."""
    return json.loads(data, parse_constant=lambda c: pytest.fail(f"{c} in a JSON body"))


# ---------------------------------------------------------------------------- the seed's commands

def test_seed_curl_commands_work_as_written(redis_url, redis_client):
    """``curl localhost:5000/metrics`` and ``/metrics/main_spider`` against ``python monitor_api.py``."""
    now = int(time.time())
    a = snap("main_spider:host-a:1", cpu=12.5, memory=45.3, bytes_sent=102400, bytes_recv=409600)
    b = snap("main_spider:host-b:2", age=5, cpu=27.5, memory=54.7, bytes_sent=1000, bytes_recv=2000,
             host="host-b")
    store(redis_client, a, b)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "monitor_api.py", "--port", str(port)], cwd=ROOT,
                            env=clean_env(REDIS_URL=redis_url), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def curl(path):
            out = subprocess.run(["curl", "-s", "--max-time", "5", f"http://localhost:{port}{path}"],
                                 capture_output=True, timeout=10)
            return json.loads(out.stdout) if out.returncode == 0 and out.stdout else None

        wait_for(lambda: curl("/health"), 20, what="python monitor_api.py serving")
        everything = curl("/metrics")
        assert set(everything) == {a["node"], b["node"]}
        node = everything[a["node"]]
        assert CONTRACT_FIELDS <= set(node)
        assert {f: node[f] for f in SEED_FIELDS} == {"timestamp": now, "spider": "main_spider", "cpu": 12.5,
                                                     "memory": 45.3, "bytes_sent": 102400, "bytes_recv": 409600}
        assert node["state"] == "live"

        view = curl("/metrics/main_spider")
        assert SEED_FIELDS <= set(view) and view["spider"] == "main_spider"
        assert view["timestamp"] == now  # the newest
        assert view["cpu"] == 20.0 and view["memory"] == 50.0  # means
        assert view["bytes_sent"] == 103400 and view["bytes_recv"] == 411600  # sums
        assert set(view["nodes"]) == {a["node"], b["node"]} and view["nodes_live"] == 2
    finally:
        proc.terminate()
        proc.wait(10)
    assert b"Traceback" not in proc.stderr.read()


def test_a_seed_era_value_is_served_in_the_seeds_shape(client, redis_client):
    """The seed wrote one field per spider with six fields: that value still reads as the seed showed it."""
    seed = {"timestamp": int(time.time()), "spider": "main_spider", "cpu": 12.5, "memory": 45.3,
            "bytes_sent": 102400, "bytes_recv": 409600}
    redis_client.hset("scrapy:node:status", "main_spider", json.dumps(seed))
    body = client.get("/metrics").get_json()
    assert body["main_spider"].pop("age") in (0, 1)  # seconds since it reported, on Redis's clock
    assert body == {"main_spider": dict(seed, state="live")}
    one = client.get("/metrics/main_spider").get_json()
    assert one.pop("age") in (0, 1) and one == dict(seed, state="live")


def test_values_that_fail_the_gate_never_break_a_route(client, redis_client):
    """Every route answers 200 beside values that decode as JSON but would break a reader; normal nodes are
    intact, the others are counted as skipped."""
    hostile = {
        "lone": '{"spider": "main_spider", "timestamp": 1, "node": "\\ud800", "host": "\\udc00"}',
        "huge": '{"spider": "main_spider", "timestamp": 1, "pages": 999999999999999999999, "cpu": 1e300}',
        "forever": '{"spider": "main_spider", "timestamp": 1, "interval": 1e17}',
        "never": '{"spider": "main_spider", "timestamp": 1, "interval": -10}',
        "typed": '{"spider": "main_spider", "timestamp": 1, "status": 7, "finish_reason": []}',
    }
    store(redis_client, snap("main_spider:h:1"), snap("main_spider:h:2", host="host-b"))
    redis_client.hset("scrapy:node:status", mapping=hostile)
    # History rows a forger could write: far future and far past timestamps, absurd numbers.
    future = [json.dumps([2 ** 62] + [1] * (len(monitor_contract.HISTORY_FIELDS) - 1)),
              json.dumps([-(2 ** 62)] + [1e300] * (len(monitor_contract.HISTORY_FIELDS) - 1)),
              json.dumps([time.time() + 86400 * 365] + [1] * (len(monitor_contract.HISTORY_FIELDS) - 1))]
    redis_client.lpush(monitor_contract.history_key("scrapy", "main_spider:h:1"), *future)
    for path in ("/metrics", "/metrics/main_spider", "/metrics/main_spider:h:1", "/spiders", "/prometheus",
                 "/metrics/main_spider/history", "/metrics/main_spider:h:1/history", "/health",
                 "/metrics/main_spider/history?minutes=1440"):
        resp = client.get(path)
        assert resp.status_code == 200, (path, resp.data[:300])
    body = client.get("/metrics").get_json()
    assert set(body) == {"main_spider:h:1", "main_spider:h:2"} and body["main_spider:h:1"]["pages"] == 10
    assert client.get("/metrics").headers["X-Skipped-Entries"] == str(len(hostile))
    view = client.get("/metrics/main_spider").get_json()
    assert view["pages"] == 20 and view["nodes_live"] == 2
    for path in ("/metrics/main_spider:h:1/history", "/metrics/main_spider/history"):
        points = client.get(path).get_json()["points"]
        assert 0 < len(points) <= 360 and all(p["timestamp"] <= time.time() + 60 for p in points)
        assert all(p["pages"] is None or p["pages"] < 10 ** 18 for p in points)
    samples = {s.name: s for f in text_string_to_metric_families(client.get("/prometheus").data.decode())
               for s in f.samples if s.labels.get("node") == "main_spider:h:1"}
    assert samples["scrapy_responses_received_total"].value == 10


# ---------------------------------------------------------------------------- routes

def test_metrics_filters_by_spider_and_state(client, redis_client):
    store(redis_client, snap("a:1"), snap("a:2", age=100), snap("a:3", status="closed", finish_reason="finished"),
          snap("b:1", spider="other"))
    body = client.get("/metrics").get_json()
    assert {n: s["state"] for n, s in body.items()} == {"a:1": "live", "a:2": "stale", "a:3": "closed", "b:1": "live"}
    assert set(client.get("/metrics?spider=other").get_json()) == {"b:1"}
    assert set(client.get("/metrics?state=live").get_json()) == {"a:1", "b:1"}
    assert set(client.get("/metrics?state=stale,closed").get_json()) == {"a:2", "a:3"}
    assert set(client.get("/metrics?spider=main_spider&state=live").get_json()) == {"a:1"}
    assert client.get("/metrics?spider=nobody").get_json() == {}
    bad = client.get("/metrics?state=dead")
    assert bad.status_code == 400 and "state" in bad.get_json()["error"]


def test_a_silent_node_turns_stale_though_its_stored_value_is_unchanged(client, redis_client, monkeypatch):
    store(redis_client, snap("a:1"), snap("a:2"))
    assert {s["state"] for s in client.get("/metrics").get_json().values()} == {"live"}
    store(redis_client, snap("a:2", pages=11))  # a:2 reports again, a:1 falls silent for a minute
    later = time.time() + 60  # liveness is judged on Redis's clock: move it a minute on
    redis_now = monitor_contract.redis_now
    monkeypatch.setattr(monitor_nodes, "redis_now", lambda reply: redis_now(reply) + 60)
    store(redis_client, snap("a:2", timestamp=int(later), pages=12))
    body = client.get("/metrics").get_json()
    assert (body["a:1"]["state"], body["a:2"]["state"], body["a:2"]["pages"]) == ("stale", "live", 12)
    assert client.get("/metrics/a:1").get_json()["state"] == "stale"


def test_metrics_name_gives_a_node_or_a_spider_view_or_404(client, redis_client):
    store(redis_client, snap("main_spider:h:1", pages=10, items=8, queue_requests=3),
          snap("main_spider:h:2", age=100, pages=5, items=4, queue_requests=9),
          snap("other:h:1", spider="other"))
    node = client.get("/metrics/main_spider:h:1")
    assert node.status_code == 200 and node.get_json()["node"] == "main_spider:h:1"
    assert node.get_json()["state"] == "live" and "nodes" not in node.get_json()

    view = client.get("/metrics/main_spider").get_json()
    assert view["pages"] == 15 and view["items"] == 12
    assert (view["nodes_live"], view["nodes_stale"], view["nodes_closed"]) == (1, 1, 0)
    assert view["queue_requests"] == 3  # the newest reading of the shared queue
    assert set(view["nodes"]) == {"main_spider:h:1", "main_spider:h:2"}
    assert view["nodes"]["main_spider:h:2"]["state"] == "stale"

    missing = client.get("/metrics/nobody")
    assert missing.status_code == 404 and missing.is_json and missing.get_json()["error"]


def test_spiders_lists_one_view_per_spider(client, redis_client):
    store(redis_client, snap("a:1", pages=10), snap("a:2", pages=20, status="closed"), snap("b:1", spider="other"))
    redis_client.hset("scrapy:node:status", "junk", b"{not json")
    resp = client.get("/spiders")
    body = resp.get_json()
    assert set(body) == {"main_spider", "other"}
    assert body["main_spider"]["nodes"] == ["a:1", "a:2"]
    assert body["main_spider"]["pages"] == 30 and body["main_spider"]["nodes_closed"] == 1
    assert body["main_spider"]["pages_per_min"] == 6.0  # rates count live nodes only
    assert resp.headers["X-Skipped-Entries"] == "1"


def test_health_reports_redis_and_needs_no_token(redis_url, redis_client):
    store(redis_client, snap("a:1"), snap("a:2"))
    c = make_app(redis_url, MONITOR_API_TOKEN="s3cret").test_client()
    resp = c.get("/health")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok", "redis": "ok", "nodes": 2}


def test_history_of_a_node_and_of_its_spider(client, redis_client):
    base = int(time.time()) // 10 * 10 - 100
    with redis_client.pipeline(transaction=False) as pipe:
        for k in range(10):
            a = snap("a:1", cpu=10.0, pages=100 + k, queue_requests=5, timestamp=base + 10 * k + 1)
            monitor_contract.write_snapshot(pipe, "scrapy", a, 360)
            if k != 5:  # node b misses one report: its last row still counts, not a dip to zero
                b = snap("b:1", cpu=30.0, pages=1000 + k, queue_requests=7, timestamp=base + 10 * k + 5,
                         host="host-b")
                monitor_contract.write_snapshot(pipe, "scrapy", b, 360)
        pipe.execute()

    node = client.get("/metrics/a:1/history?minutes=5").get_json()
    assert (node["name"], node["kind"], node["minutes"], node["step"]) == ("a:1", "node", 5, 10)
    assert [p["pages"] for p in node["points"]] == list(range(100, 110))
    assert [p["timestamp"] for p in node["points"]] == [base + 10 * k + 1 for k in range(10)]
    assert set(monitor_contract.HISTORY_FIELDS) == set(node["points"][0])

    spider = client.get("/metrics/main_spider/history?minutes=5").get_json()
    assert spider["kind"] == "spider" and spider["step"] == 10
    points = {p["timestamp"]: p for p in spider["points"]}
    for k in range(10):
        p = points[base + 10 * k]
        assert p["nodes"] == 2
        assert p["pages"] == 100 + k + (1004 if k == 5 else 1000 + k)
        # The shared queue's newest reading: in bucket 5 node a reported after b's last report.
        assert p["cpu"] == 20.0 and p["queue_requests"] == (5 if k == 5 else 7)
    assert client.get("/metrics/main_spider/history").get_json()["minutes"] == 60


def test_a_spiders_chart_keeps_counting_a_node_that_stopped_as_its_card_does(client, redis_client):
    base = int(time.time()) // 10 * 10 - 100
    with redis_client.pipeline(transaction=False) as pipe:
        for k in range(10):
            if k < 4:  # node a dies after four reports; b goes on
                monitor_contract.write_snapshot(
                    pipe, "scrapy", snap("a:1", pages=100 + k, items=k, timestamp=base + 10 * k), 360)
            monitor_contract.write_snapshot(pipe, "scrapy", snap("b:1", host="host-b", pages=1000 + k, items=10 * k,
                                                          timestamp=base + 10 * k + 5), 360)
        pipe.execute()
    store(redis_client, snap("c:1", host="host-c", pages=7, items=7, status="closed", timestamp=base - 7200))
    card = client.get("/metrics/main_spider").get_json()
    points = client.get("/metrics/main_spider/history?minutes=5").get_json()["points"]
    assert card["pages"] == 103 + 1009 + 7 and card["items"] == 3 + 90 + 7
    assert (points[-1]["pages"], points[-1]["items"]) == (card["pages"], card["items"])
    assert points[-1]["nodes"] == 1  # rates and gauges: only the node still reporting
    assert [p["pages"] for p in points] == sorted(p["pages"] for p in points)  # never a dip when a node dies


def test_history_beyond_an_hour_comes_from_the_5_minute_tier(client, redis_client):
    now = int(time.time())
    rows = [monitor_contract.history_row(snap("a:1", timestamp=now - 7200 + 300 * i, pages=i)) for i in range(20)]
    store(redis_client, snap("a:1"), trend_rows=rows)  # LPUSHed in order: the tier reads newest first
    body = client.get("/metrics/a:1/history?minutes=180").get_json()
    assert body["step"] == 300
    assert [p["pages"] for p in body["points"]] == list(range(20))
    assert client.get("/metrics/a:1/history?minutes=30").get_json()["points"][-1]["pages"] == 10


@pytest.mark.parametrize("minutes", ["0", "-5", "1441", "abc", "1.5", "", "٣"])
def test_history_rejects_bad_minutes(client, redis_client, minutes):
    store(redis_client, snap("a:1"))
    resp = client.get(f"/metrics/a:1/history?minutes={quote(minutes)}")
    assert resp.status_code == 400 and "minutes" in resp.get_json()["error"]


def test_history_of_an_unknown_name_is_404(client, redis_client):
    store(redis_client, snap("a:1"))
    resp = client.get("/metrics/nobody/history")
    assert resp.status_code == 404 and resp.get_json()["error"]


def test_prometheus_exposition(client, redis_client):
    odd = 'main_spider:we"ird\\host\n:1'
    store(redis_client, snap("main_spider:h:1", cpu=12.5, items=8, rss=1234, bytes_sent=100, status_2xx=9),
          snap(odd, status="closed", items=3), snap("other:h:1", spider="other", queue_requests=42))
    redis_client.hset("scrapy:node:status", "junk", b"not json")
    resp = client.get("/prometheus?detail=node")
    assert resp.status_code == 200 and resp.content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.get_data(as_text=True))}

    def value(family, **labels):
        return [s.value for s in families[family].samples
                if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created")]

    assert families["scrapy_items_scraped"].type == "counter"
    assert value("scrapy_items_scraped", node="main_spider:h:1", spider="main_spider") == [8]
    assert value("scrapy_items_scraped", node=odd) == [3]  # hostile label values are escaped
    assert value("scrapy_host_cpu_usage_ratio", node="main_spider:h:1") == [0.125]
    assert value("scrapy_process_resident_memory_bytes", node="main_spider:h:1") == [1234]
    assert value("scrapy_host_network_sent_bytes", node="main_spider:h:1") == [100]
    assert value("scrapy_http_responses", node="main_spider:h:1", status_class="2xx") == [9]
    assert value("scrapy_node_up", node="main_spider:h:1") == [1] and value("scrapy_node_up", node=odd) == [0]
    assert value("scrapy_nodes", spider="main_spider", state="closed") == [1]
    assert value("scrapy_queue_size", spider="other", queue="requests") == [42]
    assert value("scrapy_monitor_skipped_entries") == [1]
    assert "scrapy_items_scraped_total{" in resp.get_data(as_text=True)


def test_dashboard_is_served_or_404_json(redis_url, tmp_path):
    page = tmp_path / "dashboard.html"
    page.write_text("<!DOCTYPE html><title>dash</title>")
    c = make_app(redis_url, DASHBOARD_PATH=str(page)).test_client()
    resp = c.get("/")
    assert resp.status_code == 200 and resp.content_type.startswith("text/html") and b"dash" in resp.data
    missing = make_app(redis_url, DASHBOARD_PATH=str(tmp_path / "none.html")).test_client().get("/")
    assert missing.status_code == 404 and "dashboard" in missing.get_json()["error"]


# ---------------------------------------------------------------------------- faults

def test_malformed_values_are_skipped_and_counted(client, redis_client):
    good = snap("main_spider:h:1", extra=[1.0, 2.0])
    text = json.dumps(good)
    store(redis_client, good)
    bad = {
        "not-json": b"hello", "truncated": text[:60].encode(), "a-list": b"[1, 2]", "a-string": b'"x"',
        "empty": b"", "binary": b"\xff\xfe\x00", "deep": b"[" * 100_000 + b"]" * 100_000,
        "nan-cpu": text.replace('"cpu": 12.5', '"cpu": NaN').encode(),
        "inf-timestamp": text.replace(f'"timestamp": {good["timestamp"]}', '"timestamp": 1e999').encode(),
        "no-spider": b'{"timestamp": 1}', "spider-list": b'{"timestamp": 1, "spider": ["x"]}',
        "huge-int": text.replace('"pages": 10', '"pages": 100000000000000000000000').encode(),
        "nested-inf": text.replace("[1.0, 2.0]", "[1.0, Infinity]").encode(),
        "nested-nan": text.replace("[1.0, 2.0]", "[[[NaN]]]").encode(),
    }
    redis_client.hset("scrapy:node:status", mapping=bad)

    resp = client.get("/metrics")
    assert resp.status_code == 200
    body = strict_json(resp.data)
    assert set(body) == {"main_spider:h:1"} and body["main_spider:h:1"]["extra"] == [1.0, 2.0]
    assert resp.headers["X-Skipped-Entries"] == str(len(bad))
    for path in ("/metrics/main_spider", "/spiders", "/prometheus", "/metrics/main_spider/history"):
        resp = client.get(path)
        assert resp.status_code == 200, path
        if resp.is_json:
            strict_json(resp.data)
    for name in bad:
        resp = client.get(path_of(name))
        assert resp.status_code == 404 and resp.is_json, name
        assert client.get(path_of(name) + "/history").status_code == 404


HOSTILE_IDS = [
    "main_spider:host/with/slashes:1", "/leading-slash", "trailing-slash/", "double//slash", "//", "..",
    "../../etc/passwd", "爬虫:主机:7", "emoji 🕷 spider:x", "q?x=1&y=2", "hash#frag", "pct%2Fencoded",
    "sp ace\ttab", '<script>alert("x")</script>', "nul\x00byte", "x" * 10240,
]


def test_hostile_node_ids_are_found_or_404_never_500(client, redis_client):
    store(redis_client, *(snap(n) for n in HOSTILE_IDS))
    listed = client.get("/metrics").get_json()
    assert set(listed) == set(HOSTILE_IDS)
    for node in HOSTILE_IDS:
        for safe in ("", "/"):  # slashes sent encoded or as they are
            resp = client.get("/metrics/" + quote(node, safe=safe))
            assert resp.status_code == 200 and resp.get_json()["node"] == node, node[:50]
            hist = client.get("/metrics/" + quote(node, safe=safe) + "/history?minutes=5")
            assert hist.status_code == 200 and hist.get_json()["name"] == node, node[:50]
        for other in (node + "x", "x" + node):
            resp = client.get(path_of(other))
            assert resp.status_code == 404 and resp.is_json, other[:50]
    assert client.get("/metrics/%FF%FE").status_code == 404  # not UTF-8


def test_hostile_ids_over_real_http(redis_url, redis_client):
    store(redis_client, *(snap(n) for n in HOSTILE_IDS))
    with serving(make_app(redis_url)) as base:
        for node in HOSTILE_IDS:
            resp = requests.get(base + path_of(node), timeout=10)
            assert resp.status_code == 200 and resp.json()["node"] == node, node[:50]
        resp = requests.get(base + path_of("y" * 10240), timeout=10)
        assert resp.status_code == 404 and resp.json()["error"]


def test_redis_down_is_503_within_a_second_and_recovers_by_itself():
    server = RedisServer().start()
    try:
        store(server.client(), snap("main_spider:h:1"))
        c = make_app(server.url, MONITOR_API_CACHE=1).test_client()
        assert c.get("/metrics").status_code == 200

        server.stop()
        stopped = time.monotonic()
        start = time.monotonic()
        health = c.get("/health")
        assert health.status_code == 503 and health.get_json() == {"error": "Redis is unavailable"}
        assert time.monotonic() - start < 1.0
        while True:  # the cached /metrics may answer for up to its second, then 503
            start = time.monotonic()
            resp = c.get("/metrics")
            assert time.monotonic() - start < 1.0
            if resp.status_code == 503:
                break
            assert resp.status_code == 200 and time.monotonic() - stopped < 1.5
            time.sleep(0.05)  # the pace of the polling
        assert resp.get_json() == {"error": "Redis is unavailable"}
        assert c.get("/metrics/main_spider").status_code == 503
        assert c.get("/prometheus").status_code == 503

        server.start()  # same port (and empty: the node reports again): the app recovers without a restart
        store(server.client(), snap("main_spider:h:1"))
        wait_for(lambda: c.get("/metrics").status_code == 200, 3, what="recovery")
        assert c.get("/health").status_code == 200
        assert c.get("/metrics/main_spider").get_json()["nodes_live"] == 1

        os.kill(server.proc.pid, signal.SIGSTOP)  # a hung Redis: accepts, never answers
        try:
            for path in ("/health", "/metrics/main_spider:h:1/history", "/spiders?hung"):
                start = time.monotonic()
                resp = c.get(path)
                assert resp.status_code == 503 and resp.is_json, path
                assert time.monotonic() - start < 1.0, path
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        wait_for(lambda: c.get("/health").status_code == 200, 3, what="recovery from the hang")
        assert c.get("/metrics/main_spider:h:1/history").status_code == 200
    finally:
        server.cleanup()


def test_token_is_required_everywhere_but_health(redis_url, redis_client):
    store(redis_client, snap("main_spider:h:1"))
    c = make_app(redis_url, MONITOR_API_TOKEN="s3cret", MONITOR_API_CACHE=1).test_client()
    ok = {"Authorization": "Bearer s3cret"}
    for path in ("/metrics", "/metrics/main_spider", "/metrics/main_spider/history", "/spiders", "/prometheus",
                 "/openapi.json", "/", "/no/such/route"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
            resp = c.get(path, headers=headers)
            assert resp.status_code == 401, (path, headers)
            assert resp.get_json()["error"] and resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert c.get(path + "?token=wrong").status_code == 401
    assert c.get("/metrics", headers=ok).status_code == 200
    assert c.get("/metrics?token=s3cret").status_code == 200
    # The answer is cached now: the cached path checks the token too.
    assert c.get("/metrics").status_code == 401 and c.get("/metrics?token=s3cre").status_code == 401
    assert c.get("/metrics", headers=ok).status_code == 200
    assert c.get("/health").status_code == 200
    # A browser's preflight carries no token.
    pre = c.options("/metrics", headers={"Origin": "null", "Access-Control-Request-Method": "GET",
                                         "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and "Authorization" in pre.headers["Access-Control-Allow-Headers"]


def test_cors_headers(redis_url, redis_client):
    store(redis_client, snap("main_spider:h:1"))
    c = make_app(redis_url, MONITOR_API_CACHE=1).test_client()  # default origins: null
    for _ in range(2):  # computed, then from the cache
        resp = c.get("/metrics", headers={"Origin": "null"})
        assert resp.headers["Access-Control-Allow-Origin"] == "null"
        assert "ETag" in resp.headers["Access-Control-Expose-Headers"]
        assert "X-Skipped-Entries" in resp.headers["Access-Control-Expose-Headers"]
        assert "Origin" in resp.headers["Vary"]
        assert "Access-Control-Allow-Origin" not in c.get("/metrics", headers={"Origin": "http://evil.test"}).headers
    own = c.get("/metrics", headers={"Origin": "http://localhost"})  # the API's own origin
    assert own.headers["Access-Control-Allow-Origin"] == "http://localhost"
    error = c.get("/metrics/nobody", headers={"Origin": "null"})  # errors are readable too
    assert error.status_code == 404 and error.headers["Access-Control-Allow-Origin"] == "null"
    pre = c.options("/metrics/main_spider/history", headers={
        "Origin": "null", "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["Access-Control-Allow-Origin"] == "null"
    assert "GET" in pre.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]

    listed = make_app(redis_url, MONITOR_CORS_ORIGINS="http://a.test, http://b.test").test_client()
    assert listed.get("/metrics", headers={"Origin": "http://b.test"}).headers["Access-Control-Allow-Origin"] == "http://b.test"
    assert "Access-Control-Allow-Origin" not in listed.get("/metrics", headers={"Origin": "null"}).headers
    anyone = make_app(redis_url, MONITOR_CORS_ORIGINS="*").test_client()
    assert anyone.get("/spiders", headers={"Origin": "http://x.test"}).headers["Access-Control-Allow-Origin"] == "http://x.test"


def test_every_error_is_json(client, redis_client, monkeypatch):
    store(redis_client, snap("main_spider:h:1"))
    missing = client.get("/no/such/page")
    assert missing.status_code == 404 and missing.is_json and missing.get_json()["error"]
    for method in ("post", "put", "delete", "patch"):
        resp = getattr(client, method)("/metrics")
        assert resp.status_code == 405 and resp.is_json and resp.get_json()["error"]
        assert "GET" in resp.headers["Allow"]
    assert client.post("/metrics/main_spider").status_code == 405

    def boom(nodes):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(monitor_api, "spiders_view", boom)
    monkeypatch.setenv("FLASK_DEBUG", "1")  # debug mode is never on, whatever the environment says
    c = make_app(client.application.config["REDIS_URL"]).test_client()
    assert c.application.debug is False
    resp = c.get("/spiders")
    assert resp.status_code == 500 and resp.get_json() == {"error": "internal error"}
    assert b"secret" not in resp.data and b"Traceback" not in resp.data


def test_no_route_writes_to_redis(redis_url, redis_client):
    store(redis_client, snap("main_spider:h:1"), snap("main_spider:h:2", age=100), snap("b:1", spider="b"))
    redis_client.hset("scrapy:node:status", "junk", b"nope")

    def changes():
        return redis_client.info("persistence")["rdb_changes_since_last_save"]

    before = changes()
    keys = sorted(redis_client.keys("*"))
    c = make_app(redis_url).test_client()
    for path in ("/metrics", "/metrics?state=stale", "/metrics/main_spider", "/metrics/main_spider:h:1",
                 "/metrics/main_spider/history", "/metrics/main_spider:h:1/history?minutes=600", "/spiders",
                 "/health", "/prometheus", "/openapi.json", "/metrics/junk", "/metrics/nobody"):
        assert c.get(path).status_code in (200, 404)
    assert changes() == before and sorted(redis_client.keys("*")) == keys


def test_nodes_silent_past_retention_are_pruned_with_their_history(redis_url, redis_client):
    store(redis_client, snap("old:1", age=7200), snap("young:1", age=60))
    assert redis_client.exists(monitor_contract.history_key("scrapy", "old:1"))
    app = make_app(redis_url, MONITOR_RETENTION=3600)
    c = app.test_client()
    assert set(c.get("/metrics").get_json()) == {"young:1"}
    assert redis_client.hkeys("scrapy:node:status") == [b"young:1"]
    assert redis_client.hkeys("scrapy:node:slim") == redis_client.hkeys("scrapy:node:insight") == [b"young:1"]
    assert not redis_client.exists(monitor_contract.history_key("scrapy", "old:1"),
                                   monitor_contract.trend_key("scrapy", "old:1"))
    assert redis_client.exists(monitor_contract.history_key("scrapy", "young:1"))

    store(redis_client, snap("old:2", age=7200))  # housekeeping runs at most once a minute
    assert "old:2" in c.get("/metrics").get_json()
    app.extensions["reader"].node_reader.last_prune -= monitor_nodes.PRUNE_EVERY
    assert "old:2" not in c.get("/spiders").get_json()["main_spider"]["nodes"]
    assert not redis_client.hexists("scrapy:node:status", "old:2")

    store(redis_client, snap("old:3", age=10 ** 6))
    assert "old:3" in make_app(redis_url, MONITOR_RETENTION=0).test_client().get("/metrics").get_json()


def test_cache_etag_304_and_gzip(redis_url, redis_client):
    store(redis_client, snap("main_spider:h:1", pages=1), snap("other:h:1", spider="other"))
    c = make_app(redis_url, MONITOR_API_CACHE=1).test_client()
    first = c.get("/metrics")
    etag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == "no-cache"
    again = c.get("/metrics", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == etag

    zipped = c.get("/metrics", headers={"Accept-Encoding": "gzip, deflate"})
    assert zipped.headers["Content-Encoding"] == "gzip" and zipped.headers["ETag"] != etag
    assert json.loads(gzip.decompress(zipped.data)) == first.get_json()
    assert "Content-Encoding" not in c.get("/metrics", headers={"Accept-Encoding": "gzip;q=0"}).headers
    assert set(c.get("/metrics?spider=other").get_json()) == {"other:h:1"}  # cached per query string

    store(redis_client, snap("main_spider:h:1", pages=2))
    changed = time.monotonic()
    fresh = wait_for(lambda: (r := c.get("/metrics", headers={"If-None-Match": etag})).status_code == 200 and r, 2,
                     what="a new body")
    assert time.monotonic() - changed <= 1.2  # a response is at most about a second old
    assert fresh.get_json()["main_spider:h:1"]["pages"] == 2 and fresh.headers["ETag"] != etag


def test_openapi_describes_the_routes_and_real_responses_match(redis_url, redis_client, tmp_path):
    store(redis_client, snap("main_spider:h:1"), snap("main_spider:h:2", status="closed"))
    page = tmp_path / "dashboard.html"
    page.write_text("<!DOCTYPE html>")
    app = make_app(redis_url, DASHBOARD_PATH=str(page))
    c = app.test_client()
    spec = c.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")

    routes = {r.rule.replace("<node:name>", "{name}") for r in app.url_map.iter_rules() if r.endpoint != "static"}
    assert routes == set(spec["paths"])

    def resolve(schema):
        while "$ref" in schema:
            schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        return schema

    def check(schema, value, where):
        schema = resolve(schema)
        if "oneOf" in schema:
            fits = []
            for option in schema["oneOf"]:
                try:
                    check(option, value, where)
                    fits.append(option)
                except AssertionError:
                    pass
            assert fits, f"{where}: matches none of oneOf"
            return
        kind = schema.get("type")
        if kind == "object":
            assert isinstance(value, dict), where
            missing = set(schema.get("required", ())) - set(value)
            assert not missing, f"{where}: missing {missing}"
            for key, sub in schema.get("properties", {}).items():
                if key in value:
                    check(sub, value[key], f"{where}.{key}")
            if isinstance(schema.get("additionalProperties"), dict):
                for key, sub in value.items():
                    check(schema["additionalProperties"], sub, f"{where}[{key}]")
        elif kind == "array":
            assert isinstance(value, list), where
            for i, item in enumerate(value):
                check(schema.get("items", {}), item, f"{where}[{i}]")
        elif kind in ("integer", "number"):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        elif kind == "string":
            assert isinstance(value, str), where
        if "enum" in schema:
            assert value in schema["enum"], where

    def call(path):
        resp = c.get(path)
        op = spec["paths"][template]["get"]
        assert str(resp.status_code) in op["responses"], f"{path}: {resp.status_code} not documented"
        content = op["responses"][str(resp.status_code)].get("content", {})
        if "application/json" in content:
            check(content["application/json"]["schema"], resp.get_json(), path)
        else:
            assert any(resp.content_type.startswith(t) for t in content), path
        return resp.status_code

    for template in (t for t in spec["paths"] if "get" in spec["paths"][t]):  # changing routes: their own tests
        if "{name}" in template:
            # a spider (and a node)
            spider_only = template.startswith(("/runs/", "/queues/"))
            for name in ("main_spider",) if spider_only else ("main_spider:h:1", "main_spider"):
                assert call(template.replace("{name}", quote(name, safe=""))) == 200
            assert call(template.replace("{name}", "nobody")) == 404
        else:
            assert call(template) == 200
    template = "/metrics"
    assert call("/metrics?state=nope") == 400
    template = "/metrics/{name}/history"
    assert call("/metrics/main_spider/history?minutes=0") == 400


# ---------------------------------------------------------------------------- the gate: Host, cached path, acting

def test_host_is_refused_without_a_token_unless_it_is_the_apis_own(redis_url, redis_client):
    """DNS rebinding: a foreign page whose name resolves to the API sends its own name as Host."""
    store(redis_client, snap("main_spider:h:1"))
    with serving(make_app(redis_url)) as base:
        port = base.rsplit(":", 1)[1]
        for host in ("evil.test", f"evil.test:{port}", "localhost.evil.test", "10.1.2.3", "127.0.0.1.evil.test"):
            resp = requests.get(base + "/metrics", headers={"Host": host}, timeout=10)
            assert resp.status_code == 400 and "MONITOR_API_HOSTS" in resp.json()["error"], host
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST.", "127.0.0.2", f"[::1]:{port}"):
            assert requests.get(base + "/metrics", headers={"Host": host}, timeout=10).status_code == 200, host
        assert requests.get(base + "/health", headers={"Host": "evil.test"}, timeout=10).status_code == 200

    listed = make_app(redis_url, MONITOR_API_HOSTS="monitor.example, Other.Example:5000")
    with serving(listed) as base:
        for host in ("monitor.example", "monitor.example:5000", "other.example:8080"):
            assert requests.get(base + "/metrics", headers={"Host": host}, timeout=10).status_code == 200, host
        assert requests.get(base + "/metrics", headers={"Host": "evil.test"}, timeout=10).status_code == 400

    with serving(make_app(redis_url, MONITOR_API_TOKEN="s3cret")) as base:  # the token protects it instead
        headers = {"Host": "evil.test", "Authorization": "Bearer s3cret"}
        assert requests.get(base + "/metrics", headers=headers, timeout=10).status_code == 200
        assert requests.get(base + "/metrics", headers={"Host": "evil.test"}, timeout=10).status_code == 401


def test_the_cached_fast_path_goes_through_the_same_gate(redis_url, redis_client):
    store(redis_client, snap("main_spider:h:1"))

    def counted(app):
        """The app, counting the requests that reach Flask (the others were answered from the cache)."""
        inner, calls = app.wsgi_app.app, []

        def counting(environ, start_response):
            calls.append(environ["PATH_INFO"])
            return inner(environ, start_response)

        app.wsgi_app.app = counting
        return app, calls

    app, calls = counted(make_app(redis_url, MONITOR_API_CACHE=60))
    with serving(app) as base:
        first = requests.get(base + "/metrics", headers={"Origin": "null"}, timeout=10)
        again = requests.get(base + "/metrics", headers={"Origin": "null"}, timeout=10)
        assert first.status_code == again.status_code == 200 and len(calls) == 1  # the second came from the cache
        assert again.headers["Access-Control-Allow-Origin"] == "null"  # reads from a file's page stay allowed
        foreign = requests.get(base + "/metrics", headers={"Origin": "http://evil.test"}, timeout=10)
        assert foreign.status_code == 200 and "Access-Control-Allow-Origin" not in foreign.headers
        refused = requests.get(base + "/metrics", headers={"Host": "evil.test", "Origin": "null"}, timeout=10)
        assert refused.status_code == 400 and refused.json()["error"] and len(calls) == 2
        assert refused.headers["Access-Control-Allow-Origin"] == "null"  # the refusal is readable, like any error

    app, calls = counted(make_app(redis_url, MONITOR_API_CACHE=60, MONITOR_API_TOKEN="s3cret"))
    with serving(app) as base:
        ok = {"Authorization": "Bearer s3cret"}
        assert requests.get(base + "/metrics", headers=ok, timeout=10).status_code == 200
        assert requests.get(base + "/metrics?token=s3cret", timeout=10).status_code == 200 and len(calls) == 1
        for headers in ({}, {"Authorization": "Bearer s3cre"}, {"Authorization": "Bearer s3cret2"}):
            resp = requests.get(base + "/metrics", headers=headers, timeout=10)
            assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer", headers
        assert len(calls) == 4


def acting_app(redis_url, **config):
    """An app with one route that changes data, guarded as control and silences are (test-only route)."""
    app = make_app(redis_url, **config)

    @app.route("/test/act", methods=["GET", "POST", "DELETE"])  # GET listed, so the check itself must refuse it
    @monitor_gate.acting
    def act():
        return {"accepted": True, **g.actor}

    return app


JSON_BODY = {"json": {"command": "pause", "all": True}}


def test_acting_without_a_token_only_from_curl_or_the_apis_own_page(redis_url):
    c = acting_app(redis_url).test_client()  # listens on 127.0.0.1; Host localhost
    curl = c.post("/test/act", **JSON_BODY)
    assert curl.status_code == 200 and curl.get_json()["via"] == "no token: loopback, no browser origin"
    own = c.post("/test/act", headers={"Origin": "http://localhost"}, **JSON_BODY)
    assert own.status_code == 200 and own.get_json()["via"] == "no token: loopback, the API's own page"
    assert c.delete("/test/act").status_code == 200  # no body, no content type needed
    for origin in ("null", "http://evil.test", "http://localhost:1", "https://localhost"):
        resp = c.post("/test/act", headers={"Origin": origin}, **JSON_BODY)
        assert resp.status_code == 403 and "MONITOR_API_TOKEN" in resp.get_json()["error"], origin
        assert c.delete("/test/act", headers={"Origin": origin}).status_code == 403, origin

    wide = acting_app(redis_url, MONITOR_API_HOST="0.0.0.0").test_client()  # reachable from other machines
    resp = wide.post("/test/act", **JSON_BODY)
    assert resp.status_code == 403 and "loopback" in resp.get_json()["error"]
    assert "MONITOR_API_TOKEN" in resp.get_json()["error"]


def test_acting_with_a_token_needs_it_whatever_the_origin(redis_url):
    c = acting_app(redis_url, MONITOR_API_TOKEN="s3cret", MONITOR_API_HOST="0.0.0.0").test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Origin": "http://localhost"}):
        resp = c.post("/test/act", headers=headers, **JSON_BODY)
        assert resp.status_code == 401 and resp.get_json()["error"], headers
    for origin in (None, "null", "http://evil.test"):
        headers = {"Authorization": "Bearer s3cret", **({"Origin": origin} if origin else {})}
        resp = c.post("/test/act", headers=headers, **JSON_BODY)
        assert resp.status_code == 200 and resp.get_json()["via"] == "token", origin
    resp = c.post("/test/act?token=s3cret", **JSON_BODY)  # a query token is for GET only
    assert resp.status_code == 400 and "Authorization" in resp.get_json()["error"]


def test_acting_is_off_in_read_only_mode(redis_url):
    for config in ({}, {"MONITOR_API_TOKEN": "s3cret"}):
        c = acting_app(redis_url, MONITOR_API_READONLY="1", **config).test_client()
        resp = c.post("/test/act", headers={"Authorization": "Bearer s3cret"}, **JSON_BODY)
        assert resp.status_code == 403 and "MONITOR_API_READONLY" in resp.get_json()["error"]
        assert c.delete("/test/act", headers={"Authorization": "Bearer s3cret"}).status_code == 403


def test_acting_refuses_get_and_bodies_that_are_not_json(redis_url):
    c = acting_app(redis_url).test_client()
    resp = c.get("/test/act")
    assert resp.status_code == 405 and resp.headers["Allow"] == "DELETE, POST" and resp.get_json()["error"]
    form = c.post("/test/act", data={"command": "stop", "all": "1"})  # what a foreign page's <form> can send
    assert form.status_code == 415 and "application/json" in form.get_json()["error"]
    for body in ({"data": '{"command": "stop"}', "content_type": "text/plain"}, {},
                 {"data": b"{}", "content_type": "multipart/form-data; boundary=x"}):
        assert c.post("/test/act", **body).status_code == 415, body
    assert c.post("/test/act", data="{}", content_type="application/json; charset=utf-8").status_code == 200
    assert c.delete("/test/act", data="x", content_type="text/plain").status_code == 415
    token = acting_app(redis_url, MONITOR_API_TOKEN="s3cret").test_client()
    form = token.post("/test/act", headers={"Authorization": "Bearer s3cret"}, data={"command": "stop"})
    assert form.status_code == 415


def test_acting_requests_are_logged_without_the_token(redis_url, caplog):
    caplog.set_level(logging.INFO, logger="monitor_api")
    c = acting_app(redis_url).test_client()
    c.post("/test/act", **JSON_BODY)
    c.post("/test/act", headers={"Origin": "null"}, **JSON_BODY)
    t = acting_app(redis_url, MONITOR_API_TOKEN="s3cret").test_client()
    t.post("/test/act", headers={"Authorization": "Bearer s3cret"}, **JSON_BODY)
    t.post("/test/act", headers={"Authorization": "Bearer s3cret-wrong"}, **JSON_BODY)
    t.delete("/test/act", headers={"Authorization": "Bearer s3cret"}, data="x", content_type="text/plain")
    acting_app(redis_url, MONITOR_API_READONLY="1").test_client().delete("/test/act")
    lines = [r.getMessage() for r in caplog.records if r.name == "monitor_api"]
    assert len(lines) == 6, lines
    assert all("/test/act from 127.0.0.1" in line for line in lines), lines
    assert [line.split()[0] for line in lines] == ["Accepted", "Refused", "Accepted", "Refused", "Refused", "Refused"]
    assert "origin 'null'" in lines[1] and "(401)" in lines[3] and "(415)" in lines[4] and "(403)" in lines[5]
    assert lines[2].endswith("(token)")
    assert not any("s3cret" in line for line in lines)


def test_preflight_offers_post_and_delete_only_where_a_change_could_be_accepted(redis_url):
    def preflight(client, origin):
        return client.options("/test/act", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                    "Access-Control-Request-Headers": "content-type"}).headers

    tokenless = acting_app(redis_url).test_client()
    null = preflight(tokenless, "null")  # may read (the page from a file), may not act
    assert null["Access-Control-Allow-Origin"] == "null"
    assert "POST" not in null["Access-Control-Allow-Methods"]
    assert "Content-Type" not in null["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Origin" not in preflight(tokenless, "http://evil.test")
    own = preflight(tokenless, "http://localhost")
    assert "POST, DELETE" in own["Access-Control-Allow-Methods"]
    assert "Content-Type" in own["Access-Control-Allow-Headers"]

    token = acting_app(redis_url, MONITOR_API_TOKEN="s3cret").test_client()
    null = preflight(token, "null")  # the actual request must then carry the token
    assert "POST, DELETE" in null["Access-Control-Allow-Methods"]
    assert "Content-Type" in null["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Origin" not in preflight(token, "http://evil.test")

    readonly = acting_app(redis_url, MONITOR_API_TOKEN="s3cret", MONITOR_API_READONLY="yes").test_client()
    assert "POST" not in preflight(readonly, "null")["Access-Control-Allow-Methods"]


def test_acting_over_real_http_from_curl_and_from_a_page(redis_url, caplog):
    caplog.set_level(logging.INFO, logger="monitor_api")
    with serving(acting_app(redis_url)) as base:
        def curl(*args):
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", *args,
                                  base + "/test/act"], capture_output=True, text=True, timeout=10)
            return int(out.stdout)

        assert curl("-X", "POST", "-H", "Content-Type: application/json", "-d", '{"command": "pause"}') == 200
        assert curl("-X", "DELETE") == 200
        assert curl("-X", "POST", "-H", "Origin: " + base, "-H", "Content-Type: application/json", "-d", "{}") == 200
        assert curl("-X", "POST", "-H", "Origin: null", "-H", "Content-Type: application/json", "-d", "{}") == 403
        assert curl("-X", "POST", "-d", "command=stop") == 415  # a form
        assert curl("-X", "POST", "-H", "Host: evil.test", "-H", "Content-Type: application/json", "-d", "{}") == 400
        assert curl() == 405
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Refused")]
    assert len(refused) == 4 and "(400)" in refused[2]  # the Host refusal of an acting route is logged too


# ---------------------------------------------------------------------------- honest diagnostics

def test_a_key_of_the_wrong_type_is_named_not_called_unavailable(redis_url, redis_client, caplog):
    caplog.set_level(logging.INFO, logger="monitor_api")
    redis_client.set("scrapy:node:status", "oops")
    c = make_app(redis_url).test_client()
    for path in ("/metrics", "/metrics/main_spider", "/metrics/a:1/history", "/spiders", "/prometheus", "/health"):
        resp = c.get(path)
        assert resp.status_code == 500, path
        assert resp.get_json() == {"error": "scrapy:node:status is a string, not a hash"}, path
    logged = [r for r in caplog.records if "scrapy:node:status is a string, not a hash" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelname == "ERROR"  # once, not once per request
    assert not any("unavailable" in r.getMessage() for r in caplog.records)

    redis_client.delete("scrapy:node:status")
    store(redis_client, snap("a:1"), snap("a:2"))
    redis_client.delete(monitor_contract.history_key("scrapy", "a:2"))
    redis_client.hset(monitor_contract.history_key("scrapy", "a:2"), "x", "y")
    assert c.get("/metrics").status_code == 200 and c.get("/metrics/a:1/history").status_code == 200
    for path in ("/metrics/a:2/history", "/metrics/main_spider/history"):
        resp = c.get(path)
        assert resp.status_code == 500, path
        assert resp.get_json() == {"error": "scrapy:node:history:a:2 is a hash, not a list"}, path


def test_redis_down_is_logged_once_per_outage(caplog):
    caplog.set_level(logging.INFO, logger="monitor_api")
    server = RedisServer().start()
    try:
        c = make_app(server.url).test_client()
        assert c.get("/health").status_code == 200
        server.stop()
        for path in ("/health", "/metrics", "/spiders", "/health"):
            assert c.get(path).get_json() == {"error": "Redis is unavailable"}, path
        server.start()
        wait_for(lambda: c.get("/health").status_code == 200, 3, what="recovery")
        assert c.get("/metrics").status_code == 200
    finally:
        server.cleanup()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "monitor_api"]
    assert [level for level, _ in lines] == ["WARNING", "INFO"], lines
    assert "unavailable" in lines[0][1] and "answers again" in lines[1][1]


def test_starting_on_a_redis_that_does_not_answer_says_so_once_without_its_password(redis_url, caplog):
    caplog.set_level(logging.INFO, logger="monitor_api")
    monitor_api.log_start(make_app(redis_url))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    monitor_api.log_start(make_app(f"redis://:s3cret@127.0.0.1:{free_port()}/0"))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "does not answer yet" in warning and "routes answer 503 until it does" in warning
    assert "s3cret" not in caplog.text and "redis://:***@127.0.0.1:" in warning


# ---------------------------------------------------------------------------- command line

def run_cli(*args, **env):
    return subprocess.run([sys.executable, "monitor_api.py", *args], cwd=ROOT, env=clean_env(env),
                          capture_output=True, text=True, timeout=30)


def test_cli_help_lists_the_environment():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in ("REDIS_URL", "MONITOR_KEY_PREFIX", "MONITOR_API_HOST", "MONITOR_API_PORT", "MONITOR_API_TOKEN",
                 "MONITOR_CORS_ORIGINS", "MONITOR_RETENTION", "MONITOR_API_CACHE", "MONITOR_API_HOSTS",
                 "MONITOR_API_READONLY", "--host", "--port"):
        assert name in out.stdout


@pytest.mark.parametrize("args, env, words", [
    (["--port", "99999"], {}, "port"),
    (["--bogus"], {}, "unrecognized"),
    ([], {"MONITOR_API_PORT": "http"}, "port"),
    ([], {"MONITOR_RETENTION": "a day"}, "MONITOR_RETENTION"),
    ([], {"REDIS_URL": "http://user:hunter2@example.com/"}, "REDIS_URL"),
])
def test_cli_bad_arguments_and_settings_are_one_line_and_exit_2(args, env, words):
    out = run_cli(*args, **env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "hunter2" not in lines[0], out.stderr


@pytest.mark.parametrize("env, words", [
    ({"REDIS_URL": "redis://localhost:6379/0?bogus=1"}, "unknown option 'bogus'"),
    ({"REDIS_URL": "redis://:hunter2@localhost:99999/0"}, "REDIS_URL"),
    ({"REDIS_URL": "redis://localhost/0?socket_timeout=soon"}, "socket_timeout"),
    ({"REDIS_URL": "redis://[::1/0"}, "REDIS_URL"),
    ({"MONITOR_RETENTION": "1e308"}, "MONITOR_RETENTION"),
    ({"MONITOR_RETENTION": "-1"}, "MONITOR_RETENTION"),
    ({"MONITOR_RETENTION": "nan"}, "MONITOR_RETENTION"),
    ({"MONITOR_API_CACHE": "1e308"}, "MONITOR_API_CACHE"),
    ({"MONITOR_API_CACHE": "-0.5"}, "MONITOR_API_CACHE"),
    ({"MONITOR_API_CACHE": "NaN"}, "MONITOR_API_CACHE"),
    ({"MONITOR_API_CACHE": "inf"}, "MONITOR_API_CACHE"),
    ({"MONITOR_API_TOKEN": "pässwörd"}, "MONITOR_API_TOKEN"),
    ({"MONITOR_API_TOKEN": "line\nbreak"}, "MONITOR_API_TOKEN"),
    ({"MONITOR_API_READONLY": "maybe"}, "MONITOR_API_READONLY"),
    ({"MONITOR_API_PORT": "0"}, "port"),
    ({"MONITOR_API_PORT": "６"}, "port"),
    ({"MONITOR_API_HOST": "no.such.host.invalid"}, "cannot listen"),
])
def test_cli_absurd_settings_are_one_line_and_exit_2(env, words):
    out = run_cli(**env)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("monitor_api.py: error: ") and words in lines[-1], out.stderr
    assert "Traceback" not in out.stderr and "hunter2" not in out.stderr and "pässwörd" not in out.stderr
    if words != "cannot listen":  # refused before anything is logged
        assert len(lines) == 1, out.stderr


def test_cli_port_in_use_is_one_line_and_exit_2():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        out = run_cli("--port", str(busy.getsockname()[1]), REDIS_URL="redis://127.0.0.1:1/0")
    assert out.returncode == 2 and "cannot listen" in out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- real crawler, real load

def test_a_real_crawler_node_through_the_api(redis_url, redis_client, site, crawlers):
    c = make_app(redis_url).test_client()
    redis_client.lpush("distributed:start_urls", json.dumps({"url": site.url}))
    proc = crawlers(env={"REDIS_URL": redis_url, "MONITOR_INTERVAL": "1"}, settings={"MAX_IDLE_TIME_BEFORE_CLOSE": 2})
    node = f"main_spider:{socket.gethostname()}:{proc.pid}"
    live = wait_for(lambda: c.get("/metrics?state=live").get_json().get(node), 30, what="the node live in the API")
    assert CONTRACT_FIELDS <= set(live) and live["spider"] == "main_spider"
    assert proc.wait(60) == 0

    final = c.get(path_of(node)).get_json()
    assert final["state"] == "closed" and final["finish_reason"] == "finished"
    assert final["items"] == 40 and final["pages"] >= 40
    view = c.get("/metrics/main_spider").get_json()
    assert view["nodes_closed"] == 1 and view["items"] == 40 and set(view["nodes"]) == {node}
    points = c.get(path_of(node) + "/history?minutes=5").get_json()["points"]
    assert len(points) >= 2 and points[-1]["items"] == 40
    assert points == sorted(points, key=lambda p: p["timestamp"])
    assert c.get("/spiders").get_json()["main_spider"]["items"] == 40
    prometheus = c.get("/prometheus").get_data(as_text=True)
    assert f'scrapy_items_scraped_total{{node="{node}",spider="main_spider"}} 40.0' in prometheus


def test_load_64_clients_for_30_seconds_without_an_error(redis_url, redis_client):
    nodes = [snap(f"main_spider:crawler-{i}:{1000 + i}", spider=("main_spider", "other")[i % 2]) for i in range(200)]
    store(redis_client, *nodes)
    stop = threading.Event()

    def keep_reporting():  # nodes keep reporting while the API is read
        i = 0
        while not stop.wait(0.1):
            store(redis_client, *(dict(nodes[(i + k) % 200], timestamp=int(time.time())) for k in range(5)))
            i += 5

    paths = ["/metrics", "/metrics?state=live", "/metrics/main_spider", path_of(nodes[0]["node"]),
             path_of(nodes[0]["node"]) + "/history?minutes=10", "/metrics/other/history", "/spiders", "/health",
             "/prometheus", "/metrics/nobody"]
    counts, errors, lock = {p: 0 for p in paths}, [], threading.Lock()
    app = make_app(redis_url, MONITOR_API_CACHE=1)
    writer = threading.Thread(target=keep_reporting, daemon=True)
    writer.start()
    try:
        with serving(app) as base:
            deadline = time.monotonic() + LOAD_SECONDS

            def client(n):
                session, etags = requests.Session(), {}
                i = n
                while time.monotonic() < deadline:
                    path = paths[i % len(paths)]
                    i += 1
                    headers = {"If-None-Match": etags[path]} if n % 2 and path in etags else {}
                    try:
                        resp = session.get(base + path, headers=headers, timeout=10)
                        expected = 404 if path == "/metrics/nobody" else (200, 304)
                        if resp.status_code not in (expected if isinstance(expected, tuple) else (expected,)):
                            raise AssertionError(f"{resp.status_code} {resp.text[:200]}")
                        if path == "/metrics" and resp.status_code == 200 and len(resp.json()) != 200:
                            raise AssertionError("incomplete /metrics")
                        if "ETag" in resp.headers:
                            etags[path] = resp.headers["ETag"]
                    except Exception as exc:  # noqa: BLE001 - every failure counts
                        with lock:
                            errors.append(f"{path}: {exc!r}")
                        continue
                    with lock:
                        counts[path] += 1
                session.close()

            threads = [threading.Thread(target=client, args=(n,)) for n in range(LOAD_CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(LOAD_SECONDS + 30)
    finally:
        stop.set()
        writer.join(5)
    assert errors == [], errors[:5]
    assert all(counts.values()), counts
    assert sum(counts.values()) > LOAD_CLIENTS * LOAD_SECONDS, counts  # more than one answer a second each


def test_nodes_on_one_host_count_its_machine_figures_once(client, redis_client):
    store(redis_client, snap("s:1", spider="s", cpu=40.0, bytes_recv=1000, net_recv_rate=50.0),
          snap("s:2", spider="s", cpu=40.0, bytes_recv=1000, net_recv_rate=50.0, pages=5),
          snap("s:3", spider="s", cpu=10.0, bytes_recv=7, net_recv_rate=5.0, host="host-b"))
    view = client.get("/metrics/s").get_json()
    assert (view["cpu"], view["bytes_recv"], view["pages"]) == (25.0, 1007, 25)  # 2 hosts; 3 nodes' pages
    point = client.get("/metrics/s/history?minutes=5").get_json()["points"][-1]
    assert (point["nodes"], point["net_recv_rate"], point["pages"]) == (3, 55.0, 25)


def test_a_list_view_sends_the_snapshots_it_was_given_not_what_a_later_read_kept(redis_url, redis_client):
    """A route joins the JSON its reader keeps per node: a request holding an earlier read's snapshots (another thread
    read again meanwhile) still sends those, and their ages, not the newer ones' JSON."""
    reader = make_app(redis_url).extensions["reader"]
    now = time.time()
    store(redis_client, snap("n1", now=now, cpu=11.0), snap("n2", now=now, cpu=12.0))
    earlier, _, at = reader.nodes()
    reader.nodes_json(earlier, at)  # their JSON kept
    store(redis_client, snap("n1", now=now, cpu=77.0))
    later, _, later_at = reader.nodes()
    assert json.loads(reader.nodes_json(later, later_at)[0])["n1"]["cpu"] == 77.0  # the newer JSON kept now
    sent = json.loads(reader.nodes_json(earlier, at)[0])
    assert (sent["n1"]["cpu"], sent["n2"]["cpu"]) == (11.0, 12.0) and sent["n1"]["age"] == sent["n2"]["age"] == 0
