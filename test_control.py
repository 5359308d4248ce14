"""Fleet control end to end: real redis-server, real ``scrapy crawl main_spider`` nodes on a local site, the
API through Flask's test client, the dashboard in headless Chromium."""

import json
import logging
import socket
import time
from urllib.parse import quote

import pytest

import monitor_acting
import monitor_contract
import monitor_nodes
import monitor_snapshot
import testbed
from testbed import PAGE, WAIT, make_app, polls_after, publish, snap, snapshot, store
from testbed_servers import ApiServer, Site, crawl_log, wait_for

SPIDER = "main_spider"
QUEUE = f"{SPIDER}:requests"
INTERVAL = 1  # seconds between a node's reports (start_node's MONITOR_INTERVAL)


def nodes(client):
    return testbed.list_nodes(client, "scrapy")[0]


def node_id(proc):
    return f"{SPIDER}:{socket.gethostname()}:{proc.pid}"


def start_node(crawlers, redis_url, **settings):
    """A main_spider node reporting every second, two requests at a time."""
    return crawlers(env={"REDIS_URL": redis_url, "MONITOR_INTERVAL": str(INTERVAL)},
                    settings={"CONCURRENT_REQUESTS": 2, **settings})


def send(api, command, **target):
    resp = api.post("/control", json={"command": command, **target})
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()


def applied(client, node, command_id, status):
    snap = nodes(client).get(node, {})
    return (snap.get("command") or {}).get("id") == command_id and snap.get("status") == status and snap


def hits(site):
    return sum(site.page_hits().values())


def steady(site, seconds=1.0):
    """The site's hit count once it has not changed for ``seconds``."""
    def still():
        before = hits(site)
        time.sleep(seconds)  # no event marks the end of the last download in flight: a quiet second does
        return hits(site) == before and before + 1  # truthy even at 0
    return wait_for(still, 20, step=0, what="the crawl to stand still") - 1


def reports_for(client, ids, seconds):
    """Wait ``seconds`` on Redis's clock while every node in ``ids`` goes on reporting: done once they have passed
    and each node has reported within its last interval, so each ran (its control and start URL polls included,
    both every second) and wrote its heartbeat all that while. Returns their snapshots then."""
    until = monitor_contract.redis_now(client.time()) + seconds

    def reported():
        found = nodes(client)
        return (monitor_contract.redis_now(client.time()) >= until
                and all(monitor_snapshot.last_report(found.get(n, {})) >= until - INTERVAL for n in ids) and found)

    return wait_for(reported, seconds + 20, what=f"{seconds} s more of reports from {ids}")


@pytest.fixture
def slow_site():
    s = Site(pages=150, delay=0.3).start()
    yield s
    s.stop()


def test_pause_and_resume_two_nodes_fetch_every_page_once(redis_client, redis_url, slow_site, crawlers):
    procs = [start_node(crawlers, redis_url, MAX_IDLE_TIME_BEFORE_CLOSE=3) for _ in range(2)]
    ids = [node_id(p) for p in procs]
    wait_for(lambda: set(nodes(redis_client)) == set(ids), 30, what="both nodes registered")
    redis_client.lpush("distributed:start_urls", json.dumps({"url": slow_site.url}))
    wait_for(lambda: all(nodes(redis_client)[n]["pages"] >= 2 for n in ids), 30, what="both nodes crawling")
    api = make_app(redis_url).test_client()

    paused = [send(api, "pause", node=n, comment="429s") for n in ids]
    assert [p["nodes"] for p in paused] == [[n] for n in ids]
    for n, p in zip(ids, paused):
        wait_for(lambda n=n, p=p: applied(redis_client, n, p["id"], "paused"), 20, what=f"{n} paused")
    at_ack = hits(slow_site)
    stood = steady(slow_site, 2.0)  # two quiet seconds: a starved node may send its last one late
    assert stood - at_ack <= 4, "more than the in-flight requests were fetched after the pause"
    before = reports_for(redis_client, ids, 1)  # reports written after the last page in flight
    after = reports_for(redis_client, ids, 2)  # two seconds on, by both nodes' own reports
    assert hits(slow_site) == stood
    for n in ids:
        for shown in (before[n], after[n]):
            assert shown["state"] == "paused" and shown["command"]["name"] == "pause"
        assert after[n]["pages"] == before[n]["pages"]
    assert stood < slow_site.pages, "the site was crawled before the pause took"

    resumed = [send(api, "resume", node=n) for n in ids]
    for n, r in zip(ids, resumed):
        wait_for(lambda n=n, r=r: applied(redis_client, n, r["id"], "running"), 20, what=f"{n} resumed")
    wait_for(lambda: hits(slow_site) > stood, 20, what="pages fetched again")
    for proc in procs:
        assert proc.wait(120) == 0, crawl_log(proc)
    assert slow_site.page_hits() == {p: 1 for p in slow_site.page_paths()}  # none twice, none lost
    final = nodes(redis_client)
    assert sum(final[n]["items"] for n in ids) == slow_site.pages
    assert all(final[n]["finish_reason"] == "finished" for n in ids)

    log = api.get("/control/log?limit=3").get_json()["log"]
    assert [e["id"] for e in log] == sorted((e["id"] for e in paused + resumed), reverse=True)[:3]
    entry = api.get("/control/log").get_json()["log"][-1]
    assert entry["command"] == "pause" and entry["target"] == f"node:{ids[0]}" and entry["comment"] == "429s"
    assert entry["who"] == "anonymous" and entry["from"] == "127.0.0.1" and entry["via"].startswith("no token")
    assert entry["reached"] == 1
    assert set(entry["acks"]) == {ids[0]} and entry["acks"][ids[0]] >= entry["at"] - 5
    # A node's own command ends with the node.
    assert not redis_client.hkeys(monitor_contract.control_key("scrapy", "commands"))


