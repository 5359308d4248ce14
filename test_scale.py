"""Live and light at scale (issue 22, §3-§5): the alerter writes only what changed in at most three round trips,
an idle cluster answers 304, ``?fields=`` projects, Prometheus exports per spider by default."""

import collections
import gc
import gzip
import json
import re
import shutil
import subprocess
import time
import tracemalloc

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import monitor_alert_state
import monitor_api
import monitor_cache
import monitor_contract
import monitor_nodes
import monitor_prometheus
import monitor_rules
import monitor_settings
import monitor_snapshot
import testbed
from testbed import MB, T0, CountingConnection, report
from testbed_servers import wait_for

# ---------------------------------------------------------------------------- the lighter alerter


def alert_events(redis_client):
    """A subscription to every change of the alerter's keys (keyspace notifications on the private Redis)."""
    redis_client.config_set("notify-keyspace-events", "KA")
    sub = redis_client.pubsub()
    sub.psubscribe("__keyspace@0__:scrapy:alert:*")
    wait_for(lambda: sub.get_message(timeout=0.1) is not None, what="the subscription")
    return sub


def changed_keys(sub):
    """The alert keys written since the last call, up to the heartbeat every evaluation ends its write with."""
    keys = []

    def heartbeat_seen():
        while (message := sub.get_message(timeout=0.1)) is not None:
            keys.append(message["channel"].decode().rpartition(":alert:")[2])
        return "heartbeat" in keys

    wait_for(heartbeat_seen, what="the evaluation's write")
    return keys


def test_a_steady_alert_costs_no_write_and_an_evaluation_three_round_trips(make, redis_client):
    # Without the Redis rules: they add one INFO per Redis master (issue 18's RedisWatch) to each evaluation.
    rules = ",".join(r.name for r in monitor_rules.RULES if not r.name.startswith("redis_"))
    alerter = make("--for", "0", "--stall-seconds", "120", "--rules", rules)
    alerter.r.connection_pool.connection_class = CountingConnection
    sub = alert_events(redis_client)

    def evaluate(t, cpu):
        report(redis_client, "hot", T0 + t, cpu=cpu)
        report(redis_client, "stuck", T0 + t, pages=5, pages_per_min=0.0, queue_requests=10)
        if t == 0:
            report(redis_client, "down", T0 - 100)  # never reports again: its age grows
        before = CountingConnection.sends
        notes = alerter.run_once(T0 + t)
        return notes, CountingConnection.sends - before

    notes, _ = evaluate(0, 95.0)
    assert sorted((n["rule"], n["node"]) for n in notes) == [("cpu", "hot"), ("down", "down")]
    assert {"state", "stall", "outbox"} <= set(changed_keys(sub))
    notes, _ = evaluate(60, 96.0)  # stuck has stood still long enough... not yet (120 s)
    assert notes == []
    assert "state" not in changed_keys(sub)  # the hot node's CPU moved, the down node's age grew: no write
    notes, trips = evaluate(180, 97.0)
    assert [(n["rule"], n["node"]) for n in notes] == [("stalled", "stuck")]
    changed_keys(sub)
    notes, trips = evaluate(240, 98.0)
    assert notes == [] and trips <= 3  # lock and read in one, the queue forecast's histories, the write
    assert set(changed_keys(sub)) == {"lock", "heartbeat"}  # taken and released; no record or tracker written
    # /alerts derives the live figures from the snapshots: the CPU now, the down node's age, the stall's length
    alerts = {a["rule"]: a for a in monitor_alert_state.read_alerts(redis_client, "scrapy")["alerts"]}
    assert alerts["cpu"]["value"] == 98.0 and alerts["cpu"]["last_sent"] == T0
    # read_alerts judges on Redis's clock, years after the tests' made-up one: ages of years
    assert alerts["down"]["value"] > 10 ** 6 and alerts["stalled"]["value"] > 10 ** 6
    stored = json.loads(redis_client.hget("scrapy:alert:state", "cpu:hot"))
    assert stored["value"] == 95.0 and stored["summary"] == "host CPU 95% (limit 80%)"  # as it was sent


