"""The dashboard at 10,000 nodes (issue 22, section 2): the grid draws the cards on screen and near them, and pushed
changes reach the cards (section 1, the page's side). Headless Chromium against the real API and a private Redis.
"""

import json
from urllib.parse import quote

import psutil
import requests

from testbed import PAGE, EventReader, publish, snapshot, until

SPIDER = "big"
NODES = [f"{SPIDER}:crawler-{i:05d}:1" for i in range(10000)]


def card(page, node):
    return page.locator(f"[data-node={json.dumps(node)}]")


def subscriptions(client, pid):
    """How many of process ``pid``'s connections to the client's Redis are subscribed to a channel."""
    port = client.connection_pool.connection_kwargs["port"]
    mine = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.raddr and c.raddr.port == port}
    return sum(1 for c in client.client_list() if int(c["addr"].rpartition(":")[2]) in mine and int(c["sub"]) > 0)


def drawn(page):
    return page.evaluate("() => [...document.querySelectorAll('[data-node]')].map((e) => e.getAttribute('data-node'))")


def test_ten_thousand_nodes_draw_what_is_near_the_screen_and_scroll_and_search_find_the_last(api, redis_client,
                                                                                              open_page):
    publish(redis_client, *(snapshot(n, spider=SPIDER, cpu=float(i % 100)) for i, n in enumerate(NODES)))
    page = open_page(f"{api.url}/?interval=60000")
    until(page, "() => window.dashboardStats.nodes === 10000 && document.querySelector('[data-node]') !== null",
          timeout=60000)  # reading and sending 10,000 nodes takes the API a while on a busy machine
    first = drawn(page)
    assert 6 <= len(first) <= 600 and first == NODES[:len(first)]  # the top of the sorted grid, in order
    # Every card on the screen is drawn, and those near it: the drawn ones reach well below the fold (the grid
    # starts below the summary, alerts, cluster charts and Redis panel, so how many cards that is varies).
    assert page.evaluate("() => { const c = document.querySelectorAll('[data-node]'); "
                         "return c[c.length - 1].getBoundingClientRect().bottom >= 1.5 * innerHeight; }")
    assert page.evaluate("() => document.getElementsByTagName('*').length") < 60000
    assert page.text_content("#shown") == "10000 of 10000 nodes shown"
    assert page.text_content("#s-live") == "10,000"  # counts and filters see every node, drawn or not
    last = NODES[-1]
    assert card(page, last).count() == 0

    # Scrolling to the end brings the last cards in, and lets the first ones go.
    page.evaluate("() => window.scrollTo(0, document.documentElement.scrollHeight)")
    card(page, last).wait_for(state="visible")
    assert card(page, NODES[0]).count() == 0
    assert card(page, last).get_attribute("data-state") == "live"
    assert page.evaluate("() => document.getElementsByTagName('*').length") < 60000

    # Search finds it from the top, without scrolling.
    page.evaluate("() => window.scrollTo(0, 0)")
    page.fill("#f-q", "crawler-09999")
    until(page, "(id) => { const c = [...document.querySelectorAll('[data-node]')]; "
                "return c.length === 1 && c[0].getAttribute('data-node') === id; }", last)
    assert page.text_content("#shown") == "1 of 10000 nodes shown"
    assert page.evaluate("() => window.scrollY") == 0
    card(page, last).click()  # its detail view opens as from any card
    until(page, "(id) => location.hash.includes(encodeURIComponent(id))", last)


def test_the_page_shows_pushed_changes_live_and_falls_back_to_polling(api, redis_client, open_page):
    node = "live:h:1"
    publish(redis_client, snapshot(node, spider="live", pages=1), stamp=True)
    page = open_page(f"{api.url}/")  # polls every 30 s once live: only the stream can bring the change quickly
    until(page, "() => document.getElementById('live-mode').getAttribute('data-mode') === 'live'")
    assert page.text_content("#live-mode").startswith("live")
    card(page, node).wait_for()
    publish(redis_client, snapshot(node, spider="live", pages=777777, pages_per_min=4321.0), stamp=True)
    until(page, "(id) => { const c = document.querySelector(`[data-node='${id}'] [data-k='pages']`); "
                "return c && c.textContent.includes('777'); }", node, timeout=5000)
    # The summary and the spider's header follow within seconds too (their /spiders is reread every 5 s while
    # live), not only at the 30 s safety-net poll.
    until(page, "() => document.getElementById('s-ppm').textContent === '4,321'", timeout=12000)

    # Opened as a file with ?api=, it streams too (CORS: origin null), and a write reaches it by push.
    from_file = open_page(f"file://{quote(PAGE)}?api={api.url}")
    until(from_file, "() => document.getElementById('live-mode').getAttribute('data-mode') === 'live'")
    publish(redis_client, snapshot(node, spider="live", pages=888888), stamp=True)
    until(from_file, "(id) => { const c = document.querySelector(`[data-node='${id}'] [data-k='pages']`); "
                     "return c && c.textContent.includes('888'); }", node, timeout=5000)

    # A page that cannot stream polls, and says so.
    polling = open_page(f"{api.url}/?live=0&interval=300")
    until(polling, "() => document.getElementById('live-mode').textContent.includes('polling every 300 ms (?live=0)')")
    card(polling, node).wait_for()

    # The stream holds one subscription for every client (the API's, not one per page). Counted among the API
    # process's own connections: the session's Redis may hold other subscribers (an alerter, another API).
    stream = EventReader(api.url)
    stream.wait("hello")
    assert subscriptions(redis_client, api.proc.pid) == 1
    stream.close()
    assert requests.get(f"{api.url}/health", timeout=5).status_code == 200


def test_a_fling_asks_for_no_history_until_it_settles_then_the_cards_on_screen_get_theirs(api, redis_client,
                                                                                           open_page):
    nodes = [f"fling:crawler-{i:05d}:1" for i in range(2000)]
    publish(redis_client, *(snapshot(n, spider="fling") for n in nodes))
    page = open_page(f"{api.url}/?interval=60000")
    until(page, "() => window.dashboardStats.nodes === 2000 && window.dashboardStats.historyRequests > 0 "
                "&& window.dashboardStats.historyInFlight === 0", timeout=60000)
    # 60 frames of 120 px: some 150 cards pass the screen. Every history request the fling lets start must start
    # SCROLL_SETTLE (150 ms) after the scroll before it: only a frame that late (a loaded machine) lets one go.
    before, asked, early = page.evaluate("""async () => {
        const s = window.dashboardStats, before = s.historyRequests, scrolls = [];
        addEventListener("scroll", () => scrolls.push(performance.now()), { passive: true });
        performance.clearResourceTimings();
        performance.setResourceTimingBufferSize(10000);
        const t0 = performance.now();
        for (let i = 0; i < 60; i++) {
            window.scrollBy(0, 120);
            await new Promise((r) => requestAnimationFrame(r));
        }
        const starts = performance.getEntriesByType("resource")
            .filter((e) => e.name.includes("/history") && e.startTime >= t0).map((e) => e.startTime);
        const early = starts.filter((t) => t - scrolls.filter((x) => x <= t).pop() < 140);
        return [before, s.historyRequests - before, early.length];
    }""")
    assert early == 0, (asked, early)
    until(page, "(n) => window.dashboardStats.historyRequests > n", before + asked)  # settled: those now on screen
    assert page.evaluate("() => window.scrollY") > 5000
