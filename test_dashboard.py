"""dashboard.html in headless Chromium (Debian's package, driven by Playwright) against the real API
(``python monitor_api.py --port N``) and a private redis-server. Screenshots go to ``artifacts/``.
"""

import base64
import functools
import hashlib
import json
import os
import re
import time
from urllib.parse import quote

import requests

import monitor_contract
import testbed
from testbed import FAST, PAGE, ROOT, WAIT, XSS, polls_after, reporting, until
from testbed_servers import ApiServer, RedisServer, wait_for

ARTIFACTS = os.path.join(ROOT, "artifacts")
PREFIX = "scrapy"


# ---------------------------------------------------------------------------- servers and data

snapshot = testbed.snapshot
publish = functools.partial(testbed.publish, prefix=PREFIX, history_len=360)


# ---------------------------------------------------------------------------- the page (conftest: browser, open_page)

def cards(page):
    """{node id: state} of every card in the page."""
    return dict(page.evaluate("""() => [...document.querySelectorAll('[data-node]')]
        .map((e) => [e.getAttribute('data-node'), e.getAttribute('data-state')])"""))


def wait_cards(page, expected):
    # Entries, not an object: a node may be called "__proto__".
    until(page, """(want) => {
        const got = [...document.querySelectorAll('[data-node]')]
            .map((e) => [e.getAttribute('data-node'), e.getAttribute('data-state')]);
        return JSON.stringify(got.sort()) === JSON.stringify(want.sort());
    }""", [list(item) for item in expected.items()])


def card(page, node):
    return page.locator(f"[data-node={json.dumps(node, ensure_ascii=False)}]")  # a CSS string, quotes escaped


def shown_order(page, spider):
    return page.evaluate("""(spider) => [...document.querySelectorAll('details.group')]
        .filter((g) => g.getAttribute('data-spider') === spider)
        .flatMap((g) => [...g.querySelectorAll('[data-node]')])
        .filter((e) => !e.hidden).map((e) => e.getAttribute('data-node'))""", spider)


# ---------------------------------------------------------------------------- tests

def test_cards_match_nodes_and_states(api, redis_client, open_page):
    publish(redis_client,
            snapshot("main_spider:a:1", errors=3),
            snapshot("main_spider:b:2", cpu=91.0, memory=20.0),
            snapshot("main_spider:c:3", age=120),
            snapshot("other:d:4", spider="other", status="closed", queue_requests=None,
                     queue_start_urls=None, queue_dupefilter=None))
    page = open_page(f"{api.url}/?interval={FAST}")
    wait_cards(page, {"main_spider:a:1": "live", "main_spider:b:2": "live", "main_spider:c:3": "stale",
                      "other:d:4": "closed"})
    # Grouped by spider, groups in name order.
    assert page.evaluate("() => [...document.querySelectorAll('details.group')]"
                         ".map((g) => g.getAttribute('data-spider'))") == ["main_spider", "other"]
    assert shown_order(page, "other") == ["other:d:4"]
    # Summary bar: states, cluster rates (live nodes only), queue depth per spider.
    assert [page.text_content(f"#s-{k}") for k in ("live", "stale", "closed", "ppm", "ipm")] == \
        ["2", "1", "1", "240", "120"]
    assert page.text_content('[data-queue="main_spider"] .n') == "4,321"
    assert page.text_content('[data-queue="other"] .n') == "\u2013"
    # One card in human units.
    a = card(page, "main_spider:a:1")
    text = " ".join(a.inner_text().split())
    for part in ("main_spider:a:1", "LIVE", "worker-1 \u00b7 pid 4242"):
        assert part in text, (part, text)
    assert re.search(r"last seen (just now|\d+ s ago)", text), text
    values = dict(zip(a.locator(".m").evaluate_all("(ms) => ms.map((m) => m.getAttribute('data-label'))"),
                      a.locator(".m").all_text_contents()))
    assert values == {"CPU": "37.5%", "Memory": "61.2%", "RSS": "150 MiB", "Proc CPU": "12.5%",
                      "Net out": "1.2 KiB/s", "Net in": "2.5 MiB/s", "Pages": "12,345", "Pages/min": "120",
                      "Items": "6,789", "Items/min": "60", "Errors": "3", "Requests": "13,000"}
    assert "last seen 2 min ago" in card(page, "main_spider:c:3").inner_text()
    assert a.locator('[data-k="errors"][data-bad]').count() == 1
    # CPU 91 % is over the alerter's threshold (GET /alerts settings; the defaults: 80), once /alerts answered.
    until(page, """() => !!document.querySelector('[data-node="main_spider:b:2"] [data-k="cpu"][data-bad]')""")

    # Filters: spider, then state.
    page.select_option("#f-spider", "other")
    assert shown_order(page, "main_spider") == [] and shown_order(page, "other") == ["other:d:4"]
    page.select_option("#f-spider", "")
    page.select_option("#f-state", "live")
    assert shown_order(page, "main_spider") == ["main_spider:a:1", "main_spider:b:2"]
    assert page.is_hidden('details.group[data-spider="other"]')
    page.select_option("#f-state", "")
    # Sort by any column: CPU descending from the select, then memory from the table view's header.
    page.select_option("#f-sort", "cpu")
    page.click("#f-dir")
    assert shown_order(page, "main_spider")[0] == "main_spider:b:2"
    page.click("#f-view")
    page.click('#colhead button:text-is("Memory")')  # first click on a number column: largest first
    assert shown_order(page, "main_spider") == ["main_spider:a:1", "main_spider:c:3", "main_spider:b:2"]
    page.click('#colhead button:text-is("Memory")')
    assert shown_order(page, "main_spider") == ["main_spider:b:2", "main_spider:a:1", "main_spider:c:3"]
    # The view is in the fragment: a reload keeps it.
    assert "sort=memory" in page.url and "view=table" in page.url
    page.reload()
    until(page, "() => document.querySelectorAll('[data-node]').length === 4")
    assert shown_order(page, "main_spider") == ["main_spider:b:2", "main_spider:a:1", "main_spider:c:3"]
    assert page.evaluate("() => document.body.classList.contains('view-table')")


