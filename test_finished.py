"""'The crawl is done' and rules that act (issue 19 §3-4): the spider state, ScrapyCrawlFinished once per finish,
ALERT_FINISHED_ACTION and ALERT_ACTIONS, against real Redis and real crawls."""

import time

import pytest

import monitor_contract
import monitor_read
import monitor_snapshot
import testbed_servers
from testbed import T0, make_app, report, run_script
from testbed_servers import Site, wait_for

S = "main_spider"


def node(state="live", idle_since=None, timestamp=T0, seen=None, **more):
    snap = {"state": state, "timestamp": timestamp, "spider": S, **more}
    if idle_since is not None:
        snap["idle_since"] = idle_since
    if seen is not None:
        snap["seen"] = seen
    return snap


@pytest.mark.parametrize("snaps, queued, now, expected", [
    pytest.param([node(idle_since=T0 - 100)], 0, T0, ("finished", 100), id="idle long enough"),
    pytest.param([node(idle_since=T0 - 30)], 0, T0, ("idle", 30), id="idle not yet long enough"),
    pytest.param([node(idle_since=T0 - 100), node(idle_since=T0 - 5)], 0, T0, ("idle", 5), id="the latest node counts"),
    pytest.param([node(idle_since=T0 - 100)], 3, T0, ("crawling", None), id="work queued"),
    pytest.param([node(idle_since=T0 - 100)], None, T0, ("finished", 100), id="no scrapy-redis queue"),
    pytest.param([node()], 0, T0, ("idle", 0), id="a node that does not say is busy"),
    pytest.param([node("paused", T0 - 100), node("paused", T0 - 100)], 5, T0, ("paused", None), id="all paused"),
    pytest.param([node("paused", T0 - 100), node(idle_since=T0 - 100)], 0, T0, ("finished", 100), id="one live"),
    pytest.param([node("closed", T0 - 100), node("closed", T0 - 100)], 0, T0, ("finished", None), id="all closed"),
    pytest.param([node("closed", T0 - 100), node("stale", T0 - 100)], 0, T0, ("idle", None), id="one stale"),
    pytest.param([node("closed")], 4, T0, ("crawling", None), id="nobody left, work queued"),
    pytest.param([node(idle_since=T0 + 3590, timestamp=T0 + 3600, seen=T0)], 0, T0 + 1, ("idle", 11),
                 id="a node clock an hour fast, judged on Redis's clock"),
    pytest.param([node(idle_since=T0, timestamp=T0)], 0, T0 + 5, ("crawling", None),
                 id="busy at its last report: a page or a request in flight, nothing queued"),
    pytest.param([node(idle_since=T0 + 0.7, timestamp=T0), node(idle_since=T0 - 100)], None, T0 + 5,
                 ("crawling", None), id="no scrapy-redis queue, one node busy: a plain spider crawling slowly"),
    pytest.param([node("paused", T0, timestamp=T0), node(idle_since=T0 - 100)], 0, T0, ("idle", 0),
                 id="a paused node is not crawling, and not idle either"),
    pytest.param([node("stale", T0, timestamp=T0)], 0, T0 + 100, ("idle", None), id="a stale node's neither"),
    pytest.param([node(idle_since=T0 - 3700, timestamp=T0 - 3600, seen=T0)], 0, T0, ("finished", 100),
                 id="a node clock an hour slow"),
])
def test_spider_state(snaps, queued, now, expected):
    assert monitor_read.spider_state(snaps, queued, now, 60) == expected


def quiet(redis_client, t, idle_since, **fields):
    for n in ("a", "b"):
        report(redis_client, f"{S}:{n}", t, spider=S, idle_since=idle_since, pages=40, items=30, dead=1, **fields)