def test_the_alerter_reads_slim_snapshots_and_still_quotes_error_samples(make, redis_client, smtp):
    sample = {"time": T0, "logger": "scrapy.core.scraper", "message": "Spider error processing", "url": "http://x/1"}
    report(redis_client, "e1", T0, errors_per_min=50.0, error_samples=[sample], domains={"x": {"pages": 1}},
           fields={"title": 0.5, "url": 1.0}, fields_listed=True, items=500)
    slim = json.loads(redis_client.hget(monitor_contract.slim_key("scrapy"), "e1"))
    assert not {"error_samples", "fields", "latency_buckets"} & set(slim) and slim["fields_lowest"] == ["title", 0.5]
    assert "domains" not in slim  # none slowed: the refusal rule reads the refusal buckets
    # a node of an older extension writes only the status hash: read from there
    old = testbed.snapshot("old", now=T0, **{**testbed.QUIET, "rss": 3000 * MB})
    redis_client.hset(monitor_contract.status_key("scrapy"), "old", json.dumps(old))
    notes = make("--for", "0").run_once(T0)
    summaries = {(n["rule"], n["node"]): n["summary"] for n in notes}
    assert summaries[("errors", "e1")].endswith("; newest: scrapy.core.scraper: Spider error processing (http://x/1)")
    assert summaries[("coverage", "e1")] == "item field coverage 50% for field 'title' over 500 items (limit 90%)"
    assert ("rss", "old") in summaries
    record = json.loads(redis_client.hget("scrapy:alert:state", "errors:e1"))
    assert record["summary"] == summaries[("errors", "e1")]


@pytest.mark.parametrize("raw, ok", [
    ('{"spider":"s","timestamp":1,"pages":999999999999999999}', True),
    ('{"spider":"s","timestamp":1,"pages":1000000000000000000}', False),
    ('{"spider":"s","timestamp":1,"cpu":-1e18}', False),
    ('{"spider":"s","timestamp":1,"cpu":1e400}', False),
    ('{"spider":"s","timestamp":1,"command":{"id":[1,2,{"a":1e19}]}}', False),
    ('{"spider":"s","timestamp":1,"cpu":NaN}', False),
    ('{"spider":"s","timestamp":1,"fields_lowest":["t",0.5]}', True),
])
def test_the_snapshot_gate_bounds_every_number(raw, ok):
    assert (monitor_snapshot.decode_snapshot(raw) is not None) is ok


# ---------------------------------------------------------------------------- idle costs nothing


def test_an_idle_cluster_answers_304_and_its_ages_stay_right(redis_client, redis_url):
    testbed.publish(redis_client, *(testbed.snap(f"n{i}", host=f"h{i}") for i in range(3)), stamp=True)
    c = testbed.make_app(redis_url).test_client()  # no response cache: every answer is computed anew
    paths = ("/metrics", "/metrics/n1", "/metrics/main_spider", "/spiders", "/metrics?fields=cpu,state")
    first = {path: c.get(path) for path in paths}
    first["gzip"] = c.get("/metrics?fields=all", headers={"Accept-Encoding": "gzip"})
    assert first["gzip"].headers["Content-Encoding"] == "gzip"
    at = float(first["/metrics"].headers["X-Ages-At"])
    assert float(first["/metrics"].headers["X-Server-Time"]) == at
    wait_for(lambda: monitor_contract.redis_now(redis_client.time()) >= at + 1.5, what="Redis's clock to move on")
    again = {}
    for path, answer in first.items():
        again[path] = c.get("/metrics?fields=all" if path == "gzip" else path, headers={
            "If-None-Match": answer.headers["ETag"], "Accept-Encoding": "gzip" if path == "gzip" else "identity"})
        assert (again[path].status_code, again[path].data) == (304, b""), path
        assert "X-Ages-At" not in again[path].headers  # a client keeps the body's own: it holds the body's ages
    lag = float(again["/metrics"].headers["X-Server-Time"]) - at
    fresh = c.get("/metrics")
    assert fresh.headers["ETag"] == first["/metrics"].headers["ETag"]
    old = first["/metrics"].get_json()
    assert json.loads(gzip.decompress(first["gzip"].data))["n1"]["age"] == old["n1"]["age"]
    for node, snapshot in fresh.get_json().items():  # the ages have grown as the 304's clock says
        assert snapshot["age"] > old[node]["age"] and abs(old[node]["age"] + lag - snapshot["age"]) <= 1
    testbed.publish(redis_client, testbed.snap("n1", host="h1", pages=11), stamp=True)
    assert c.get("/metrics", headers={"If-None-Match": fresh.headers["ETag"]}).status_code == 200
    assert c.get("/spiders").get_json()["main_spider"]["pages"] == 31  # combined anew: one node changed


