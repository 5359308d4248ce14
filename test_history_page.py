"""The runs view's spider history in headless Chromium (issue 21): the 1 h / 24 h / 7 d / 90 d range selector,
version markers drawn as labelled lines (text, never markup), and the Download CSV link."""

import requests

import monitor_contract
import testbed
from testbed import FAST, XSS, until

HOSTILE_VERSION = XSS + "2.4"


def test_range_selector_markers_and_csv_link(api, redis_client, open_page):
    now = monitor_contract.redis_now(redis_client.time())
    previous = {}
    with redis_client.pipeline(transaction=False) as pipe:
        for days_ago in (40, 20, 3, 1):  # hourly buckets only the 90-day range reaches, and some the week does
            at = now - days_ago * 86400
            snap = testbed.snapshot("main_spider:h:1", now=at, pages=1000 * (50 - days_ago))
            previous = monitor_contract.write_snapshot(pipe, "scrapy", snap, 10, rollup=(at, previous))
        monitor_contract.write_marker(pipe, "scrapy", "main_spider", "2.3", now - 30 * 86400, "a")
        monitor_contract.write_marker(pipe, "scrapy", "main_spider", HOSTILE_VERSION, now - 2 * 86400, "b")
        pipe.execute()
    testbed.publish(redis_client, testbed.snapshot("main_spider:h:1"), history_len=10)
    for i, items in enumerate((100, 100, 100, 50)):  # the last run: half its version's usual items
        begin = 1_000_000 + 100 * i
        monitor_contract.write_run(redis_client, "scrapy", monitor_contract.run_record(
            {"node": f"n{i}", "spider": "main_spider", "start_time": begin, "timestamp": begin + 60, "items": items,
             "pages": 100, "finish_reason": "finished", "status": "closed", "version": "2.4", "args_hash": "a"}),
            begin, 1000)

    page = open_page(f"{api.url}/?interval={FAST}#runs=main_spider")
    labels = "() => [...document.querySelectorAll('#h-charts .chart:first-child .ch-mark')].map((e) => e.textContent)"
    drawn = "() => document.querySelector('#h-charts .chart:first-child path.s0').getAttribute('d') || ''"
    until(page, "() => document.querySelectorAll('#h-ranges button').length === 4")
    assert page.evaluate("() => [...document.querySelectorAll('#h-ranges button')].map((b) => b.textContent)") == [
        "1 h", "24 h", "7 d", "90 d"]

    page.click("#h-ranges button:nth-child(4)")  # 90 d: both markers, hostile text as text
    until(page, f"() => ({labels})().length === 2")
    assert page.evaluate(labels) == ["2.3", HOSTILE_VERSION]
    assert page.evaluate("() => document.querySelectorAll('#h-charts line.marker').length") == 2 * 4
    until(page, f"() => ({drawn})().split('M').length - 1 === 4")  # four buckets, far apart: four segments
    assert page.evaluate("() => !document.querySelector('#h-charts img') && !window.__xss")  # never markup

    page.click("#h-ranges button:nth-child(3)")  # 7 d: the newer marker, two buckets
    until(page, f"() => ({labels})().length === 1 && ({drawn})().split('M').length - 1 === 2")
    assert page.get_attribute("#h-ranges button:nth-child(3)", "aria-pressed") == "true"

    page.click("#h-ranges button:nth-child(1)")  # 1 h: from the nodes' own history, no marker in range
    until(page, f"() => ({labels})().length === 0")

    until(page, "() => document.querySelectorAll('#r-rows tr').length === 4")
    assert page.text_content("#r-rows tr:first-child td:last-child") == "\u221250 % items vs usual for this version"

    href = page.get_attribute("#r-csv", "href")
    assert href.endswith("/runs?spider=main_spider&format=csv")
    resp = requests.get(href, timeout=5)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/csv")
    assert resp.text.startswith("node,spider,host")