def test_node_that_stops_reporting_turns_stale(api, redis_client, open_page):
    # Both report (Redis stamps each write) on threads of their own, so a browser slow to answer on a loaded
    # machine cannot make busy:2 miss its 1 s interval, nor quiet:1 stale before the page first shows it live.
    def report(node):
        return lambda: publish(redis_client, snapshot(node, interval=1), stamp=True)

    with reporting(report("busy:2")):
        with reporting(report("quiet:1")):
            page = open_page(f"{api.url}/?interval={FAST}")
            wait_cards(page, {"quiet:1": "live", "busy:2": "live"})
            page.evaluate("() => { document.querySelector('[data-node=\"quiet:1\"]').__mark = 1; }")
        # quiet:1 falls silent; busy:2 goes on reporting.
        until(page, "() => document.querySelector('[data-node=\"quiet:1\"]').getAttribute('data-state') === 'stale'")
        assert card(page, "busy:2").get_attribute("data-state") == "live"
        assert card(page, "quiet:1").locator(".badge").inner_text().lower() == "stale"
        assert page.text_content("#s-stale") == "1"
        # Updated in place: the same element, not a new one.
        assert page.evaluate("() => document.querySelector('[data-node=\"quiet:1\"]').__mark") == 1
        # It reports again: live again.
        report("quiet:1")()
        until(page, "() => document.querySelector('[data-node=\"quiet:1\"]').getAttribute('data-state') === 'live'")


def test_hostile_names_show_as_text_and_nothing_runs(api, redis_client, open_page):
    slashed = 'evil/../"quoted" \u2713 ?x=1#frag'
    publish(redis_client,
            snapshot(XSS, spider="<script>window.__xss=2</script>", host='<svg onload="window.__xss=3">'),
            snapshot(slashed, spider='<iframe src="javascript:window.__xss=4">'),
            history=30)
    # Without the page's Content-Security-Policy: the code alone must keep the payload inert.
    page = open_page(f"{api.url}/?interval={FAST}", bypass_csp=True)
    wait_cards(page, {XSS: "live", slashed: "live"})
    polls_after(page, 2)
    assert page.evaluate("() => window.__xss") is None
    assert page.evaluate("() => document.querySelectorAll('img, iframe, [onerror], [onload]').length") == 0
    assert page.evaluate("() => document.scripts.length") == 1
    assert card(page, XSS).locator(".c-name").inner_text() == XSS
    assert '<svg onload="window.__xss=3">' in card(page, XSS).locator(".c-host").inner_text()
    assert page.locator(".g-name").all_inner_texts() == ['<iframe src="javascript:window.__xss=4">',
                                                         "<script>window.__xss=2</script>"]
    # History requests encode the ids: both sparklines load, and so does the detail view.
    for node in (XSS, slashed):
        until(page, """(node) => [...document.querySelectorAll('[data-node]')]
            .find((e) => e.getAttribute('data-node') === node)
            .querySelectorAll('.sp path[d^="M"]').length === 3""", node)
    page.evaluate("(n) => [...document.querySelectorAll('[data-node]')]"
                  ".find((e) => e.getAttribute('data-node') === n).click()", slashed)
    assert page.inner_text("#d-title") == slashed
    until(page, "() => document.querySelector('#d-hour .chart path').getAttribute('d').startsWith('M')")
    assert page.evaluate("() => window.__xss") is None