def test_a_finish_is_sent_once_with_totals_drains_once_and_a_new_seed_starts_a_new_crawl(make, redis_client, smtp):
    alerter = make("--rules", "finished", ALERT_FINISHED_ACTION="drain", MONITOR_FINISHED_AFTER="60",
                   ALERT_REPEAT="60")
    for t in (0, 30, 90, 200, 400):  # idle since T0: idle, then finished, then finished still
        quiet(redis_client, T0 + t, T0)
        alerter.run_once(T0 + t)
    assert smtp.subjects() == [f"[scrapy] FIRING 1: finished on {S}"]
    body = smtp.messages()[0].get_body(("plain",)).get_content()
    assert "crawl finished: 80 pages, 60 items, 0 errors, 2 dead letters in 1h00m" in body
    log = [monitor_contract.loads(x) for x in redis_client.lrange("scrapy:control:log", 0, -1)]
    assert [(e["command"], e["target"], e["who"], e["via"]) for e in log] == [("drain", f"spider:{S}", "alerter",
                                                                                 "finished")]
    quiet(redis_client, T0 + 460, T0 + 460, queue_start_urls=5)  # seeded again: crawling
    alerter.run_once(T0 + 460)
    for t in (520, 600):
        quiet(redis_client, T0 + t, T0 + 500)
        alerter.run_once(T0 + t)
    assert smtp.subjects() == [f"[scrapy] FIRING 1: finished on {S}"] * 2  # no "resolved", a new finish
    assert redis_client.llen("scrapy:control:log") == 2


def test_errors_pause_acts_once_per_firing_never_while_silenced_and_dry_run_prints_it(make, redis_client, smtp):
    alerter = make("--for", "0", "--rules", "errors", ALERT_ACTIONS="errors=pause", ALERT_REPEAT="60")
    for t in (0, 60, 120, 180):  # firing, then repeats: one pause
        report(redis_client, "n1", T0 + t, errors_per_min=100.0)
        alerter.run_once(T0 + t)
    log = [monitor_contract.loads(x) for x in redis_client.lrange("scrapy:control:log", 0, -1)]
    assert [(e["command"], e["target"], e["who"], e["via"]) for e in log] == [("pause", "node:n1", "alerter", "errors")]
    assert len(smtp.subjects()) >= 3  # it was sent again, and did not act again
    c = make_app(alerter.cfg.redis_url).test_client()
    assert c.post("/silences", json={"matchers": {"node": "n2"}, "duration": 3600}).status_code == 201
    report(redis_client, "n2", T0 + 240, errors_per_min=100.0)
    alerter.run_once(T0 + 240)
    assert redis_client.llen("scrapy:control:log") == 1  # silenced: no action


def test_dry_run_prints_the_actions_and_bad_actions_are_one_line_exit_2(redis_url, redis_client):
    report(redis_client, "n1", monitor_contract.redis_now(redis_client.time()), errors_per_min=100.0)
    env = {"REDIS_URL": redis_url, "ALERT_ACTIONS": "errors=pause", "ALERT_FOR": "0", "ALERT_RULES": "errors"}
    done = run_script("--once", "--dry-run", env=env)
    assert "would pause node:n1 (rule errors, as alerter)" in done.stdout, done.stdout + done.stderr
    assert redis_client.llen("scrapy:control:log") == 0
    for bad, says in (("errors=reboot", "unknown command 'reboot'"), ("nope=pause", "unknown rule 'nope'"),
                      ("errors", "rule=command pairs")):
        done = run_script("--once", env={**env, "ALERT_ACTIONS": bad})
        assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_spiders_and_prometheus_show_the_crawl_state(redis_url, redis_client):
    now = monitor_contract.redis_now(redis_client.time())
    report(redis_client, f"{S}:a", now, idle_since=now - 100)
    report(redis_client, "other:a", now, spider="other", idle_since=now - 5, queue_requests=3)
    c = make_app(redis_url, MONITOR_FINISHED_AFTER="60").test_client()
    views = c.get("/spiders").get_json()
    assert (views[S]["state"], views["other"]["state"]) == ("finished", "crawling")
    one = c.get(f"/metrics/{S}").get_json()  # the spider's own view says the same
    assert one["state"] == "finished" and 100 <= one["idle_for"] < views[S]["idle_for"] + 5
    text = c.get("/prometheus").get_data(as_text=True)
    assert f'scrapy_spider_state{{spider="{S}",state="finished"}} 1.0' in text
    assert 'scrapy_spider_state{spider="other",state="finished"} 0.0' in text