def test_fields_projects_list_views_and_names_unknown_fields(redis_client, redis_url):
    domains = {"example.com": {"pages": 5, "errors": 0, "4xx": 0, "5xx": 0, "429": 0, "latency_p95": 0.5}}
    testbed.store(redis_client, testbed.snap("a", domains=domains), testbed.snap("b", spider="other"))
    c = testbed.make_app(redis_url).test_client()
    five = c.get("/metrics?fields=state,cpu,memory,pages_per_min,age")
    assert {node: sorted(s) for node, s in five.get_json().items()} == {
        n: ["age", "cpu", "memory", "pages_per_min", "state"] for n in ("a", "b")}
    bare = c.get("/metrics?fields=state,cpu")
    assert bare.get_json()["a"] == {"state": "live", "cpu": 12.5} and "X-Ages-At" not in bare.headers
    big = c.get("/metrics?fields=domains,spider&spider=main_spider").get_json()  # read from the status hash
    assert list(big) == ["a"] and big["a"]["spider"] == "main_spider"
    assert big["a"]["domains"]["example.com"]["latency_p95"] == 0.5  # not in slim values
    assert c.get("/metrics/a?fields=cpu,age").get_json().keys() == {"cpu", "age"}
    view = c.get("/metrics/main_spider?fields=cpu").get_json()
    assert view["nodes"] == {"a": {"cpu": 12.5}} and view["nodes_live"] == 1
    assert c.get("/spiders?fields=nodes_live,pages").get_json() == {
        "main_spider": {"nodes_live": 1, "pages": 10}, "other": {"nodes_live": 1, "pages": 10}}
    for path, names in (("/metrics?fields=cpu,colour,flavour", ["'colour'", "'flavour'"]),
                        ("/metrics/main_spider?fields=nodes_live", ["'nodes_live'"]),
                        ("/spiders?fields=nodes_live,cpu_avg", ["'cpu_avg'"]), ("/metrics?fields=,", ["fields="])):
        answer = c.get(path)
        assert answer.status_code == 400 and all(name in answer.get_json()["error"] for name in names), path


# ---------------------------------------------------------------------------- Prometheus at 10,000 nodes


def prometheus(client, query=""):
    text = client.get(f"/prometheus{query}").get_data(as_text=True)
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    return text, samples