def test_api_down_banner_appears_and_clears(redis_server, redis_client, open_page, servers):
    publish(redis_client, snapshot("main_spider:a:1"), snapshot("main_spider:b:2"))
    server = servers(ApiServer(redis_server.url))
    page = open_page(f"{server.url}/?interval={FAST}")
    wait_cards(page, {"main_spider:a:1": "live", "main_spider:b:2": "live"})
    assert page.is_hidden("#banner")

    server.stop()  # the API goes away: banner, last data kept
    page.wait_for_selector("#banner", state="visible", timeout=WAIT)
    assert "Cannot reach the API" in page.inner_text("#banner")
    assert "Showing data from" in page.inner_text("#banner")
    assert cards(page) == {"main_spider:a:1": "live", "main_spider:b:2": "live"}
    publish(redis_client, snapshot("main_spider:c:3"))
    server.start()  # back on the same port: the page recovers by itself
    page.wait_for_selector("#banner", state="hidden", timeout=WAIT)
    wait_cards(page, {"main_spider:a:1": "live", "main_spider:b:2": "live", "main_spider:c:3": "live"})

    # Redis down behind a running API: a 503, shown as such, and recovery.
    own = servers(RedisServer())
    behind = servers(ApiServer(own.url))
    publish(own.client(), snapshot("solo:1"))
    page2 = open_page(f"{behind.url}/?interval={FAST}")
    wait_cards(page2, {"solo:1": "live"})
    own.stop()
    page2.wait_for_selector("#banner", state="visible", timeout=WAIT)
    assert "HTTP 503" in page2.inner_text("#banner")
    assert cards(page2) == {"solo:1": "live"}
    own.start()
    publish(own.client(), snapshot("solo:1"))
    page2.wait_for_selector("#banner", state="hidden", timeout=WAIT)
    wait_cards(page2, {"solo:1": "live"})


# Writing a card's name that holds this marker throws, as a bug in the page's own rendering would. The
# fault comes from outside the page (Playwright patches the DOM before the page's script runs) and is set
# off by data, so the page needs no test hook.
BOMB = "render-bomb"
BREAK_DRAWING = """(() => {
    const text = Object.getOwnPropertyDescriptor(Node.prototype, "textContent");
    Object.defineProperty(Node.prototype, "textContent", { ...text, set(v) {
        if (this.classList && this.classList.contains("c-name") && String(v).includes("%s"))
            throw new TypeError("cannot draw " + v);
        text.set.call(this, v);
    } });
})();""" % BOMB


def banner_is(page, kind):
    until(page, "(kind) => { const b = document.querySelector('#banner'); "
                "return !b.hidden && b.getAttribute('data-kind') === kind; }", kind)
    return page.inner_text("#banner")


def test_render_error_is_not_reported_as_api_down(open_page, servers):
    own = servers(RedisServer())
    server = servers(ApiServer(own.url))
    client = own.client()
    publish(client, snapshot("main_spider:a:1"))
    page = open_page(f"{server.url}/?interval={FAST}", init_script=BREAK_DRAWING)
    wait_cards(page, {"main_spider:a:1": "live"})
    assert page.is_hidden("#banner")

    # A node the page fails to draw: a display error, not "cannot reach the API", and the rest stays live.
    bomb = f"main_spider:{BOMB}:2"
    publish(client, snapshot(bomb))
    banner = banner_is(page, "display")
    assert banner.startswith(f"Display error: TypeError: cannot draw {bomb}"), banner
    assert "reach" not in banner and "HTTP" not in banner and "unavailable" not in banner, banner
    assert page.get_attribute("#conn", "data-ok") == "yes"
    publish(client, snapshot("main_spider:a:1", cpu=77.0))
    until(page, "() => document.querySelector('[data-node=\"main_spider:a:1\"]').innerText.includes('77.0%')")
    assert page.text_content("#s-live") == "2"  # the summary counts the data: the node is live, drawn or not
    logged = [text for kind, text in page.console_lines if kind == "error" and "cannot draw" in text]
    assert logged and "\n    at " in logged[0], page.console_lines  # with its stack
    stats = page.evaluate("() => window.dashboardStats")
    assert stats["displayErrors"] >= 1 and stats["failedPolls"] == 0, stats
    # The node goes: the next poll renders, and the message clears by itself.
    client.hdel(f"{PREFIX}:node:status", bomb)
    client.hdel(monitor_contract.slim_key(PREFIX), bomb)  # list views read the slim hash
    monitor_contract.notify(client, PREFIX, "node", bomb)  # as pruning does: streams tell pages the node is gone
    page.wait_for_selector("#banner", state="hidden", timeout=WAIT)
    assert cards(page) == {"main_spider:a:1": "live"}

    # Redis stops behind the running API: the API banner, with the status and the API's own words.
    own.stop()
    replies = []
    wait_for(lambda: replies.append(requests.get(server.url + "/metrics", timeout=5)) or replies[-1].status_code == 503,
             15, what="the API to answer 503")  # after its cached answer expires
    reply = replies[-1]
    banner = banner_is(page, "api")
    assert f"HTTP 503: {reply.json()['error']}" in banner and "Display error" not in banner, banner
    assert page.get_attribute("#conn", "data-ok") == "no"
    own.start()
    publish(own.client(), snapshot("main_spider:a:1"))
    page.wait_for_selector("#banner", state="hidden", timeout=WAIT)
    assert page.get_attribute("#conn", "data-ok") == "yes"


