"""Rule domain_refusing and the slow action (issue 19 §4): a domain refusing with 429/503 gets a cluster-wide
download delay that doubles, halves back, and that every node applies to its download slot."""

import time

import pytest

import monitor_contract
import monitor_rules
import monitor_snapshot
from testbed import T0, make_app, report
from testbed_servers import wait_for

LIMIT, WINDOW, MOST = 0.2, 120, 60


@pytest.mark.parametrize("delay, changed, share, responses, raise_ok, now, expected", [
    pytest.param(None, 0, 0.3, 50, True, T0, (1.0, T0), id="first refusals: 1 s"),
    pytest.param(None, 0, 0.3, 49, True, T0, (None, 0), id="too few responses"),
    pytest.param(None, 0, 0.3, 500, False, T0, (None, 0), id="its alert is silenced or not firing"),
    pytest.param(1.0, T0, 0.3, 60, True, T0 + 60, (1.0, T0), id="doubles at most once per window"),
    pytest.param(1.0, T0, 0.3, 60, True, T0 + 120, (2.0, T0 + 120), id="doubles after a window"),
    pytest.param(40.0, T0, 0.3, 60, True, T0 + 120, (60.0, T0 + 120), id="up to the most"),
    pytest.param(60.0, T0, 0.3, 60, True, T0 + 500, (60.0, T0), id="stays at the most"),
    pytest.param(8.0, T0, 0.15, 60, True, T0 + 500, (8.0, T0), id="between half the limit and the limit: held"),
    pytest.param(8.0, T0, 0.05, 5, False, T0 + 60, (8.0, T0), id="under half, not yet a window"),
    pytest.param(8.0, T0, 0.05, 5, False, T0 + 120, (4.0, T0 + 120), id="under half for a window: halves"),
    pytest.param(1.0, T0, 0.0, 0, False, T0 + 120, (None, T0 + 120), id="lifted below the first delay"),
])
def test_next_delay(delay, changed, share, responses, raise_ok, now, expected):
    assert monitor_rules.next_delay(delay, changed, share, responses, LIMIT, raise_ok, now, WINDOW, MOST) == expected


@pytest.mark.parametrize("now, window, slack, expected", [
    pytest.param(T0 + 60, 60, 0, list(range(T0, T0 + 61, 10)), id="a-window-of-whole-buckets"),
    pytest.param(T0 + 65, 60, 0, list(range(T0, T0 + 61, 10)), id="the-bucket-holding-its-start-counts"),
    pytest.param(T0 + 7, 5, 0, [T0], id="shorter-than-a-bucket"),
    pytest.param(T0 + 12, 5, 0, [T0, T0 + 10], id="shorter-than-a-bucket-across-two"),
    pytest.param(T0 + 7200, 7200, 0, list(range(T0 + 7200 - 3600, T0 + 7201, 10)), id="at-most-an-hour"),
    pytest.param(T0 + 65, 60, 10, list(range(T0 - 10, T0 + 71, 10)), id="an-estimate-a-bucket-more-each-side"),
    pytest.param(T0 + 7200, 7200, 10, list(range(T0 + 7200 - 3610, T0 + 7211, 10)), id="beyond-the-hour-too"),
])
def test_refusal_starts(now, window, slack, expected):
    assert monitor_rules.refusal_starts(now, window, slack) == expected


