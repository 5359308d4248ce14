"""Highly available Redis: Sentinel and Cluster URLs for every script, and what a failover does.

Real servers only: a master, a replica and three sentinels (``sentinel_group``), a three-master Redis Cluster
(``redis_cluster``), one of each per module; the pure parts (URL parsing, redaction, the hash tag, the
alerter's "Redis answering again" rule) are table-driven.
"""

import json
import threading
import time

import pytest
import redis
import requests

import monitor_contract
import monitor_rules
import monitor_settings
from monitor_settings import connect, ha_url, key_prefix, redact, safe_url, scrub
from testbed import EventReader, make_app, run_script, snapshot, store
from testbed_servers import ApiServer, Site, crawl_log, wait_for

NOW = 1_800_000_000.0


# ---------------------------------------------------------------------------- pure parts

@pytest.mark.parametrize("url, expected", [
    ("redis://localhost:6379/0", (None, [], "")),
    ("redis+sentinel://a:26379,b:26380/mymaster", ("sentinel", [("a", 26379), ("b", 26380)], "mymaster")),
    ("redis+sentinel://u:pw@a/mymaster/3", ("sentinel", [("a", 26379)], "mymaster/3")),
    ("rediss+sentinel://:pw@[::1]:5000/svc", ("sentinel", [("::1", 5000)], "svc")),
    ("redis+cluster://a:7000,b:7001,c", ("cluster", [("a", 7000), ("b", 7001), ("c", 6379)], "")),
    ("REDIS+CLUSTER://a:7000/", ("cluster", [("a", 7000)], "")),
])
def test_ha_urls_name_their_kind_hosts_and_service(url, expected):
    kind, nodes, path, plain = ha_url(url)
    assert (kind, nodes, path) == expected
    if kind:
        assert plain.startswith("rediss://" if url.startswith("rediss") else "redis://")


@pytest.mark.parametrize("url, reason", [
    ("redis+sentinel://a:1", "service_name"),
    ("redis+sentinel://a:1/svc/x", "service_name"),
    ("redis+sentinel://a:1,,b:2/svc", "host:port"),
    ("redis+sentinel://a:99999/svc", "Port out of range"),
    ("redis+cluster://a:1/5", "no database"),
    ("redis+cluster://:secret@a:1?bogus=1", "unknown option 'bogus'"),
    ("redis+cluster://a:1?socket_timeout=x", "socket_timeout"),
])
def test_malformed_ha_urls_are_one_line_without_the_password(url, reason):
    with pytest.raises(monitor_settings.ConfigError) as err:
        monitor_settings.redis_url("REDIS_URL", url)
    message = str(err.value)
    assert reason in message and "secret" not in message and "\n" not in message


@pytest.mark.parametrize("url, shown, host_only", [
    ("redis+sentinel://u:secret@a:1,b:2/svc?password=secret", "redis+sentinel://u:***@a:1,b:2/svc?password=***",
     "redis+sentinel://a:1,b:2/..."),
    ("rediss+cluster://:secret@a:7000,b:7001", "rediss+cluster://:***@a:7000,b:7001", "rediss+cluster://a:7000,b:7001/..."),
])
def test_passwords_of_ha_urls_never_reach_a_log(url, shown, host_only):
    assert redact(url) == shown
    assert safe_url(url) == host_only
    assert "secret" not in scrub(f"failed on {url}: refused", url)


@pytest.mark.parametrize("prefix, url, expected", [
    ("scrapy", "redis://h/0", "scrapy"),
    ("scrapy", "redis+sentinel://h:1/svc", "scrapy"),
    ("scrapy", "redis+cluster://h:1", "{scrapy}"),
    ("team:a", "rediss+cluster://h:1", "{team:a}"),
    ("{mine}:x", "redis+cluster://h:1", "{mine}:x"),  # a prefix with its own hash tag keeps it
])
def test_the_prefix_gets_a_hash_tag_only_under_a_cluster_url(prefix, url, expected):
    assert key_prefix(prefix, url) == expected
    assert monitor_contract.status_key(key_prefix(prefix, url)) == f"{expected}:node:status"