# Names an object inherits from Object.prototype: as node ids, spider names and snapshot fields.
PROTO_NAMES = ["__proto__", "constructor", "toString", "hasOwnProperty", "valueOf"]


def test_prototype_names_are_ordinary_nodes_spiders_and_fields(api, redis_client, open_page):
    fields = {"__proto__": {"polluted": "yes"}, "constructor": "built", "toString": 7, "hasOwnProperty": None,
              "valueOf": [1, 2]}
    # Each name is a node and the spider of the next node; "valueOf" has closed.
    odd = [snapshot(name, spider=PROTO_NAMES[(i + 1) % 5], status="closed" if name == "valueOf" else "running",
                    queue_requests=100 + i, **fields) for i, name in enumerate(PROTO_NAMES)]
    publish(redis_client, *odd, snapshot("main_spider:a:1"), snapshot("main_spider:b:2"))
    # The shared API may serve the previous test's /metrics for up to its one-second cache.
    wait_for(lambda: '"__proto__":{"polluted":"yes"}' in requests.get(api.url + "/metrics", timeout=5).text, 5,
             what="the API to serve the new snapshots")
    page = open_page(f"{api.url}/?interval={FAST}")
    expected = {**{n: "live" for n in PROTO_NAMES}, "valueOf": "closed", "main_spider:a:1": "live",
                "main_spider:b:2": "live"}
    wait_cards(page, expected)
    polls_after(page, 2)
    assert cards(page) == expected
    assert [page.text_content(f"#s-{k}") for k in ("live", "stale", "closed", "ppm", "ipm")] == \
        ["6", "0", "1", "720", "360"]
    groups = page.evaluate("""() => [...document.querySelectorAll('details.group')].map((g) => [
        g.getAttribute('data-spider'), g.querySelector('.g-counts').textContent,
        [...g.querySelectorAll('[data-node]')].map((e) => e.getAttribute('data-node'))])""")
    assert sorted(groups) == sorted([
        ["__proto__", "0 live \u00b7 0 stale \u00b7 1 closed", ["valueOf"]],
        ["constructor", "1 live \u00b7 0 stale \u00b7 0 closed", ["__proto__"]],
        ["toString", "1 live \u00b7 0 stale \u00b7 0 closed", ["constructor"]],
        ["hasOwnProperty", "1 live \u00b7 0 stale \u00b7 0 closed", ["toString"]],
        ["valueOf", "1 live \u00b7 0 stale \u00b7 0 closed", ["hasOwnProperty"]],
        ["main_spider", "2 live \u00b7 0 stale \u00b7 0 closed", ["main_spider:a:1", "main_spider:b:2"]]])
    queues = page.evaluate("() => [...document.querySelectorAll('[data-queue]')]"
                           ".map((q) => [q.getAttribute('data-queue'), q.querySelector('.n').textContent])")
    assert sorted(queues) == sorted([["constructor", "100"], ["toString", "101"], ["hasOwnProperty", "102"],
                                     ["valueOf", "103"], ["__proto__", "104"], ["main_spider", "4,321"]])
    assert sorted(page.eval_on_selector_all("#f-spider option", "(os) => os.map((o) => o.value)")) == \
        sorted(["", "main_spider", *PROTO_NAMES])
    page.select_option("#f-spider", "__proto__")
    assert shown_order(page, "__proto__") == ["valueOf"] and shown_order(page, "main_spider") == []
    page.select_option("#f-spider", "")

    # The detail view lists the odd fields as fields, and drops one the node no longer sends.
    card(page, "__proto__").click()
    assert page.inner_text("#d-title") == "__proto__"

    def rows():
        return dict(page.evaluate("() => [...document.querySelectorAll('#d-fields tr')]"
                                  ".map((r) => [r.cells[0].textContent, r.cells[1].textContent])"))

    got = rows()
    assert {k: got.get(k) for k in fields} == {"__proto__": '{"polluted":"yes"}', "constructor": "built",
                                               "toString": "7", "hasOwnProperty": "", "valueOf": "[1,2]"}, got
    fewer = dict(odd[0])
    del fewer["toString"]
    publish(redis_client, dict(fewer, cpu=55.0))
    until(page, "() => document.querySelector('#d-fields').innerText.includes('55.0%')")
    got = rows()
    assert "toString" not in got and got["constructor"] == "built" and got["__proto__"] == '{"polluted":"yes"}'
    assert page.evaluate("() => [({}).polluted, typeof ({}).toString, window.dashboardStats.displayErrors]") == \
        [None, "function", 0]
    assert page.is_hidden("#banner")