def test_a_paused_node_never_closes_for_idling(redis_client, redis_url, crawlers):
    proc = start_node(crawlers, redis_url, MAX_IDLE_TIME_BEFORE_CLOSE=2)
    node = node_id(proc)
    wait_for(lambda: node in nodes(redis_client), 30, what="node registered")
    api = make_app(redis_url).test_client()
    sent = send(api, "pause", node=node)
    wait_for(lambda: applied(redis_client, node, sent["id"], "paused"), 20, what="node paused")
    later = reports_for(redis_client, [node], 5)  # more than twice its idle limit, with nothing queued
    assert later[node]["state"] == "paused"
    assert proc.poll() is None and nodes(redis_client)[node]["state"] == "paused"
    send(api, "resume", node=node)
    assert proc.wait(60) == 0, crawl_log(proc)  # idle again once resumed: it closes as before
    assert nodes(redis_client)[node]["finish_reason"] == "finished"


def test_stop_keeps_the_unfetched_requests_for_a_new_node(redis_client, redis_url, slow_site, crawlers):
    first = start_node(crawlers, redis_url)
    wait_for(lambda: node_id(first) in nodes(redis_client), 30, what="node registered")
    redis_client.lpush("distributed:start_urls", json.dumps({"url": slow_site.url}))
    wait_for(lambda: nodes(redis_client)[node_id(first)]["pages"] >= 3, 30, what="node crawling")
    api = make_app(redis_url).test_client()
    sent = send(api, "stop", node=node_id(first))
    assert first.wait(60) == 0, crawl_log(first)
    snap = nodes(redis_client)[node_id(first)]
    assert snap["status"] == "closed" and snap["finish_reason"] == "stopped"
    assert snap["command"]["id"] == sent["id"] and snap["command"]["name"] == "stop"
    fetched = hits(slow_site)
    assert redis_client.zcard(QUEUE) > 0 and fetched < slow_site.pages
    assert not redis_client.hexists(monitor_contract.control_key("scrapy", "commands"), f"node:{node_id(first)}")
    assert api.post("/control", json={"command": "pause", "node": node_id(first)}).status_code == 409

    # The slow site kept the first node from crawling it all before the stop; the second may go faster.
    second = start_node(crawlers, redis_url, MAX_IDLE_TIME_BEFORE_CLOSE=3, CONCURRENT_REQUESTS=8)
    assert second.wait(120) == 0, crawl_log(second)
    assert slow_site.page_hits() == {p: 1 for p in slow_site.page_paths()}
    assert nodes(redis_client)[node_id(second)]["finish_reason"] == "finished"
    assert nodes(redis_client)[node_id(second)]["pages"] >= slow_site.pages - fetched