@pytest.mark.parametrize("answering_since, settled", [
    (None, True),  # no outage seen: judged as ever
    (NOW - 29, False),  # Redis back 29 s ago, node interval 10 s: not yet 3 intervals
    (NOW - 30, True),
    (NOW - 5, False),
])
def test_down_is_judged_only_after_redis_answers_for_three_intervals(answering_since, settled):
    node = {"node": "a", "spider": "s", "interval": 10, "state": "stale", "timestamp": NOW - 100, "seen": NOW - 100}
    assert monitor_rules.redis_settled(node, answering_since, NOW) is settled
    changes, _, notes = monitor_rules.evaluate({"a": node}, {}, {}, NOW, _alert_cfg(), answering_since=answering_since)
    assert bool(notes) is settled and ("down:a" in changes) is settled
    # a down alert firing before the outage stays firing (no resolve, no repeat) while judgement waits
    firing = {"down:a": {"state": "firing", "since": NOW - 500, "fired": NOW - 400, "sent": NOW - 400, "value": 90}}
    changes, _, notes = monitor_rules.evaluate({"a": node}, firing, {}, NOW, _alert_cfg(),
                                               answering_since=answering_since)
    assert notes == [] and changes["down:a"]["state"] == "firing" and changes["down:a"]["fired"] == NOW - 400


def _alert_cfg():
    import alert

    return alert.load_config(["--for", "0", "--redis-url", "redis://127.0.0.1:1/0"])


# ---------------------------------------------------------------------------- bad input against real servers

def test_an_unknown_service_or_a_cluster_url_on_a_plain_redis_is_one_line_and_exit_2(sentinel_group, redis_server):
    unknown = sentinel_group.url.replace("/mymaster/", "/nosuch/")
    plain = f"redis+cluster://127.0.0.1:{redis_server.port}"
    for url, said in ((unknown, "no sentinel knows a service 'nosuch'"), (plain, "without cluster mode")):
        done = run_script("--once", env={"REDIS_URL": url})
        assert done.returncode == 2, done.stderr
        assert said in done.stderr and len(done.stderr.strip().splitlines()) == 1
    # nothing answers: an outage, not a configuration error (the scripts wait for Redis as they do today)
    monitor_settings.redis_url("REDIS_URL", "redis+sentinel://127.0.0.1:1/mymaster")


def test_the_crawler_turns_the_monitor_off_on_an_unknown_service(sentinel_group, redis_url, crawlers):
    site = Site(pages=5).start()
    try:
        unknown = sentinel_group.url.replace("/mymaster/", "/nosuch/")
        proc = crawlers(env={"REDIS_URL": redis_url, "MONITOR_REDIS_URL": unknown, "MONITOR_INTERVAL": "1",
                             "MAX_IDLE_TIME_BEFORE_CLOSE": "2"})
        redis.Redis.from_url(redis_url).lpush("distributed:start_urls", site.url)
        assert proc.wait(60) == 0
        log = crawl_log(proc)
        assert log.count("no sentinel knows a service 'nosuch'") == 1 and "the monitor is off" in log
        assert len(site.page_hits()) == 5  # the crawl went on: every page of the site
    finally:
        site.stop()


# ---------------------------------------------------------------------------- a failover mid-crawl

