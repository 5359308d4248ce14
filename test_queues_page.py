"""The dashboard's queues view (issue 19): seed from a pasted list, flush after a confirmation naming the counts,
dead letters shown redacted, as text, with Requeue."""

import monitor_contract
from testbed import XSS, snapshot, store, until

QUEUES = {"requests": "shop:requests", "start_urls": "shop:start_urls", "dupefilter": "shop:dupefilter",
          "start_urls_type": "list", "apart": False}
# window.confirm answers yes and keeps what it asked (a real dialog would fail the test).
CONFIRM = "window.confirm = (m) => { window.__asked = m; return true; };"


def test_queues_view_seeds_flushes_after_naming_the_counts_and_requeues_a_dead_letter(
        redis_url, redis_client, api, open_page):
    slowed = {"a.test": {"pages": 9, "errors": 0, "4xx": 3, "5xx": 0, "429": 3, "503": 0, "delay": 2.0}}
    store(redis_client, snapshot("shop:h:1", spider="shop", queues=QUEUES, queue_requests=3, queue_start_urls=0,
                                 queue_dupefilter=4, domains=slowed))
    redis_client.zadd("shop:requests", {"r1": 0, "r2": 0, "r3": 0})
    redis_client.sadd("shop:dupefilter", "f1", "f2", "f3", "f4")
    record = {"url": f"http://u:secret@site.test/{XSS}?token=abc", "method": "GET", "status": 500, "exception": None,
              "reason": "retry/max_reached", "retries": 2, "at": 1_700_000_000, "meta": {}, "callback": None,
              "priority": 0, "node": "shop:h:1"}
    with redis_client.pipeline() as pipe:
        monitor_contract.write_dead(pipe, "scrapy", "shop", [monitor_contract.dead_member(record, "shop:h:1", 1)], 10)
        pipe.execute()
    page = open_page(f"{api.url}/?interval=300", init_script=CONFIRM)
    until(page, "() => document.querySelector('[data-spider=\"shop\"]')?.getAttribute('data-crawl') === 'crawling'")
    assert "slowed: a.test 2 s" in page.text_content('[data-spider="shop"] .g-crawl')
    page.click("#f-queues")
    until(page, "() => document.querySelectorAll('#q-dead-rows tr').length === 1")
    url = page.text_content("#q-dead-rows .q-url")
    assert "secret" not in url and "abc" not in url and XSS in url  # redacted, and text, never HTML
    assert page.evaluate("() => window.__xss") is None

    page.fill("#q-urls", "http://a.test/1\n\n  https://a.test/2  \n")
    page.click("#q-seed")
    until(page, "() => document.getElementById('q-msg').textContent.startsWith('pushed 2')")
    assert [x.decode() for x in redis_client.lrange("shop:start_urls", 0, -1)] == [
        '{"url":"http://a.test/1"}', '{"url":"https://a.test/2"}']

    page.check("#q-f-requests")
    page.check("#q-f-dupefilter")
    page.click("#q-flush")
    until(page, "() => document.getElementById('q-msg').textContent.startsWith('flushed')")
    asked = page.evaluate("() => window.__asked")
    assert asked == "Flush shop: delete 3 requests, 4 dupefilter entries? This cannot be undone."
    assert not redis_client.exists("shop:requests", "shop:dupefilter") and redis_client.llen("shop:start_urls") == 2

    page.click("#q-dead-rows button")
    until(page, "() => document.getElementById('q-msg').textContent.startsWith('requeued 1')")
    until(page, "() => document.querySelectorAll('#q-dead-rows tr').length === 0")
    assert redis_client.llen("shop:start_urls") == 3
    log = [monitor_contract.loads(x)["command"] for x in redis_client.lrange("scrapy:control:log", 0, -1)]
    assert log == ["requeue", "flush", "seed"]