def test_drain_closes_nodes_when_the_queue_is_empty_not_before(redis_client, redis_url, crawlers):
    site = Site(pages=60, delay=0.2).start()
    try:
        procs = [start_node(crawlers, redis_url) for _ in range(2)]  # they would wait for start URLs forever
        ids = [node_id(p) for p in procs]
        wait_for(lambda: set(nodes(redis_client)) == set(ids), 30, what="both nodes registered")
        redis_client.lpush("distributed:start_urls", json.dumps({"url": site.url}))
        wait_for(lambda: hits(site) >= 3, 30, what="crawling")
        api = make_app(redis_url).test_client()
        sent = send(api, "drain", spider=SPIDER)
        assert sent["nodes"] == sorted(ids) and sent["target"] == f"spider:{SPIDER}"
        for n in ids:
            wait_for(lambda n=n: (nodes(redis_client)[n].get("command") or {}).get("name") == "drain", 20,
                     what="drain acknowledged")
        assert hits(site) < site.pages and any(nodes(redis_client)[n]["status"] == "running" for n in ids)
        for proc in procs:
            assert proc.wait(120) == 0, crawl_log(proc)
        final = nodes(redis_client)
        assert [final[n]["finish_reason"] for n in ids] == ["drained", "drained"]
        assert site.page_hits() == {p: 1 for p in site.page_paths()}
        assert redis_client.zcard(QUEUE) == 0
    finally:
        site.stop()


def test_a_spider_wide_pause_holds_for_a_node_started_later(redis_client, redis_url, site, crawlers):
    first = start_node(crawlers, redis_url, MAX_IDLE_TIME_BEFORE_CLOSE=3)
    wait_for(lambda: node_id(first) in nodes(redis_client), 30, what="node registered")
    api = make_app(redis_url).test_client()
    sent = send(api, "pause", spider=SPIDER)
    assert sent["nodes"] == [node_id(first)]
    wait_for(lambda: applied(redis_client, node_id(first), sent["id"], "paused"), 20, what="first node paused")
    redis_client.lpush("distributed:start_urls", json.dumps({"url": site.url}))
    later = start_node(crawlers, redis_url, MAX_IDLE_TIME_BEFORE_CLOSE=3)
    wait_for(lambda: applied(redis_client, node_id(later), sent["id"], "paused"), 30, what="later node paused")
    reports_for(redis_client, [node_id(first), node_id(later)], 3)
    assert site.first_hit is None, "a node of a paused spider fetched pages"
    assert nodes(redis_client)[node_id(later)]["state"] == "paused"

    resumed = send(api, "resume", spider=SPIDER)
    assert resumed["nodes"] == sorted([node_id(first), node_id(later)])
    for proc in (first, later):
        assert proc.wait(120) == 0, crawl_log(proc)
    assert site.page_hits() == {p: 1 for p in site.page_paths()}
    # The resume is the spider's newest command: it stays, and a node started now just runs.
    stored = redis_client.hgetall(monitor_contract.control_key("scrapy", "commands"))
    assert {k.decode(): json.loads(v)["command"] for k, v in stored.items()} == {f"spider:{SPIDER}": "resume"}



def test_each_command_is_applied_once_across_a_redis_outage(redis_client, redis_url, site, crawlers):
    proc = start_node(crawlers, redis_url, MAX_IDLE_TIME_BEFORE_CLOSE=3)
    node = node_id(proc)
    wait_for(lambda: node in nodes(redis_client), 30, what="node registered")
    api = make_app(redis_url).test_client()
    sent = send(api, "pause", spider=SPIDER)
    wait_for(lambda: applied(redis_client, node, sent["id"], "paused"), 20, what="node paused")
    redis_client.execute_command("CLIENT", "PAUSE", 3000, "ALL")  # Redis hangs for 3 s: every call times out
    wait_for(lambda: "Control: cannot read commands" in crawl_log(proc), 15, what="the node to miss a read")
    wait_for(lambda: "Redis answers again" in crawl_log(proc), 15, what="the node reading again")
    redis_client.lpush("distributed:start_urls", json.dumps({"url": site.url}))
    later = reports_for(redis_client, [node], 2)
    assert site.first_hit is None and later[node]["state"] == "paused" and later[node]["queue_start_urls"] == 1
    assert nodes(redis_client)[node]["state"] == "paused"
    resumed = send(api, "resume", node=node)
    assert proc.wait(60) == 0, crawl_log(proc)
    log = crawl_log(proc)
    assert log.count(f"Control: pause (command {sent['id']}") == 1, log
    assert log.count(f"Control: resume (command {resumed['id']}") == 1, log
    assert log.count("Control: cannot read commands") == 1 and "Traceback" not in log
    assert site.page_hits() == {p: 1 for p in site.page_paths()}
    acks = {e["id"]: e["acks"] for e in api.get("/control/log").get_json()["log"]}
    assert set(acks[sent["id"]]) == {node} and set(acks[resumed["id"]]) == {node}