def test_last_seen_comes_from_the_api_not_the_clocks(redis_server, redis_client, open_page, servers):
    """Nodes whose clocks are five minutes behind or ahead, reporting now, are live and "last seen" a few
    seconds ago; silent, they turn stale within three intervals, and "last seen" moves on from there."""
    server = servers(ApiServer(redis_server.url))
    offsets = {"main_spider:behind:1": -300, "main_spider:ahead:2": 300, "main_spider:true:3": 0}
    interval = 2

    def report(*names):  # each stamps `timestamp` with its own clock, Redis the time of the write with its
        publish(redis_client, *[snapshot(n, age=-offsets[n], interval=interval) for n in names], stamp=True)
        return time.monotonic()

    def seen(node):
        text = card(page, node).locator(".c-seen").inner_text()
        m = re.fullmatch(r"last seen (just now|(\d+) s ago)", text)
        assert m, (node, text)
        return int(m.group(2) or 0)

    # Reports go on in threads while the test reads the page: a browser slow to answer on a loaded machine
    # cannot make a reporting node miss its intervals.
    with reporting(lambda: report(*offsets), every=0.3):
        page = open_page(f"{server.url}/?interval={FAST}")
        wait_cards(page, {n: "live" for n in offsets})
        for node in offsets:
            assert seen(node) < 2 * interval + 2, node
        card(page, "main_spider:behind:1").click()
        assert re.search(r"last seen (just now|\d s ago)", page.inner_text("#d-sub")), page.inner_text("#d-sub")
        page.keyboard.press("Escape")

    # Two fall silent; "true" goes on reporting.
    last = report(*offsets)
    silent = ["main_spider:behind:1", "main_spider:ahead:2"]
    with reporting(lambda: report("main_spider:true:3")):
        until(page, """(silent) => silent.every((n) =>
            document.querySelector(`[data-node="${n}"]`).getAttribute('data-state') === 'stale')""", silent,
              timeout=(3 * interval + 6) * 1000)
        assert card(page, "main_spider:true:3").get_attribute("data-state") == "live"
    assert time.monotonic() - last > 3 * interval - 1, "stale before three intervals"
    before = {n: seen(n) for n in silent}
    # "last seen" counts from the answer's arrival (its ages were computed at the API before): an answer slowed
    # by a loaded machine reads up to its delay younger (CI once saw 4 s here). Clocks 300 s off read far apart.
    assert all(3 * interval - 3 <= s < 3 * interval + 8 for s in before.values()), before

    # The API goes away: the last data stays, and its "last seen" ages on from the API's age.
    server.stop()
    banner_is(page, "api")
    time.sleep(2.5)  # not a wait for an event: "last seen" must age by the clock, and it takes the time it takes
    polls_after_failure = page.evaluate("() => window.dashboardStats.failedPolls")
    until(page, "(n) => window.dashboardStats.failedPolls > n", polls_after_failure)
    for n in silent:
        assert before[n] + 2 <= seen(n) < before[n] + 20, (n, before[n], seen(n))