def test_prometheus_exports_per_spider_by_default_and_every_node_series_on_request(redis_client, redis_url):
    buckets = list(range(0, 2 * (len(monitor_contract.LATENCY_BUCKETS) + 1), 2))  # cumulative counts
    domain = {"pages": 5, "errors": 1, "4xx": 2, "5xx": 0, "429": 1, "latency_p95": 0.5}
    testbed.store(redis_client,
                  testbed.snap("s:h1:11", spider="s", host="h1", items=100, fields={"price": 0.5},
                               latency_buckets=buckets, latency_sum=1.5, domains={"x.com": domain}),
                  testbed.snap("s:h1:12", spider="s", host="h1", items=300, fields={"price": 1.0},
                               latency_buckets=buckets, latency_sum=2.5, domains={"x.com": domain}),
                  testbed.snap("t:h2:13", spider="t", host="h2", bytes_sent=7))
    c = testbed.make_app(redis_url).test_client()
    text, default = prometheus(c)
    per_node = [s for s in default if s.labels.get("node") == "s:h1:11"]
    assert len(per_node) == monitor_prometheus.CORE <= 15
    assert not [s for s in default if "node" in s.labels and ({"domain", "field", "le"} & set(s.labels))]

    def value(name, **labels):
        return [s.value for s in default if s.name == name and s.labels == labels]

    assert value("scrapy_download_latency_seconds_bucket", spider="s", le="+Inf") == [2 * buckets[-1]]  # merged
    assert value("scrapy_download_latency_seconds_sum", spider="s") == [4.0]
    assert value("scrapy_domain_responses_total", spider="s", domain="x.com") == [10]
    assert value("scrapy_domain_error_responses_total", spider="s", domain="x.com", status="429") == [2]
    assert value("scrapy_item_field_coverage_ratio", spider="s", field="price") == [0.875]  # weighted by items
    assert value("scrapy_http_responses_total", spider="s", status_class="2xx") == [18]
    assert value("scrapy_host_network_sent_bytes_total", host="h2") == [7]
    text_node, detail = prometheus(c, "?detail=node")
    assert len([s for s in detail if s.labels.get("node") == "s:h1:11"]) > 3 * monitor_prometheus.CORE
    assert ('scrapy_domain_responses_total{domain="x.com",node="s:h1:11",spider="s"} 5.0' in text_node)
    assert {s.labels.get("node") for s in prometheus(c, "?node_label=nopid")[1]} >= {"s:h1:11", "s:h1:12", "t:h2"}
    assert c.get("/prometheus?detail=host").status_code == 400
    if shutil.which("promtool"):
        for body in (text, text_node):
            done = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True)
            assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
    node_app = testbed.make_app(redis_url, MONITOR_PROMETHEUS_DETAIL="node").test_client()
    of_a_node = lambda text: [line for line in text.splitlines() if 'node="s:h1:11"' in line]  # noqa: E731
    assert of_a_node(prometheus(node_app)[0]) == of_a_node(text_node)  # Redis's own figures move: left out


def test_prometheus_spider_series_are_the_exact_sums_of_the_node_series(redis_client, redis_url):
    # 24 nodes of two spiders, figures varied per node: some domains and statuses missing, one node without
    # items; sums of quarters, so any order of addition gives the same float.
    width = len(monitor_contract.LATENCY_BUCKETS) + 1
    snaps, expected = [], {}
    for i in range(24):
        spider = ("s", "t")[i % 2]
        buckets = [k * (i + 1) for k in range(width)]
        domains = {"a.com": {"pages": i, "errors": i % 3, "4xx": 1, "429": i % 2},
                   **({"b.com": {"pages": 2 * i, "5xx": 3}} if i % 3 else {})}
        items = 0 if i == 5 else 10 * i
        snaps.append(testbed.snap(f"{spider}:h{i // 4}:{i}", spider=spider, host=f"h{i // 4}", items=items,
                                  status_2xx=100 + i, warnings=i, latency_buckets=buckets, latency_sum=i + 0.25,
                                  domains=domains, fields={"price": (i % 4) / 4}))
        mine = expected.setdefault(spider, collections.Counter())
        mine["+Inf"] += buckets[-1]
        mine["sum"] += i + 0.25
        for domain, figures in domains.items():
            for key, value in figures.items():
                mine[domain, key] += value
        mine["weighted"] += (i % 4) / 4 * items
        mine["items"] += items
        mine["2xx"] += 100 + i
    testbed.store(redis_client, *snaps)
    c = testbed.make_app(redis_url).test_client()
    _, default = prometheus(c)
    _, detail = prometheus(c, "?detail=node")

    def spider_level(name, spider, **labels):
        found = [s.value for s in default if s.name == name and s.labels == dict(labels, spider=spider)]
        assert len(found) <= 1, (name, labels)
        return found[0] if found else None

    def summed(name, spider, **labels):
        values = [s.value for s in detail if s.name == name and s.labels.get("spider") == spider
                  and {k: s.labels.get(k) for k in labels} == labels]
        return sum(values) if values else None

    for spider, mine in expected.items():
        for name, labels in [("scrapy_download_latency_seconds_bucket", {"le": le}) for le in
                             [f"{b:g}" for b in monitor_contract.LATENCY_BUCKETS] + ["+Inf"]] + [
                ("scrapy_download_latency_seconds_count", {}), ("scrapy_download_latency_seconds_sum", {}),
                ("scrapy_http_responses_total", {"status_class": "2xx"}), ("scrapy_log_warnings_total", {})] + [
                ("scrapy_domain_responses_total", {"domain": d}) for d in ("a.com", "b.com")] + [
                ("scrapy_domain_error_responses_total", {"domain": d, "status": st})
                for d in ("a.com", "b.com") for st in ("4xx", "5xx", "429", "503")]:
            assert spider_level(name, spider, **labels) == summed(name, spider, **labels), (spider, name, labels)
        # ... and those sums are the snapshots' own
        assert spider_level("scrapy_download_latency_seconds_bucket", spider, le="+Inf") == mine["+Inf"]
        assert spider_level("scrapy_download_latency_seconds_sum", spider) == mine["sum"]
        assert spider_level("scrapy_http_responses_total", spider, status_class="2xx") == mine["2xx"]
        assert spider_level("scrapy_domain_responses_total", spider, domain="b.com") == mine["b.com", "pages"]
        assert spider_level("scrapy_domain_error_responses_total", spider, domain="a.com",
                            status="429") == mine["a.com", "429"]
        assert spider_level("scrapy_domain_error_responses_total", spider, domain="b.com", status="4xx") is None
        assert spider_level("scrapy_domain_errors_total", spider, domain="b.com") is None  # no node reports one
        assert spider_level("scrapy_item_field_coverage_ratio", spider, field="price") == round(
            mine["weighted"] / mine["items"], 4)
    assert expected["t"]["+Inf"] > 0 and expected["t"]["a.com", "429"] == 12  # the figures add up to something