def test_a_failover_mid_crawl_the_crawl_goes_on_the_api_comes_back_and_no_false_down(sentinel_group, crawlers, make,
                                                                                    smtp):
    url = sentinel_group.url
    r = connect(url, timeout=5)
    r.flushall()
    site = Site(pages=60, delay=0.1).start()
    api = ApiServer(url).start()
    alerter = make(REDIS_URL=url, ALERT_INTERVAL="1", ALERT_FOR="0")
    stop = threading.Event()

    def alerting():
        while not stop.is_set():
            alerter.tick()
            stop.wait(0.3)

    ticker = threading.Thread(target=alerting, daemon=True)
    try:
        proc = crawlers(env={"REDIS_URL": url, "MONITOR_INTERVAL": "1", "MAX_IDLE_TIME_BEFORE_CLOSE": "3"},
                        settings={"CONCURRENT_REQUESTS": "2"})
        r.lpush("distributed:start_urls", site.url)
        ticker.start()
        wait_for(lambda: len(site.page_hits()) >= 15, 30, what="the crawl to be under way")
        assert requests.get(api.url + "/health", timeout=5).status_code == 200
        stream = EventReader(api.url)  # push behind Sentinel: the API's subscription is on the master
        try:
            assert stream.wait("nodes", lambda d: d["nodes"])
        finally:
            stream.close()
        hits_at_kill = len(site.page_hits())
        sentinel_group.kill_master()
        killed = time.monotonic()
        statuses = []

        def back():
            started = time.monotonic()
            status = requests.get(api.url + "/health", timeout=5).status_code
            statuses.append((status, time.monotonic() - started))
            return status == 200 and 503 in [s for s, _ in statuses]

        wait_for(back, 30, step=0.1, what="the API to answer on the new master")
        failover = time.monotonic() - killed
        assert max(took for s, took in statuses if s == 503) < 1.5  # 503 quickly, never a hang
        health = wait_for(lambda: requests.get(api.url + "/redis", timeout=5).json().get("nodes"), 5, what="/redis")
        assert list(health) == [f"127.0.0.1:{sentinel_group.replica.port}"]  # the new master, named
        assert proc.wait(90) == 0
        log = crawl_log(proc)
        assert "from Redis" in log and "Traceback" not in log  # the node saw the failover, and lived
        assert len(site.page_hits()) >= 54 and len(site.page_hits()) > hits_at_kill  # the crawl went on
        closed = requests.get(api.url + "/metrics/main_spider", timeout=5).json()
        assert closed["nodes"] and all(n["status"] == "closed" for n in closed["nodes"].values())
        assert all(n["reports_dropped"] >= 0 for n in closed["nodes"].values())  # counted, when any
        assert not [s for s in smtp.subjects() if "down on" in s], smtp.subjects()
        print(f"failover seen by the API: {failover:.1f}s")
    finally:
        stop.set()
        ticker.join(10)
        api.stop()
        site.stop()


# ---------------------------------------------------------------------------- a Redis Cluster

def test_on_a_cluster_crawl_api_alerter_runs_and_control_all_work(redis_cluster, crawlers, make):
    url = redis_cluster.url
    client = redis_cluster.client()
    redis_cluster.flush()
    site = Site(pages=30, delay=0.05).start()
    api = ApiServer(url, MONITOR_API_READONLY="0").start()
    try:
        proc = crawlers(env={"REDIS_URL": url, "MONITOR_INTERVAL": "1"})
        client.lpush("distributed:start_urls", json.dumps({"url": site.url}))
        wait_for(lambda: len(site.page_hits()) == 30, 60, what="the whole site crawled on the cluster")
        def seen_all():
            nodes = requests.get(api.url + "/metrics", timeout=5).json()
            return [(n, s) for n, s in nodes.items() if (s.get("queue_dupefilter") or 0) >= 30]

        (node, snap), = wait_for(seen_all, 10, what="the node's report of the dupefilter (on its own shard)")
        assert snap["state"] == "live"
        assert client.hexists("{scrapy}:node:status", node) and not client.exists("scrapy:node:status")
        stream = EventReader(api.url)  # push: the API's one subscription on the cluster hears the node's writes
        try:
            assert stream.wait("nodes", lambda d: node in d["nodes"])["nodes"][node]["spider"] == "main_spider"
        finally:
            stream.close()
        # fleet control: a Lua script and a MULTI on the one slot of {scrapy}
        sent = requests.post(api.url + "/control", json={"command": "stop", "node": node}, timeout=5)
        assert sent.status_code == 202, sent.text
        assert proc.wait(60) == 0
        runs = wait_for(lambda: requests.get(api.url + "/runs?spider=main_spider", timeout=5).json()["runs"], 10,
                        what="the run record")
        assert runs[0]["finish_reason"] == "stopped" and runs[0]["pages"] >= 30
        alerter = make(REDIS_URL=url, ALERT_FOR="0")
        assert alerter.tick() and alerter.tick()
        assert client.exists("{scrapy}:alert:heartbeat")
        assert requests.get(api.url + "/alerts", timeout=5).status_code == 200
        health = requests.get(api.url + "/redis", timeout=5).json()
        assert sorted(health["nodes"]) == sorted(f"127.0.0.1:{n.port}" for n in redis_cluster.nodes)
        assert health["spiders"]["main_spider"]["dupefilter"]["size"] >= 30  # a key on its own shard
    finally:
        api.stop()
        site.stop()