# ---------------------------------------------------------------------------- the API: who may act, bad bodies, the log

def stored_commands(client):
    return client.hgetall(monitor_contract.control_key("scrapy", "commands"))


def test_control_is_refused_at_the_route_and_every_refusal_is_logged(redis_client, redis_url, caplog):
    caplog.set_level(logging.INFO, logger="monitor_api")
    store(redis_client, snap("a:1"))
    body = {"command": "stop", "all": True}
    tokened = make_app(redis_url, MONITOR_API_TOKEN="s3cret").test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = tokened.post("/control", json=body, headers=headers)
        assert resp.status_code == 401 and resp.get_json()["error"]
    tokenless = make_app(redis_url).test_client()
    for origin in ("null", "http://evil.test"):
        resp = tokenless.post("/control", json=body, headers={"Origin": origin})
        assert resp.status_code == 403 and "MONITOR_API_TOKEN" in resp.get_json()["error"]
    resp = tokenless.get("/control")
    assert resp.status_code == 405 and resp.headers["Allow"] == "POST" and resp.get_json()["error"]
    resp = tokenless.post("/control", data={"command": "stop", "all": "true"})  # a foreign page's <form>
    assert resp.status_code == 415 and resp.get_json()["error"]
    readonly = make_app(redis_url, MONITOR_API_READONLY="1").test_client()
    resp = readonly.post("/control", json=body)
    assert resp.status_code == 403 and "MONITOR_API_READONLY" in resp.get_json()["error"]
    assert not stored_commands(redis_client)
    assert not redis_client.exists(monitor_contract.control_key("scrapy", "log"))

    ok = tokened.post("/control", json=body, headers={"Authorization": "Bearer s3cret", "Origin": "null"})
    assert ok.status_code == 202 and ok.get_json()["nodes"] == ["a:1"]
    entry = tokened.get("/control/log?token=s3cret").get_json()["log"][0]
    assert entry["via"] == "token" and entry["who"] == "token" and entry["from"] == "127.0.0.1"
    lines = [r.getMessage() for r in caplog.records if r.name == "monitor_api" and "/control " in r.getMessage()]
    assert [line.split()[0] for line in lines] == ["Refused"] * 7 + ["Accepted"], lines
    assert not any("s3cret" in r.getMessage() or "wrong" in r.getMessage() for r in caplog.records)


def test_bad_bodies_and_unknown_targets_get_json_errors(redis_client, redis_url):
    store(redis_client, snap("a:1"), snap("b:1", status="closed"))
    api = make_app(redis_url).test_client()
    bad = [
        "not json", [], {"command": "pause"}, {"command": "explode", "all": True},
        {"command": "pause", "all": True, "spider": SPIDER}, {"command": "pause", "all": 1},
        {"command": "pause", "node": ""}, {"command": "pause", "node": 7}, {"command": "pause", "spider": None},
        {"command": "pause", "all": True, "comment": 5}, {"command": "pause", "all": True, "comment": "x" * 501},
        {"command": "pause", "all": True, "extra": 1}, {"command": "pause", "node": "x" * 1001},
    ]
    for body in bad:
        kwargs = {"data": body, "content_type": "application/json"} if isinstance(body, str) else {"json": body}
        resp = api.post("/control", **kwargs)
        assert resp.status_code == 400 and resp.is_json and resp.get_json()["error"], body
    for body, status in (({"command": "pause", "node": "nobody"}, 404), ({"command": "pause", "spider": "nope"}, 404),
                         ({"command": "stop", "node": "b:1"}, 409)):
        resp = api.post("/control", json=body)
        assert resp.status_code == status and resp.get_json()["error"], body
    for limit in ("0", "1001", "x", "-1", "1.5"):
        resp = api.get(f"/control/log?limit={limit}")
        assert resp.status_code == 400 and resp.get_json()["error"], limit
    assert not stored_commands(redis_client)
    # A spider or all: the nodes reached now are the ones not closed.
    assert send(api, "pause", all=True)["nodes"] == ["a:1"]