def test_a_prometheus_scrape_keeps_no_decoded_snapshot(redis_client, redis_url):
    width = len(monitor_contract.LATENCY_BUCKETS) + 1
    insight = {"latency_buckets": list(range(width)), "latency_sum": 12.5,
               "domains": {f"shop-{d}.example.com": {"pages": d, "errors": 1, "4xx": 2, "5xx": 0, "429": 1,
                                                     "503": 0, "latency_p95": 0.5, "delay": 0} for d in range(21)},
               "fields": {f"field_{f:02d}": 0.5 for f in range(30)},
               "error_samples": [{"time": T0, "logger": "scrapy.core.scraper", "message": "x" * 200,
                                  "url": "https://shop-1.example.com/a"}] * 5}

    def publish(pages):
        testbed.publish(redis_client, *(testbed.snapshot(f"s:h{i // 8}:{i}", "s", pages=pages + i, **insight)
                                        for i in range(300)))

    publish(100)
    c = testbed.make_app(redis_url).test_client()
    c.get("/prometheus?detail=node")
    publish(200)  # every value new, as when each node reported since the last scrape
    c.get("/metrics")  # the slim reads the page makes (and /prometheus's Redis figures): not the scrape's
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        text = c.get("/prometheus").get_data(as_text=True)
        assert 'scrapy_domain_responses_total{domain="shop-20.example.com",spider="s"} 6000.0' in text
        del text
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - start
        start = tracemalloc.get_traced_memory()[0]
        whole = [monitor_snapshot.parse_snapshot(raw) for raw in redis_client.hvals("scrapy:node:status")]
        decoded = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert len(whole) == 300 and kept < decoded / 10, (kept, decoded)


