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


def test_window_shares_difference_the_counters_and_survive_a_restart():
    c = lambda pages, refused: {"s": {"a.test": (pages, refused)}}  # noqa: E731
    first = monitor_rules.window_shares([(T0, c(100, 30))], T0, 60)  # one sample: the whole run
    assert first == {"s": {"a.test": {"share": 0.3, "responses": 100}}}
    samples = [(T0, c(100, 30)), (T0 + 30, c(150, 30)), (T0 + 60, c(300, 80))]
    assert monitor_rules.window_shares(samples, T0 + 60, 60)["s"]["a.test"] == {"share": 0.25, "responses": 200}
    assert monitor_rules.window_shares(samples, T0 + 60, 30)["s"]["a.test"] == {"share": 50 / 150, "responses": 150}
    restarted = samples + [(T0 + 90, c(20, 10))]
    assert monitor_rules.window_shares(restarted, T0 + 90, 30)["s"]["a.test"] == {"share": 0.5, "responses": 20}
    nodes = {"n1": {"spider": "s", "domains": [["a.test"], [10], [3]]},
             "n2": {"spider": "s", "domains": [["a.test"], [5], [2]]}}
    assert monitor_rules.refusal_counts(nodes) == {"s": {"a.test": (15, 5)}}


def domains(pages, refused):
    return {"a.test": {"pages": pages, "errors": 0, "4xx": refused, "5xx": 0, "429": refused, "503": 0}}


def test_domain_refusing_fires_and_slow_doubles_then_halves_back_logged_as_the_alerter(make, redis_client, smtp):
    alerter = make("--for", "0", "--rules", "domain_refusing", ALERT_ACTIONS="domain_refusing=slow",
                   ALERT_INTERVAL="60", MONITOR_SLOW_MAX="4")
    delays = []
    for t, pages, refused in [(0, 0, 0), (60, 100, 40), (120, 200, 80), (180, 300, 120), (240, 400, 160),
                              (300, 500, 160), (360, 600, 160), (420, 700, 160), (480, 800, 160)]:
        report(redis_client, "n1", T0 + t, domains=domains(pages, refused))
        alerter.run_once(T0 + t)
        delays.append(monitor_contract.slow_delays(redis_client.hgetall("scrapy:slow")).get("a.test"))
    assert delays == [None, 1.0, 2.0, 4.0, 4.0, 2.0, 1.0, None, None]
    assert smtp.subjects()[0] == "[scrapy] FIRING 1: domain_refusing on main_spider"
    assert "a.test 40% of 100" in smtp.messages()[0].get_body(("plain",)).get_content()
    log = [monitor_contract.loads(x) for x in redis_client.lrange("scrapy:control:log", 0, -1)][::-1]
    assert [(e["command"], e["target"], e["who"], e["via"], e["delay"]) for e in log] == [
        ("slow", "domain:a.test", "alerter", "domain_refusing", d) for d in (1, 2, 4, 2, 1, None)]


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