def test_the_newest_command_of_a_nodes_three_targets_wins(redis_client, redis_url):
    store(redis_client, snap("a:1"), snap("a:2"), snap("other:1", spider="other"))
    api = make_app(redis_url).test_client()

    def effective(node, spider=SPIDER):
        raws = redis_client.hmget(monitor_contract.control_key("scrapy", "commands"),
                                  monitor_contract.control_targets(node, spider))
        command = monitor_contract.newest_command(raws)
        return command and command["command"]

    send(api, "pause", spider=SPIDER)
    assert effective("a:1") == effective("a:2") == "pause" and effective("other:1", "other") is None
    send(api, "resume", node="a:1")
    assert effective("a:1") == "resume" and effective("a:2") == "pause"
    send(api, "drain", all=True)
    assert effective("a:1") == effective("a:2") == effective("other:1", "other") == "drain"
    send(api, "resume", spider=SPIDER)
    assert effective("a:1") == effective("a:2") == "resume" and effective("other:1", "other") == "drain"
    assert effective("a:9") == "resume"  # a node that starts later obeys its spider's command
    log = api.get("/control/log").get_json()["log"]
    assert [e["command"] for e in log] == ["resume", "drain", "resume", "pause"]
    assert [e["id"] for e in log] == sorted((e["id"] for e in log), reverse=True)
    # Malformed values (a hand edit, a hostile writer) are skipped, never obeyed.
    redis_client.hset(monitor_contract.control_key("scrapy", "commands"), "all",
                      '{"id": 99, "command": "rm -rf", "at": 1}')
    redis_client.lpush(monitor_contract.control_key("scrapy", "log"), "not json")
    assert effective("a:1") == "resume" and len(api.get("/control/log").get_json()["log"]) == 4
    # A pruned node's own command goes with it.
    store(redis_client, snap("gone:1", age=100_000))
    send(api, "pause", node="gone:1")
    monitor_nodes.prune_nodes(redis_client, nodes(redis_client), 86400, "scrapy")
    assert not redis_client.hexists(monitor_contract.control_key("scrapy", "commands"), "node:gone:1")


def test_the_control_log_is_capped_in_redis(redis_client, redis_url):
    store(redis_client, snap("a:1"))
    for _ in range(monitor_acting.CONTROL_LOG_KEEP + 5):
        monitor_acting.issue_command(redis_client, "scrapy", "pause", "all")
    assert redis_client.llen(monitor_contract.control_key("scrapy", "log")) == monitor_acting.CONTROL_LOG_KEEP
    api = make_app(redis_url).test_client()
    log = api.get(f"/control/log?limit={monitor_acting.CONTROL_LOG_KEEP}").get_json()["log"]
    assert log[0]["id"] == monitor_acting.CONTROL_LOG_KEEP + 5 and len(log) == monitor_acting.CONTROL_LOG_KEEP


# ---------------------------------------------------------------------------- the dashboard