def test_prometheus_adds_up_insight_values_as_it_would_whole_snapshots(redis_client, redis_url, monkeypatch):
    # 300 nodes of two spiders (two blocks of the insight values' check), each listing its domains and fields in
    # its own order, some figures missing, some nodes closed or without insight; figures in quarters, so any order
    # of addition gives the same float.
    width = len(monitor_contract.LATENCY_BUCKETS) + 1
    names = [f"shop-{d}.example.com" for d in range(6)] + ["other"]
    node = lambda i: f"{'st'[i % 2]}:h{i // 8}:{i}"  # noqa: E731
    snaps = []
    for i in range(300):
        mine = names[i % 7:] + names[:i % 7]
        domains = {name: {"pages": (i + d) % 11, "errors": d % 3, "4xx": i % 5, "5xx": 1, "429": d % 2,
                          **({"503": 2} if i % 3 else {}), "latency_p95": 0.25, "delay": None}
                   for d, name in enumerate(mine[:3 + i % 5])}
        fields = {f"field_{f}": ((i + f) % 5) / 4 for f in range(i % 4 * 3)}
        insight = {} if i % 10 == 9 else {"latency_buckets": [k * (i % 7) for k in range(width)],
                                          "latency_sum": i + 0.25, "domains": domains, "fields": fields}
        snaps.append(testbed.snapshot(node(i), "st"[i % 2], items=(i % 6) * 4,
                                      **({"status": "closed", "finish_reason": "finished"} if i % 13 == 0 else {}),
                                      **insight))
    testbed.publish(redis_client, *snaps, stamp=True)
    stored = [json.loads(redis_client.hget(f"scrapy:node:{kind}", node(1))) for kind in ("slim", "insight")]
    assert stored[1] == {"seen": stored[0]["seen"], "latency_buckets": snaps[1]["latency_buckets"],
                         "domains": [list(snaps[1]["domains"]), *([d.get(count) for d in snaps[1]["domains"].values()]
                                                                  for count in monitor_contract.DOMAIN_COUNTS)],
                         "fields": [list(snaps[1]["fields"]), list(snaps[1]["fields"].values())]}
    bare = {k: v for k, v in testbed.snapshot("u:h:1", "u").items() if k not in monitor_contract.BIG_FIELDS}
    testbed.publish(redis_client, bare, stamp=True)  # no insight: its value is the stamp alone
    stored = [json.loads(redis_client.hget(f"scrapy:node:{kind}", "u:h:1")) for kind in ("slim", "insight")]
    assert stored[1] == {"seen": stored[0]["seen"]}
    old = snaps[7] | {"node": "s:old:7", "domains": {"shop-1.example.com": {"pages": 4}}}
    redis_client.hset("scrapy:node:status", "s:old:7", monitor_contract.dumps(old))  # an older extension's: no slim
    c = testbed.make_app(redis_url).test_client()
    whole = []
    gate = monitor_prometheus.decode_snapshot
    monkeypatch.setattr(monitor_prometheus, "decode_snapshot", lambda raw: whole.append(raw) or gate(raw))

    def body(query=""):
        text = c.get(f"/prometheus{query}").get_data(as_text=True)
        # Redis's own figures move; the nodes come in the hash's order, which Redis may change between reads
        return sorted(line for line in text.splitlines() if not line.startswith("scrapy_redis_"))

    default, detail = body(), body("?detail=node")
    assert len(whole) == 2  # the older extension's node, once a scrape
    assert 'scrapy_domain_responses_total{domain="shop-1.example.com",node="s:old:7",spider="t"} 4.0' in detail
    assert len([line for line in default if line.startswith("scrapy_domain_error_responses_total")]) > 40
    # Hand-written insight values, each of a wrong shape or out of step with its snapshot: read from the whole
    # snapshot instead, so nothing changes.
    values = redis_client.hgetall("scrapy:node:insight")
    stamped = {node(i): json.loads(values[node(i).encode()]) for i in range(20)}
    wrongs = {node(2): b"not json", node(3): b"[]", node(4): stamped[node(4)] | {"colour": 1},
              node(5): stamped[node(5)] | {"seen": stamped[node(5)]["seen"] - 1},
              node(8): stamped[node(8)] | {"fields": [["a", "a"], [0.5, 0.5]]},
              node(10): stamped[node(10)] | {"fields": [["a"], [1.5]]},
              node(17): stamped[node(17)] | {"fields": [["a"], [None]]},
              node(11): stamped[node(11)] | {"domains": [["é.com"], *[[1]] * 6]},
              node(12): stamped[node(12)] | {"domains": [["a.com"], [-1], *[[1]] * 5]},
              node(14): stamped[node(14)] | {"domains": [["a.com"], *[[1]] * 5]},
              node(15): stamped[node(15)] | {"latency_buckets": [1, 2]}}
    redis_client.hset("scrapy:node:insight", mapping={k: v if isinstance(v, bytes) else json.dumps(v)
                                                      for k, v in wrongs.items()})
    # a figure written without an exponent or 19 digits that reads as 1e18, past the gate's bounds
    wrongs[node(18)] = json.dumps(stamped[node(18)] | {"domains": [["a.com"], *[[1]] * 5, ["big"]]}).replace(
        '["big"]', "[999999999999999999.5]")
    assert "999999999999999999.5" in wrongs[node(18)]
    redis_client.hset("scrapy:node:insight", node(18), wrongs[node(18)])
    redis_client.hdel("scrapy:node:insight", node(16))
    whole.clear()
    assert body() == default and len(whole) == len(wrongs) + 2
    # Without any insight value (every node an older extension's), every figure is the same.
    redis_client.delete("scrapy:node:insight")
    whole.clear()
    assert body() == default and body("?detail=node") == detail and len(whole) == 2 * 302