def test_refusal_buckets_add_up_what_each_node_counted_since_its_last_write(redis_client):
    """Nodes of two spiders write as the extension does (their counts since their last rollup, through the Lua script
    in a real Redis): a window's buckets hold each spider's growth within it, whatever the nodes' order of domains, a
    restart (counting from zero again), a domain named like JSON, and ``other`` left out."""
    rolled, at = {}, T0 + 3

    def write(node, spider, t, **figures):  # figures: domain -> (pages, 429, 503)
        doms = {name: {"pages": p, "429": a, "503": b} for name, (p, a, b) in figures.items()}
        report(redis_client, node, T0 + t, rolled=rolled, spider=spider, domains=doms)

    write("n1", "s", 3, **{"a.test": (10, 1, 0), "other": (99, 99, 0)})
    write("n2", "s", 4, **{'x","y': (5, 0, 0), "a.test": (20, 0, 2)})
    write("n3", "t", 5, **{"a.test": (7, 7, 0)})
    first = monitor_rules.refusal_shares([redis_client.hgetall(monitor_contract.refusals_key("scrapy", T0))])
    assert first == {"s": {"a.test": {"share": 0.1, "responses": 30}, 'x","y': {"share": 0.0, "responses": 5}},
                     "t": {"a.test": {"share": 1.0, "responses": 7}}}
    write("n1", "s", 63, **{"a.test": (40, 11, 5)})  # +30 pages, +15 refused
    del rolled["n2"]  # n2 restarted: its counts start again
    write("n2", "s", 64, **{"a.test": (4, 0, 1)})
    buckets = [redis_client.hgetall(monitor_contract.refusals_key("scrapy", start))
               for start in monitor_rules.refusal_starts(at + 60, 50)]
    assert monitor_rules.refusal_shares(buckets) == {"s": {"a.test": {"share": 16 / 34, "responses": 34}}}
    assert 3600 < redis_client.ttl(monitor_contract.refusals_key("scrapy", T0 + 60)) <= 3607  # an hour after its end


@pytest.mark.parametrize("bucket, expected", [
    pytest.param({}, {}, id="none"),
    pytest.param({b'["s","a","pages"]': b"10", b'["s","a","refused"]': b"4"}, {"s": {"a": (0.4, 10)}}, id="bytes"),
    pytest.param({'["s","a","refused"]': "4"}, {"s": {"a": (0.0, 0)}}, id="refusals-without-pages"),
    pytest.param({'["s","a","pages"]': "2", '["s","a","refused"]': "9"}, {"s": {"a": (1.0, 2)}}, id="share-at-most-1"),
    pytest.param({"not json": "1", '["s","a"]': "1", '["s","a","pages","x"]': "1", '[1,"a","pages"]': "1",
                  '["s","","pages"]': "1", '["s","a","errors"]': "1", '["s","b","pages"]': "-1",
                  '["s","c","pages"]': "1.5", '["s","d","pages"]': "x", '["s","e","pages"]': str(10 ** 18),
                  '["s","' + "f" * 301 + '","pages"]': "1", '{"s":1}': "1", '["s","a","pages"]': "3"},
                 {"s": {"a": (0.0, 3)}}, id="hand-edited-fields-skipped"),
])
def test_refusal_shares(bucket, expected):
    got = monitor_rules.refusal_shares([bucket])
    assert {s: {d: (v["share"], v["responses"]) for d, v in doms.items()} for s, doms in got.items()} == expected


def domains(pages, refused):
    return {"a.test": {"pages": pages, "errors": 0, "4xx": refused, "5xx": 0, "429": refused, "503": 0}}


def test_domain_refusing_fires_and_slow_doubles_then_halves_back_logged_as_the_alerter(make, redis_client, smtp):
    alerter = make("--for", "0", "--rules", "domain_refusing", ALERT_ACTIONS="domain_refusing=slow",
                   ALERT_INTERVAL="60", MONITOR_SLOW_MAX="4")
    delays, rolled = [], {}
    for t, pages, refused in [(0, 0, 0), (60, 100, 40), (120, 200, 80), (180, 300, 120), (240, 400, 160),
                              (300, 500, 160), (360, 600, 160), (420, 700, 160), (480, 800, 160)]:
        report(redis_client, "n1", T0 + t - 5, rolled=rolled, domains=domains(pages, refused))  # 5 s before
        alerter.run_once(T0 + t)
        delays.append(monitor_contract.slow_delays(redis_client.hgetall("scrapy:slow")).get("a.test"))
    assert delays == [None, 1.0, 2.0, 4.0, 4.0, 2.0, 1.0, None, None]
    assert smtp.subjects()[0] == "[scrapy] FIRING 1: domain_refusing on main_spider"
    assert "a.test 40% of 100" in smtp.messages()[0].get_body(("plain",)).get_content()
    log = [monitor_contract.loads(x) for x in redis_client.lrange("scrapy:control:log", 0, -1)][::-1]
    assert [(e["command"], e["target"], e["who"], e["via"], e["delay"]) for e in log] == [
        ("slow", "domain:a.test", "alerter", "domain_refusing", d) for d in (1, 2, 4, 2, 1, None)]