def test_dashboard_buttons_send_commands_confirm_stop_and_show_the_log(redis_server, redis_client, browser):
    publish(redis_client, snapshot("main_spider:a:1"), snapshot("main_spider:a:2", status="paused"),
            snapshot("main_spider:a:3", status="closed"), snapshot("<b>other</b>:x:1", spider="<b>other</b>"),
            stamp=True)
    server = ApiServer(redis_server.url).start()
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors, dialogs, posts = [], [], []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("request", lambda request: request.method == "POST" and posts.append(request.url))

        def on_dialog(dialog):
            dialogs.append(dialog.message)
            dialog.accept()

        page.on("dialog", on_dialog)
        page.goto(server.url + "/?interval=300")  # served by the API: its own origin may act without a token
        page.wait_for_function("() => document.querySelector('[data-node=\"main_spider:a:2\"]')"
                               "?.getAttribute('data-state') === 'paused'", timeout=WAIT)
        assert page.inner_text("#s-paused") == "1" and page.inner_text("#s-live") == "2"
        assert page.eval_on_selector("#f-state", "s => [...s.options].map(o => o.value)") == [
            "", "live", "paused", "stale", "closed"]
        group = page.locator("details.group[data-spider='main_spider']")
        assert "1 paused" in group.locator(".g-counts").inner_text()

        group.locator("button[data-command='stop']").click()
        page.wait_for_function("() => document.querySelector('#ctl-msg').textContent.includes('sent to 2 nodes')",
                               timeout=WAIT)
        assert dialogs == ["Stop 2 nodes of main_spider? "
                           "Nodes of main_spider that start later stop too, until a resume."]
        assert group.evaluate("g => g.open"), "a click on a header button must not fold the group"
        stored = {k.decode(): json.loads(v) for k, v in stored_commands(redis_client).items()}
        assert stored["spider:main_spider"]["command"] == "stop"
        assert stored["spider:main_spider"]["via"] == "no token: loopback, the API's own page"

        page.locator("[data-node='main_spider:a:1']").click()
        detail = page.locator("#d-ctl")
        detail.locator("button[data-command='pause']").click()  # no confirmation for a pause
        page.wait_for_function("() => document.querySelector('#ctl-msg').textContent.includes('sent to 1 node')",
                               timeout=WAIT)
        assert page.locator("#d-ctl-msg").is_visible()  # said in the detail view too, which covers the header
        assert "sent to 1 node" in page.inner_text("#d-ctl-msg")
        assert len(dialogs) == 1
        assert json.loads(stored_commands(redis_client)[b"node:main_spider:a:1"])["command"] == "pause"
        page.evaluate("() => { location.hash = 'node=' + encodeURIComponent('main_spider:a:3'); }")  # closed
        page.wait_for_function("() => document.querySelector('#d-ctl button').disabled", timeout=WAIT)
        page.keyboard.press("Escape")

        dialogs_before, posts_before = len(dialogs), len(posts)
        page.evaluate("() => { window.asked = 0; window.confirm = () => { window.asked++; return false; }; }")  # no
        page.locator("details.group[data-spider='<b>other</b>'] button[data-command='drain']").click()
        page.wait_for_function("() => window.asked === 1", timeout=WAIT)
        polls_after(page, 1)  # a POST the answer let through would have been sent before the next poll ended
        assert posts[posts_before:] == [] and len(dialogs) == dialogs_before
        assert b"spider:<b>other</b>" not in stored_commands(redis_client)

        page.click("#ctl-open")
        page.wait_for_function("() => document.querySelectorAll('#ctl-entries > li[data-id]').length === 2",
                               timeout=WAIT)
        texts = page.eval_on_selector_all("#ctl-entries > li", "lis => lis.map(li => li.innerText)")
        assert "pause \u2192 node:main_spider:a:1" in texts[0] and "stop \u2192 spider:main_spider" in texts[1]
        assert "127.0.0.1" in texts[0] and "sent to 1 node; applied by 0 nodes" in texts[0]
        # A node acknowledges: the open log shows it on its next refresh.
        first = json.loads(stored_commands(redis_client)[b"node:main_spider:a:1"])["id"]
        redis_client.hset(monitor_contract.control_ack_key("scrapy", first), "main_spider:a:1",
                          json.dumps({"at": time.time()}))
        page.wait_for_function("() => document.querySelector('#ctl-entries > li').innerText"
                               ".includes('sent to 1 node; applied by 1 node')", timeout=WAIT)
        assert not errors, errors

        # From a file without a token the buttons are disabled and say why.
        file_page = browser.new_page()
        file_page.goto(f"file://{quote(PAGE)}?api={quote(server.url, safe='')}&interval=300")
        file_page.wait_for_selector("details.group[data-spider='main_spider']", timeout=WAIT)
        button = file_page.locator("details.group[data-spider='main_spider'] button[data-command='pause']")
        assert button.is_disabled() and "origin null" in button.get_attribute("title")
        tokened = browser.new_page()
        tokened.goto(f"file://{quote(PAGE)}?api={quote(server.url, safe='')}&token=x&interval=300")
        tokened.wait_for_selector("details.group[data-spider='main_spider']", timeout=WAIT)
        # This API has no token, so it ignores ?token=x: the page asks /whoami, learns it is an anonymous viewer
        # from origin null, and disables the buttons with the API's reason (test_access_page: a known token).
        tokened.wait_for_function("() => document.querySelector('#who').getAttribute('data-role') === 'viewer'",
                                  timeout=WAIT)
        button = tokened.locator("details.group[data-spider='main_spider'] button[data-command='pause']")
        assert button.is_disabled() and "read only" in button.get_attribute("title")
        assert "origin 'null'" in button.get_attribute("title")
    finally:
        server.stop()