def test_a_large_answer_goes_out_whole_from_its_bytes(api, redis_client):
    # 600 nodes: lists of 600 KB and (?fields=all) 5 MB, past waitress's outbuf_overflow, sent through its file
    # wrapper (monitor_cache.wrapped), computed and then from the cache
    domains = {f"shop-{d}.example.com": {"pages": d, "errors": 0, "4xx": 1, "5xx": 0, "429": 1, "503": 0}
               for d in range(100)}
    nodes = [testbed.snapshot(f"big:h{i}:{i}", "big", pages=i, domains=domains) for i in range(600)]
    testbed.publish(redis_client, *nodes)
    for path in ("/metrics?spider=big", "/metrics?spider=big", "/metrics/big", "/metrics?spider=big&fields=all"):
        for encoding in ("identity", "gzip"):
            answer = requests.get(api.url + path, headers={"Accept-Encoding": encoding}, timeout=30)
            assert answer.status_code == 200
            body = answer.json()
            listed = body["nodes"] if path == "/metrics/big" else body
            assert sorted(listed) == sorted(n["node"] for n in nodes), path
            assert [listed[n["node"]]["pages"] for n in nodes] == list(range(600))
            if encoding == "identity":
                assert int(answer.headers["Content-Length"]) == len(answer.content) >= monitor_cache.WRAP_FROM
        again = requests.get(api.url + path, headers={"If-None-Match": answer.headers["ETag"]}, timeout=30)
        assert again.status_code == 304 and again.content == b""
    whole = requests.get(api.url + "/metrics?spider=big&fields=all", timeout=30)
    assert len(whole.content) > monitor_api.WAITRESS_OUTBUF


def test_the_page_ages_last_seen_while_an_idle_cluster_answers_304(api, redis_client, open_page):
    node = "main_spider:idle:1"
    testbed.publish(redis_client, testbed.snapshot(node, age=20, interval=5))  # stale, and silent from now on
    page = open_page(f"{api.url}/?interval={testbed.FAST}")
    seen = page.locator(f'[data-node="{node}"] .c-seen')

    def seconds():
        found = re.fullmatch(r"last seen (\d+) s ago", seen.inner_text())
        return int(found.group(1)) if found else None

    # The card may not be drawn yet when the wait starts: its text is read only once it is.
    text = "(document.querySelector('.c-seen') || {textContent: ''}).textContent"
    testbed.until(page, f"() => /last seen \\d+ s ago/.test({text})")
    first, etag = seconds(), requests.get(f"{api.url}/metrics", timeout=5).headers["ETag"]
    testbed.until(page, f"(n) => (/last seen (\\d+) s ago/.exec({text}) || [0, -1])[1] >= n",
                  first + 3)  # polls answered 304 (below): the body is the first one, its ages keep growing
    assert requests.get(f"{api.url}/metrics", headers={"If-None-Match": etag}, timeout=5).status_code == 304
    assert first + 3 <= seconds() < first + 20


def test_slim_readers_read_a_node_without_a_slim_value_from_the_status_hash(redis_client):
    testbed.publish(redis_client, *(testbed.snapshot(f"s:h:{i}", "s", pages=i) for i in range(3)))
    redis_client.hset(monitor_contract.status_key("scrapy"), "s:old:9",  # an older extension writes no slim value
                      json.dumps(testbed.snapshot("s:old:9", "s", pages=9)))
    reader = monitor_nodes.NodeReader(redis_client, "scrapy", slim=True)
    nodes, skipped, _ = reader.read(T0)
    assert skipped == 0 and {n: s["pages"] for n, s in nodes.items()} == {"s:h:0": 0, "s:h:1": 1, "s:h:2": 2,
                                                                          "s:old:9": 9}
    redis_client.hdel(monitor_contract.status_key("scrapy"), "s:h:0")  # gone from the status hash: gone
    assert set(reader.read(T0)[0]) == {"s:h:1", "s:h:2", "s:old:9"}