def test_on_redis_clock_the_window_rides_on_the_evaluations_read_after_the_first(make, redis_client, monkeypatch):
    """The first evaluation knows Redis's clock only once it read it: it reads the window's buckets apart; the next
    ones queue them on their one read (by the clock the last one saw, a bucket more each side)."""
    import redis

    alerter = make("--for", "0", "--rules", "domain_refusing")
    pipelines = []
    real = redis.client.Pipeline.execute

    def execute(self, *args, **kwargs):
        pipelines.append([(c[0][0], str(c[0][1])) for c in self.command_stack if len(c[0]) > 1])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    rolled = {}
    for n in range(2):
        report(redis_client, "n1", time.time(), rolled=rolled, domains=domains(100 * (n + 1), 40 * (n + 1)))
        del pipelines[:]
        alerter.run_once()
        refusal_reads = [[k for name, k in p if name == "HGETALL" and ":refusals:" in k] for p in pipelines]
        apart = [keys for p, keys in zip(pipelines, refusal_reads) if keys and len(keys) == len(p)]
        assert bool(apart) == (n == 0), pipelines  # read apart only the first time
        assert any(refusal_reads), pipelines
    record = monitor_contract.loads(redis_client.hget("scrapy:alert:state", "domain_refusing:main_spider"))
    assert record["state"] == "firing" and "a.test 40%" in record["summary"]


# ---------------------------------------------------------------------------- against a real crawl

def test_a_host_refusing_a_third_gets_a_delay_on_both_nodes_and_its_request_rate_falls(
        make, redis_url, redis_client, site, crawlers):
    site.pages = 3000
    site.delay = 0.02
    site.status_of = lambda i: 429 if i % 3 == 0 and i else 200
    # a wide crawl: each page links the next 30
    site.body = lambda i: "".join(f'<a href="/page/{n}">{n}</a>' for n in range(i + 1, min(i + 30, 3000)))
    env = {"REDIS_URL": redis_url, "MONITOR_INTERVAL": "1", "MONITOR_NODE_ID": None}
    for i in range(2):
        crawlers(env={**env, "MONITOR_NODE_ID": f"n{i}"}, settings={"ROBOTSTXT_OBEY": "False", "CONCURRENT_REQUESTS": 4,
                                                                    "RETRY_TIMES": 0})
    wait_for(lambda: redis_client.hlen("scrapy:node:status") == 2, 30, what="two nodes reporting")
    redis_client.rpush("distributed:start_urls", monitor_contract.dumps({"url": site.url}))
    wait_for(lambda: site.first_hit, 10, what="the crawl to start")
    alerter = make("--for", "5", "--rules", "domain_refusing", ALERT_ACTIONS="domain_refusing=slow",
                   ALERT_INTERVAL="1", ALERT_DOMAIN_REFUSALS="0.2")
    host = "127.0.0.1"

    def slowed_on_both():
        """The delay stored, once both nodes report it applied (it may double meanwhile: a third still refused)."""
        alerter.run_once()
        stored = monitor_contract.slow_delays(redis_client.hgetall("scrapy:slow")).get(host)
        nodes = [monitor_snapshot.decode_snapshot(raw) for raw in redis_client.hvals("scrapy:node:status")]
        applied = {((s.get("domains") or {}).get(host) or {}).get("delay") for s in nodes}
        return stored if stored and applied == {stored} else None

    delay = wait_for(slowed_on_both, 60, step=0.5, what="the delay applied on both nodes")
    unslowed = sum(site.hits.values()) / (time.monotonic() - site.first_hit)
    assert make_app(redis_url).test_client().get("/spiders").get_json()["main_spider"]["slowed"][host] >= delay
    before = sum(site.hits.values())
    time.sleep(4)  # a rate is counted over time
    rate = (sum(site.hits.values()) - before) / 4
    assert rate <= 2 / delay + 1 < unslowed, (rate, delay, unslowed)  # two nodes, one request per delay each
    log = [monitor_contract.loads(x) for x in redis_client.lrange("scrapy:control:log", 0, -1)]
    assert [(e["command"], e["target"]) for e in log][-1] == ("slow", f"domain:{host}")