def test_file_mode_with_api_and_token(redis_server, redis_client, open_page, servers):
    publish(redis_client, snapshot("main_spider:a:1"))
    server = servers(ApiServer(redis_server.url, MONITOR_API_TOKEN="s3cret+t0ken/="))
    base = f"file://{quote(PAGE)}"
    api = quote(server.url, safe="")
    page = open_page(f"{base}?api={api}&token={quote('s3cret+t0ken/=', safe='')}&interval={FAST}")
    wait_cards(page, {"main_spider:a:1": "live"})  # CORS for origin null, Bearer token through a preflight
    assert page.is_hidden("#banner")
    wrong = open_page(f"{base}?api={api}&interval={FAST}")
    wrong.wait_for_selector("#banner", state="visible", timeout=WAIT)
    assert "HTTP 401" in wrong.inner_text("#banner") and "?token=" in wrong.inner_text("#banner")
    assert cards(wrong) == {}
    # Without ?api= a file talks to localhost:5000.
    default = open_page(f"{base}?interval=60000")
    assert default.evaluate("() => window.dashboardStats.api") == "http://localhost:5000"
    bad = open_page(f"{base}?api=javascript:alert(1)")
    bad.wait_for_selector("#banner", state="visible", timeout=WAIT)
    assert "?api= must be an http" in bad.inner_text("#banner")
    bad = open_page(f"{base}?api={api}&token=t%C3%B6ken")
    bad.wait_for_selector("#banner", state="visible", timeout=WAIT)
    assert "?token= must be printable ASCII" in bad.inner_text("#banner")


def test_thousand_nodes_render_within_a_second(api, redis_client, open_page):
    spiders = [f"spider_{i}" for i in range(4)]
    snaps = [snapshot(f"{spiders[i % 4]}:host-{i:04d}:{1000 + i}", spider=spiders[i % 4],
                      cpu=float(i % 100), age=100 if i % 10 == 0 else 0) for i in range(1000)]
    publish(redis_client, *snaps)
    page = open_page(f"{api.url}/?interval=1000")
    until(page, "() => window.dashboardStats.firstPaintMs !== null && window.dashboardStats.nodes === 1000 "
                "&& document.querySelectorAll('[data-node]').length > 0")
    # Past 500 nodes the grid draws what is on screen and near it (test_grid.py scrolls and searches 10,000).
    assert page.evaluate("() => document.querySelectorAll('[data-node]').length") < 1000
    first, script = page.evaluate("() => [window.dashboardStats.firstPaintMs, window.dashboardStats.firstRenderMs]")
    polls_after(page, 2)
    update = page.evaluate("() => [window.dashboardStats.renderMs, window.dashboardStats.paintMs]")
    print(f"\n1,000 nodes: first render {first:.0f} ms from data arrival to painted cards ({script:.0f} ms of it "
          f"script; goal <= 1000 ms); an update poll {update[0]:.0f} ms of script, {update[1]:.0f} ms to paint")
    assert first <= 1000
    assert page.text_content("#s-live") == "900" and page.text_content("#s-stale") == "100"
    # Sparklines only for what is on screen: a few history requests, never 1,000, at most 3 at once.
    stats = page.evaluate("() => window.dashboardStats")
    print(f"history requests after {stats['okPolls']} polls: {stats['historyRequests']}, "
          f"at most {stats['historyMaxInFlight']} at once")
    assert 0 < stats["historyRequests"] <= 60
    assert stats["historyMaxInFlight"] <= 3


def test_detail_view_survives_updates(api, redis_client, open_page):
    nodes = [snapshot(f"main_spider:w{i:02d}:{i}", cpu=10.0 + i) for i in range(24)]
    publish(redis_client, *nodes, history=60)
    page = open_page(f"{api.url}/?interval={FAST}", viewport={"width": 1280, "height": 700})
    until(page, "() => document.querySelectorAll('[data-node]').length === 24")
    target = "main_spider:w20:20"
    page.evaluate("(n) => { const e = document.querySelector(`[data-node='${n}']`); e.__mark = 1; }", target)
    card(page, target).scroll_into_view_if_needed()
    card(page, target).click()
    assert page.is_visible("#detail") and page.inner_text("#d-title") == target
    assert f"node={quote(target, safe='')}" in page.url
    for chart in ("#d-hour", "#d-day"):
        until(page, "(sel) => [...document.querySelectorAll(sel + ' .chart path')]"
                    ".some((p) => (p.getAttribute('d') || '').startsWith('M'))", chart)
    assert "150 MiB (157286400)" in page.inner_text("#d-fields")
    scroll = page.evaluate("() => window.scrollY")
    assert scroll > 0
    publish(redis_client, snapshot(target, cpu=77.0))
    until(page, "() => document.querySelector('#d-fields').innerText.includes('77.0%')")
    polls_after(page, 3)
    assert page.is_visible("#detail")
    assert abs(page.evaluate("() => window.scrollY") - scroll) <= 2  # stays put (a sub-pixel layout may round)
    assert page.evaluate("(n) => document.querySelector(`[data-node='${n}']`).__mark", target) == 1
    assert "77.0%" in card(page, target).inner_text()
    page.keyboard.press("Escape")
    assert page.is_hidden("#detail") and "node=" not in page.url