def test_on_a_cluster_seed_flush_and_requeue_act_on_the_spiders_keys_in_their_own_slots(redis_cluster):
    redis_cluster.flush()
    client = redis_cluster.client()
    keys = {"requests": "shop:requests", "start_urls": "shop:start_urls", "dupefilter": "shop:dupefilter"}
    assert len({client.keyslot(k) for k in (*keys.values(), "{scrapy}:control:log")}) == 4  # one script would fail
    store(client, snapshot("shop:h:1", spider="shop", queues={**keys, "start_urls_type": "list", "apart": False}),
          prefix="{scrapy}")
    c = make_app(redis_cluster.url).test_client()
    urls = {"urls": ["http://a.test/1", "http://a.test/2"]}
    seeded = c.post("/queues/shop/seed", json=urls, headers={"Idempotency-Key": "k1"})
    assert seeded.status_code == 200, seeded.get_json()
    assert seeded.get_json()["pushed"] == 2 and client.llen("shop:start_urls") == 2
    again = c.post("/queues/shop/seed", json=urls, headers={"Idempotency-Key": "k1"})
    assert again.get_json() == seeded.get_json() and client.llen("shop:start_urls") == 2  # a repeat pushes nothing
    client.zadd("shop:requests", {"r1": 0, "r2": 0, "r3": 0})
    client.sadd("shop:dupefilter", "f1")
    flushed = c.post("/queues/shop/flush", json={"what": ["requests", "start_urls", "dupefilter"]})
    assert flushed.status_code == 200 and flushed.get_json()["flushed"] == {"requests": 3, "start_urls": 2,
                                                                            "dupefilter": 1}
    assert not any(client.exists(k) for k in keys.values())

    def dead(n, first=0):
        members = [monitor_contract.dead_member({"url": f"http://a.test/d/{i}", "reason": "retry/max_reached",
                                                 "meta": {"k": i}, "at": 1_700_000_000 + i}, "shop:h:1", i)
                   for i in range(first, first + n)]
        with client.pipeline() as pipe:
            monitor_contract.write_dead(pipe, "{scrapy}", "shop", members, 100)
            pipe.execute()
        return [m.split(" ", 1)[0] for m in members]

    ids = dead(3)
    nobody = "00000000000000-00000000-00000000"
    one = c.post("/queues/shop/dead/requeue", json={"ids": [ids[0], nobody]}).get_json()
    assert (one["requeued"], one["missing"]) == (1, 1)
    entry = json.loads(client.lindex("shop:start_urls", 0))
    assert entry == {"url": "http://a.test/d/0", "meta": {"k": 0, "requeued": ids[0]}}
    assert c.post("/queues/shop/dead/requeue", json={"all": True}).get_json()["requeued"] == 2
    assert client.llen("shop:start_urls") == 3 and client.zcard("{scrapy}:dead:shop") == 0
    assert c.post("/queues/shop/dead/requeue", json={"ids": [ids[0]]}).status_code == 404
    # A push that fails (the start URL key is a string: a hand edit) gives the claimed dead letters back.
    client.delete("shop:start_urls")
    client.set("shop:start_urls", "x")
    held = dead(2, first=10)
    refused = c.post("/queues/shop/dead/requeue", json={"all": True})
    assert refused.status_code == 500 and "shop:start_urls is a string" in refused.get_json()["error"]
    assert sorted(m.split(b" ", 1)[0].decode() for m in client.zrange("{scrapy}:dead:shop", 0, -1)) == held
    log = c.get("/control/log").get_json()["log"]
    assert [e["command"] for e in log] == ["requeue", "requeue", "flush", "seed"]
    audit = c.get("/audit").get_json()["entries"]
    assert [(e["action"], e["outcome"]) for e in audit if e["action"].startswith("queues.")] == [
        ("queues.requeue", "refused"), ("queues.requeue", "applied"), ("queues.requeue", "applied"),
        ("queues.flush", "applied"), ("queues.seed", "applied")]  # the 404 refused; a repeat is not a change