def test_a_big_clusters_reads_take_only_the_nodes_written_since_and_a_whole_read_now_and_then(
        redis_client, redis_url, monkeypatch):
    """From FEED_FROM nodes a reader with a change feed reads the nodes the notifications name (new, changed, pruned)
    and keeps the others as last read: the same nodes as a whole read. A value changed without a notification shows
    at the next whole read (every FULL_EVERY seconds), nodes added or deleted without one at once (the count
    differs); a lost subscription makes the next read whole."""
    monkeypatch.setattr(monitor_nodes, "FEED_FROM", 5)
    testbed.publish(redis_client, *(testbed.snapshot(f"s:h:{i}", "s", pages=i) for i in range(8)))
    feed = monitor_nodes.ChangeFeed(redis_url, "scrapy")
    reader = monitor_nodes.NodeReader(monitor_settings.connect(redis_url), "scrapy", slim=True, feed=feed)
    whole, parse = [], reader.parse
    monkeypatch.setattr(reader, "parse", lambda *a: whole.append(1) or parse(*a))

    def read():
        nodes = reader.read(T0)[0]
        assert nodes == monitor_nodes.NodeReader(redis_client, "scrapy", slim=True).read(T0)[0]  # as a whole read
        return nodes

    wait_for(lambda: feed.subscribed, what="the feed's subscription (made with the reader)")
    read()  # whole: the first
    read()  # from the feed already: nothing written since
    assert len(whole) == 1
    testbed.publish(redis_client, testbed.snapshot("s:h:3", "s", pages=999), testbed.snapshot("s:h:new", "s"))
    monitor_nodes.prune_nodes(redis_client, {"s:h:0": testbed.get_node(redis_client, "s:h:0")}, 0, "scrapy",
                             now=time.time() + 10 ** 6)
    redis_client.hset("scrapy:node:slim", "s:h:5", b"not JSON")  # by hand: no notification
    redis_client.hset("scrapy:node:status", "s:h:old", monitor_contract.dumps(testbed.snapshot("s:h:old", "s")))
    monitor_contract.notify(redis_client, "scrapy", "node", "s:h:old")  # an older extension's: no slim value
    wait_for(lambda: {b"s:h:3", b"s:h:new", b"s:h:0", b"s:h:old"} <= feed.dirty, what="the notifications")
    nodes = reader.read(T0)[0]
    assert len(whole) == 1 and nodes["s:h:3"]["pages"] == 999 and "s:h:new" in nodes and "s:h:0" not in nodes
    assert nodes["s:h:old"]["node"] == "s:h:old"
    assert "s:h:5" in nodes  # not seen yet: nobody told
    monkeypatch.setattr(monitor_nodes, "FULL_EVERY", 0)
    assert "s:h:5" not in read() and len(whole) == 2  # the whole read sees it (malformed: skipped)
    monkeypatch.setattr(monitor_nodes, "FULL_EVERY", 30.0)
    generation = feed.generation
    redis_client.client_kill_filter(_type="pubsub")
    wait_for(lambda: feed.subscribed and feed.generation > generation, what="a new subscription")
    read()
    assert len(whole) == 3
    testbed.publish(redis_client, testbed.snapshot("s:h:4", "s", pages=444))
    wait_for(lambda: b"s:h:4" in feed.dirty, what="the notification")
    assert read()["s:h:4"]["pages"] == 444 and len(whole) == 3
    redis_client.delete("scrapy:node:status", "scrapy:node:slim")  # by hand: as many nodes no more
    testbed.publish(redis_client, testbed.snapshot("s:h:1", "s", pages=111))
    wait_for(lambda: b"s:h:1" in feed.dirty, what="the notification")
    assert list(read()) == ["s:h:1"] and len(whole) == 4