def test_memory_stays_flat_while_nodes_come_and_go(api, redis_client, open_page):
    """A quick guard; bench/dashboard.py measures 1,000 nodes over 200 refreshes."""
    publish(redis_client, *[snapshot(f"main_spider:w{i:03d}:{i}") for i in range(100)], history=5)
    churn = [0]

    def round_():  # every node reports again; five churn nodes (far down the page) are replaced
        n = churn[0]
        with redis_client.pipeline(transaction=True) as pipe:
            pipe.hdel(f"{PREFIX}:node:status", *[f"zz_churn:c{i}:1" for i in range(n - 5, n)])
            pipe.hdel(monitor_contract.slim_key(PREFIX), *[f"zz_churn:c{i}:1" for i in range(n - 5, n)])
            for i in range(n - 5, n):  # as pruning does: streams tell pages the node is gone
                monitor_contract.notify(pipe, PREFIX, "node", f"zz_churn:c{i}:1")
            for snap in [snapshot(f"main_spider:w{i:03d}:{i}", cpu=float((i + n) % 100), pages=n * 100 + i)
                         for i in range(100)] + [snapshot(f"zz_churn:c{i}:1", spider="zz_churn")
                                                 for i in range(n, n + 5)]:
                monitor_contract.write_snapshot(pipe, PREFIX, snap, 360)
            pipe.execute()
        churn[0] += 5

    round_()
    page = open_page(f"{api.url}/?interval=150", viewport={"width": 1000, "height": 600})
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")

    def measure():
        # Sparklines still loading would count as growth: let the history requests settle first. And the cards
        # too: a poll answered from the API's cache (up to a second old) can show the five churn nodes just
        # removed beside the five pushed in their place (110) until the next fresh answer. A leak stays, a
        # card's elements held for a moment (a busy machine once showed the five removed cards' 200 elements)
        # do not: the least of three polls' readings.
        readings = []
        for _ in range(3):
            polls_after(page, 1)
            until(page, "() => window.dashboardStats.historyInFlight === 0 && window.dashboardStats.nodes === 105")
            cdp.send("HeapProfiler.collectGarbage")
            metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
            readings.append((cdp.send("Runtime.getHeapUsage")["usedSize"], int(metrics["Nodes"])))
        return min(r[0] for r in readings), min(r[1] for r in readings)

    def refreshes(n):
        for _ in range(n):
            round_()
            polls_after(page, 1)

    refreshes(10)
    heap0, dom0 = measure()
    refreshes(40)
    heap1, dom1 = measure()
    print(f"\n40 refreshes, 200 cards created and removed: JS heap {heap0 / 2**20:.2f} -> {heap1 / 2**20:.2f} MB, "
          f"DOM nodes {dom0} -> {dom1}")
    assert abs(dom1 - dom0) <= 20
    assert heap1 - heap0 < 512 * 1024


def test_screenshots_light_and_dark(api, redis_client, open_page):
    os.makedirs(ARTIFACTS, exist_ok=True)
    publish(redis_client,
            *[snapshot(f"main_spider:crawler-{i}:{100 + i}", cpu=15.0 + 9 * i, memory=40.0 + 4 * i,
                       errors=i % 3, rss=(120 + 30 * i) * 2 ** 20) for i in range(6)],
            snapshot("main_spider:crawler-9:109", age=300),
            snapshot("news:box-1:7", spider="news", status="closed", queue_requests=None,
                     queue_start_urls=None, queue_dupefilter=None),
            history=90)
    backgrounds = {}
    for scheme in ("light", "dark"):
        page = open_page(f"{api.url}/?interval=1000", color_scheme=scheme, viewport={"width": 1400, "height": 900})
        until(page, "() => document.querySelectorAll('.sp path[d^=\"M\"]').length >= 18")
        backgrounds[scheme] = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        page.screenshot(path=os.path.join(ARTIFACTS, f"dashboard-{scheme}.png"), full_page=True)
        card(page, "main_spider:crawler-3:103").click()
        until(page, "() => [...document.querySelectorAll('#d-day .chart path')]"
                    ".some((p) => (p.getAttribute('d') || '').startsWith('M'))")
        page.screenshot(path=os.path.join(ARTIFACTS, f"dashboard-detail-{scheme}.png"))
    assert backgrounds["light"] != backgrounds["dark"]
    for name in ("dashboard-light", "dashboard-dark", "dashboard-detail-light", "dashboard-detail-dark"):
        assert os.path.getsize(os.path.join(ARTIFACTS, name + ".png")) > 10_000


def test_page_is_self_contained_and_its_csp_admits_its_script():
    html = open(PAGE, encoding="utf-8").read()
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", html, re.S)
    assert len(scripts) == 1 and "<script>" in html, "one inline script, no src"
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in html, (
        f"the script changed: set script-src 'sha256-{digest}' in the Content-Security-Policy meta tag")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "no CDN or remote resource"
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in html, f"{sink} must not be used: data goes in with textContent/createElement"