# ---------------------------------------------------------------------------- against a real crawl

def test_a_three_node_crawl_becomes_finished_and_drain_makes_every_node_exit(make, redis_url, redis_client, site,
                                                                             crawlers):
    procs = [crawlers(env={"REDIS_URL": redis_url, "MONITOR_INTERVAL": "1"},
                      settings={"ROBOTSTXT_OBEY": "False", "CONCURRENT_REQUESTS": 2}) for _ in range(3)]
    wait_for(lambda: redis_client.hlen("scrapy:node:status") == 3, 30, what="three nodes reporting")
    alerter = make("--rules", "finished", ALERT_FINISHED_ACTION="drain", MONITOR_FINISHED_AFTER="2")
    redis_client.rpush("distributed:start_urls", *(monitor_contract.dumps({"url": site.url.rstrip("/") + p})
                                                   for p in site.page_paths()))
    fired = []

    def finished():
        notes = alerter.run_once() or []
        fired.extend((time.monotonic(), n) for n in notes if n["rule"] == "finished")
        return fired

    wait_for(finished, 60, step=0.2, what="the crawl finished")
    assert site.page_hits() == dict.fromkeys(site.page_paths(), 1)
    # Within MONITOR_FINISHED_AFTER + 2 intervals of the last page (and one alerter pass, on a shared machine).
    assert fired[0][0] - site.last_hit <= 2 + 2 * 1 + 1.5, fired[0][0] - site.last_hit
    assert "crawl finished: 40 pages" in fired[0][1]["summary"]
    for proc in procs:
        proc.wait(30)
    nodes = [monitor_snapshot.decode_snapshot(raw) for raw in redis_client.hvals("scrapy:node:status")]
    assert [(s["status"], s["finish_reason"]) for s in nodes] == [("closed", "drained")] * 3
    for _ in range(3):
        alerter.run_once()
    assert len(fired) == 1  # still finished, every node gone: nothing more is sent


def test_a_plain_spider_crawling_slowly_is_crawling_until_it_closes_then_finished(redis_url, crawlers, tmp_path):
    """A spider without scrapy-redis, a page every 2 s, judged finished after 1 s idle: between its pages a request
    waits in the download slot, so its node is busy and the crawl is never called idle or finished while it runs."""
    project = testbed_servers.scrapy_project(tmp_path, "plain", testbed_servers.PLAIN_SPIDER)
    site = Site(pages=4).start()
    try:
        proc = crawlers("plain", env={"REDIS_URL": redis_url, "MONITOR_INTERVAL": "1"}, cwd=project,
                        args=["-a", f"url={site.url}"],
                        settings={"DOWNLOAD_DELAY": 2, "RANDOMIZE_DOWNLOAD_DELAY": False})
        c = make_app(redis_url, MONITOR_FINISHED_AFTER="1").test_client()
        states = []
        while proc.poll() is None:  # what a reader sees at each moment of the crawl, while the node is live
            view = c.get("/spiders").get_json().get("plain")
            if view and view["nodes_live"] and view["nodes_closed"] == 0:
                states.append(view["state"])
            time.sleep(0.1)
        assert proc.returncode == 0 and len(site.page_hits()) == 4
        assert len(states) >= 20 and set(states) == {"crawling"}, states
        assert c.get("/spiders").get_json()["plain"]["state"] == "finished"  # its node closed
    finally:
        site.stop()