def test_thresholds_and_ok_reasons_come_from_the_alerts_settings(api, redis_client, open_page):
    """The CPU and memory colours and the runs view's bad runs follow GET /alerts "settings": the running
    alerter's (CPU over 50 %, memory rule off, closespider_* an OK finish), then the defaults once no alerter
    runs (CPU over 80 %, memory over 90 %, closespider_* not listed). Without settings nothing is coloured."""
    publish(redis_client, snapshot("main_spider:hot:1", cpu=60.0, memory=95.0))
    for i, reason in enumerate(["finished", "closespider_timeout", "memusage_exceeded"]):
        begin = 1_000_000 + 100 * i
        monitor_contract.write_run(redis_client, PREFIX, monitor_contract.run_record(
            {"node": f"n{begin}", "spider": "main_spider", "host": "h", "pid": i, "start_time": begin,
             "timestamp": begin + 60, "items": 100, "pages": 100, "errors": 0, "finish_reason": reason,
             "status": "closed", "peak_rss": 1000}), begin, 1000)
    heartbeat = monitor_contract.alert_key(PREFIX, "heartbeat")
    redis_client.set(heartbeat, json.dumps({
        "at": time.time(), "interval": 60, "who": "test", "settings": {
            "thresholds": {"cpu": 50, "memory": 0, "stalled": 300, "errors": 30, "rss": 2048, "coverage": 90,
                           "latency": 10, "queue": 1800},
            "ok_reasons": ["finished", "shutdown", "stopped", "drained", "closespider_*"], "run_items_ratio": 0.5}}))
    bad = """([node, key]) =>
        !!document.querySelector(`[data-node=${JSON.stringify(node)}] [data-k=${key}][data-bad]`)"""
    runs_bad = """() => [...document.querySelectorAll('#r-rows tr')]
        .map((t) => [t.children[2].textContent, t.hasAttribute('data-bad')])"""

    page = open_page(f"{api.url}/?interval={FAST}#runs=main_spider")
    until(page, "() => document.querySelectorAll('#r-rows tr').length === 3")
    until(page, bad, ["main_spider:hot:1", "cpu"])  # 60 > 50
    assert not page.evaluate(bad, ["main_spider:hot:1", "memory"])  # the memory rule is off
    until(page, "() => document.querySelector('#r-bad').textContent === '1 of the last 3 runs bad'")
    assert dict(page.evaluate(runs_bad)) == {"memusage_exceeded": True, "closespider_timeout": False, "finished": False}

    redis_client.delete(heartbeat)  # no alerter: the API's defaults
    until(page, f"() => !({bad})(['main_spider:hot:1', 'cpu'])")  # 60 is not over 80
    until(page, bad, ["main_spider:hot:1", "memory"])  # 95 > 90
    until(page, "() => document.querySelector('#r-bad').textContent === '2 of the last 3 runs bad'")
    assert dict(page.evaluate(runs_bad)) == {"memusage_exceeded": True, "closespider_timeout": True, "finished": False}

    # An API whose /alerts sends no settings (here: none at all): no threshold marks anything; a lost run
    # would still be bad, an unlisted finish reason is not judged.
    no_alerts = """(() => { const f = window.fetch; window.fetch = (url, init) => String(url).endsWith('/alerts')
        ? Promise.resolve(new Response('{"error": "not found"}', { status: 404 })) : f(url, init); })();"""
    blind = open_page(f"{api.url}/?interval={FAST}#runs=main_spider", init_script=no_alerts)
    until(blind, "() => document.querySelectorAll('#r-rows tr').length === 3")
    polls_after(blind, 2)
    assert not blind.evaluate(bad, ["main_spider:hot:1", "cpu"])
    assert not blind.evaluate(bad, ["main_spider:hot:1", "memory"])
    assert blind.text_content("#r-bad") == "0 of the last 3 runs bad" and blind.is_hidden("#alerts")


def test_a_range_holding_one_reading_draws_it(api, redis_client, open_page):
    node = "main_spider:lone:1"
    publish(redis_client, snapshot(node, cpu=42.0))  # its first report: one history row, one point in the hour
    page = open_page(f"{api.url}/?interval={FAST}#node={quote(node, safe='')}")
    until(page, "() => [...document.querySelectorAll('#d-hour .chart path')]"  # a short dash back from it
                ".some((p) => /^M[\\d.]+ [\\d.]+h-3$/.test(p.getAttribute('d') || ''))")
    assert page.evaluate("() => document.querySelector('#d-hour .chart').getAttribute('data-empty')") == "no"
