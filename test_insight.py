"""Crawl insight end to end: real ``scrapy crawl`` processes against a local site on three host names (a
normal one, a slow one, one answering 429 and 500), a private redis-server, the API, the alerter's rules."""

import collections
import json
import logging
import threading
import time

import pytest

import alert
import monitor_alert_state
import monitor_api
import monitor_contract
import monitor_read
import monitor_rules
import monitors
import testbed
import testbed_servers
from testbed import FAST, publish, snapshot, until
from testbed_servers import PageHandler, QuietServer, crawl_log, wait_for

ITEM_PAGES, SLOW_PAGES, BAD_PAGES = 150, 10, 10
# The site stops sending the price after this many item pages: the field goes missing partway.
PRICED = 40

INSIGHT_SPIDER = '''
import scrapy

class InsightSpider(scrapy.Spider):
    name = "insight"

    async def start(self):
        for url in self.urls.split(","):
            yield scrapy.Request(url)

    def parse(self, response):
        yield {"name": response.css("h1::text").get(), "price": response.css(".price::text").get(),
               "seller": {"name": "acme", "rating": None}}
'''


class Host:
    """One host name of the test site: a threaded server on its own loopback address, counting what it
    served by path kind and status."""

    def __init__(self, address, delay=0.0, statuses=None, links=0):
        self.delay = delay
        self.links = links  # with links, "/" links to /item/0 ... /item/<links - 1>
        self.statuses = statuses  # path number -> status (default 200)
        self.served = collections.Counter()  # status -> count
        self.items_served = 0
        self.lock = threading.Lock()
        self.server = QuietServer((address, 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path):
        host, port = self.server.server_address
        return f"http://{host}:{port}{path}"

    def _handler(self):
        host = self

        class Handler(PageHandler):

            def do_GET(self):  # noqa: N802 (http.server's name)
                if self.path == "/" and host.links:
                    return self.reply(200, "".join(f'<a href="/item/{i}">i</a>' for i in range(host.links)))
                time.sleep(host.delay)
                number = int(self.path.rsplit("/", 1)[-1]) if self.path[-1:].isdigit() else 0
                status = host.statuses(number) if host.statuses else 200
                with host.lock:
                    host.served[status] += 1
                    priced = host.items_served < PRICED
                    host.items_served += self.path.startswith("/item/")
                price = '<span class="price">9.99</span>' if priced and self.path.startswith("/item/") else ""
                self.reply(status, f"<h1>Item {number}</h1>{price}")

            def reply(self, status, body):
                super().reply(status, f"<html><body>{body}</body></html>")

        return Handler

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hosts():
    """127.0.0.1 normal (a little pacing, so the crawl lasts a few seconds), 127.0.0.2 slow (0.6 s),
    127.0.0.3 answering 429 to even paths and 500 to odd ones."""
    made = {"normal": Host("127.0.0.1", delay=0.1), "slow": Host("127.0.0.2", delay=0.6),
            "bad": Host("127.0.0.3", delay=0.1, statuses=lambda n: 429 if n % 2 == 0 else 500)}
    yield made
    for host in made.values():
        host.stop()


@pytest.fixture
def insight_project(tmp_path):
    return testbed_servers.scrapy_project(tmp_path, "insight", INSIGHT_SPIDER,
                                  "ROBOTSTXT_OBEY = False\nTELNETCONSOLE_ENABLED = False\n")


def alert_config(monkeypatch, url, *argv):
    for name, *_ in alert.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return alert.load_config(["--redis-url", url, "--for", "0", *argv])


def fired(client, cfg, rule):
    """The firing notifications of ``rule`` in one evaluation of the real nodes, now."""
    nodes = testbed.list_nodes(client)[0]
    notes = monitor_rules.evaluate(nodes, {}, {}, time.time(), cfg)[2]
    return [n for n in notes if n["rule"] == rule and n["status"] == "firing"]


def test_crawl_of_three_hosts_reports_latency_domains_coverage_and_errors(
        redis_client, redis_url, hosts, insight_project, crawlers, monkeypatch):
    urls = ([hosts["normal"].url(f"/item/{i}") for i in range(ITEM_PAGES)]
            + [hosts["slow"].url(f"/slow/{i}") for i in range(SLOW_PAGES)]
            + [hosts["bad"].url(f"/bad/{i}") for i in range(BAD_PAGES)])
    proc = crawlers("insight", cwd=insight_project, args=["-a", "urls=" + ",".join(urls)],
                    env={"REDIS_URL": redis_url, "MONITOR_INTERVAL": "1", "MONITOR_NODE_ID": "n1",
                         "MONITOR_ITEM_FIELDS": "name,price,seller.name"},
                    settings={"CONCURRENT_REQUESTS": 2, "RETRY_TIMES": 1})
    cfg = alert_config(monkeypatch, redis_url, "--errors-per-min", "0.01")

    # While it runs: the errors alert quotes the real error, the coverage alert fires past 100 items.
    [errors] = wait_for(lambda: fired(redis_client, cfg, "errors"), 60, 0.1, "the errors alert")
    assert "newest: scrapy.downloadermiddlewares.retry: Gave up retrying <GET http://127.0.0.3:" in errors["summary"]
    [coverage] = wait_for(lambda: fired(redis_client, cfg, "coverage"), 60, 0.1, "the coverage alert")
    assert coverage["node"] == "n1" and coverage["value"] < 90
    assert "for field 'price' over" in coverage["summary"] and "(limit 90%)" in coverage["summary"]
    assert proc.wait(120) == 0, crawl_log(proc)

    snap = testbed.get_node(redis_client, "n1")
    assert snap["status"] == "closed"
    # Per domain, exactly what each host served (each bad URL tried twice: RETRY_TIMES=1).
    domains = snap["domains"]
    assert set(domains) == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}
    normal, slow, bad = domains["127.0.0.1"], domains["127.0.0.2"], domains["127.0.0.3"]
    assert normal["pages"] == sum(hosts["normal"].served.values()) == ITEM_PAGES
    assert slow["pages"] == SLOW_PAGES
    served = hosts["bad"].served
    assert bad["pages"] == sum(served.values()) == 2 * BAD_PAGES
    assert (bad["429"], bad["4xx"], bad["5xx"]) == (served[429], served[429], served[500]) == (10, 10, 10)
    assert (normal["4xx"], normal["5xx"], normal["errors"], slow["errors"]) == (0, 0, 0, 0)
    assert bad["errors"] == BAD_PAGES == snap["errors"]  # each URL given up once, at ERROR
    # Latency: the slow host's p95 sits in the 0.5-0.75 s bucket or above, well over the normal host's.
    assert 0.5 <= slow["latency_p95"] <= 5 and normal["latency_p95"] < slow["latency_p95"]
    downloaded = ITEM_PAGES + SLOW_PAGES + 2 * BAD_PAGES
    assert snap["latency_buckets"][-1] == downloaded == snap["status_2xx"] + snap["status_4xx"] + snap["status_5xx"]
    history = testbed.read_history(redis_client, "n1", 10)
    assert any(row["latency_p95"] and row["latency_p95"] >= 0.5 for row in history)
    # Coverage over the run: the price on the first 40 item pages only; the bad pages' items are dropped.
    assert snap["fields_listed"] is True and snap["items"] == ITEM_PAGES + SLOW_PAGES
    assert snap["fields"] == {"name": 1.0, "price": round(PRICED / snap["items"], 3), "seller.name": 1.0}
    # The newest error sample is the real one: logger, first line, the request's URL.
    sample = snap["error_samples"][0]
    assert sample["logger"] == "scrapy.downloadermiddlewares.retry"
    assert sample["message"].startswith("Gave up retrying <GET http://127.0.0.3:")
    assert sample["url"].startswith(hosts["bad"].url("/bad/")) and len(snap["error_samples"]) == 5

    # The API: list views leave the big fields out unless asked; Prometheus has the histogram and the rest.
    client = monitor_api.create_app({"REDIS_URL": redis_url, "MONITOR_API_CACHE": 0}).test_client()
    listed = client.get("/metrics").get_json()["n1"]
    assert "domains" not in listed and listed["latency_p95"] == snap["latency_p95"]
    assert client.get("/metrics?fields=all").get_json()["n1"]["domains"] == domains
    assert client.get("/metrics/n1").get_json()["fields"] == snap["fields"]
    assert client.get("/metrics?fields=some").status_code == 400
    text = client.get("/prometheus?detail=node").get_data(as_text=True)
    total = ITEM_PAGES + SLOW_PAGES + 2 * BAD_PAGES
    assert f'scrapy_download_latency_seconds_bucket{{le="+Inf",node="n1",spider="insight"}} {total}.0' in text
    assert 'scrapy_domain_responses_total{domain="127.0.0.2",node="n1",spider="insight"} 10.0' in text
    assert ('scrapy_domain_error_responses_total{domain="127.0.0.3",node="n1",spider="insight",status="429"} 10.0'
            in text)
    assert (f'scrapy_item_field_coverage_ratio{{field="price",node="n1",spider="insight"}} {snap["fields"]["price"]}'
            in text)


def test_queue_forecast_is_within_a_fifth_of_the_actual_drain_time(redis_client, redis_url, crawlers):
    pages = 160
    # A start page linking to every item page: the queue fills at once, then drains at the site's pace. A slow
    # site (0.25 s a page, 2 at a time: 8 pages/s) sets that pace, not the crawler's CPU: at 0.1 s (20 pages/s)
    # a crawler sharing a loaded machine fell behind by fits and starts, and its drain rate with it.
    listing = Host("127.0.0.1", delay=0.25, links=pages)
    try:
        proc = crawlers(env={"REDIS_URL": redis_url, "MONITOR_INTERVAL": "1", "MONITOR_NODE_ID": "q1"},
                        settings={"MAX_IDLE_TIME_BEFORE_CLOSE": 2, "CONCURRENT_REQUESTS": 2, "ROBOTSTXT_OBEY": False})
        wait_for(lambda: testbed.get_node(redis_client, "q1"), 30, what="node registered")
        redis_client.lpush("distributed:start_urls", json.dumps({"url": listing.url("/")}))
        queue = lambda: redis_client.zcard("main_spider:requests")  # noqa: E731

        def draining_readings():
            sizes = [r["queue_requests"] for r in testbed.read_history(redis_client, "q1", 5) if r["queue_requests"]]
            return len(sizes) - sizes.index(max(sizes)) if sizes else 0

        wait_for(lambda: draining_readings() >= 6, 60, 0.1, "six readings of the drain")
        client = monitor_api.create_app({"REDIS_URL": redis_url, "MONITOR_API_CACHE": 0}).test_client()
        view = client.get("/metrics/main_spider").get_json()
        asked = time.monotonic()
        assert view["queue_rate"] < 0 and view["queue_eta"] > 0, view
        assert client.get("/spiders").get_json()["main_spider"]["queue_eta"] == view["queue_eta"]
        wait_for(lambda: queue() == 0, 120, 0.05, "the queue drained")
        actual = time.monotonic() - asked
        print(f"forecast {view['queue_eta']} s, actual {actual:.1f} s")
        assert abs(view["queue_eta"] - actual) <= 0.2 * actual, (view["queue_eta"], actual)
        assert proc.wait(60) == 0, crawl_log(proc)
        # Drained and closed: no forecast without crawling nodes.
        assert client.get("/metrics/main_spider").get_json()["queue_eta"] is None
    finally:
        listing.stop()


HOSTILE = [
    {"domains": "not an object", "fields": [1, 2], "error_samples": {"a": 1}, "latency_buckets": "x",
     "latency_p95": "slow"},
    {"domains": {"__proto__": {"pages": 1}, "x" * 400: {"pages": 2}, "toString": "nope",
                 "<img src=x onerror=alert(1)>": {"pages": "many", "errors": [1], "4xx": {"a": 1}, "5xx": 3}},
     "fields": {"": 0.5, "constructor": 1.5, "ok": 0.25, "hasOwnProperty": "full", "\ud800": 1},
     "error_samples": [{"time": "now", "logger": "x", "message": "m"}, "text", None,
                       {"time": 1, "logger": "<b>l</b>", "message": "m" * 1000, "url": ["no"]}],
     "latency_buckets": [1, 2], "latency_p99": -1},
]


def test_hostile_insight_shapes_are_dropped_and_every_view_still_answers(redis_client, redis_url, monkeypatch):
    now = int(time.time())
    base = {"timestamp": now, "spider": "s", "cpu": 1.0, "memory": 2.0, "bytes_sent": 0, "bytes_recv": 0,
            "host": "h", "pid": 1, "status": "running", "interval": 10, "pages": 150, "items": 150,
            "errors": 1, "errors_per_min": 99.0, "queue_requests": 5, "fields_listed": True}
    good = {**base, "node": "good", **monitors.Insight(20).figures(), "latency_p95": 12.5, "fields_listed": True,
            "fields": {"price": 0.5}, "domains": {"a.example": {"pages": 3, "errors": 0, "4xx": 0, "5xx": 0,
                                                               "429": 0, "latency_p95": 0.2}}}
    with redis_client.pipeline(transaction=False) as pipe:
        monitor_contract.write_snapshot(pipe, "scrapy", good, 10)
        for i, hostile in enumerate(HOSTILE):
            monitor_contract.write_snapshot(pipe, "scrapy", {**base, "node": f"bad{i}", **hostile}, 10)
        pipe.execute()
    nodes = testbed.list_nodes(redis_client)[0]
    assert set(nodes) == {"good", "bad0", "bad1"}
    assert not {"domains", "fields", "error_samples", "latency_buckets", "latency_p95"} & set(nodes["bad0"])
    bad1 = nodes["bad1"]
    assert bad1["domains"] == {"__proto__": dict.fromkeys(monitor_contract.DOMAIN_COUNTS + ("latency_p95", "delay"))
                               | {"pages": 1},
                               "<img src=x onerror=alert(1)>": {"pages": None, "errors": None, "4xx": None,
                                                               "5xx": 3, "429": None, "503": None,
                                                               "latency_p95": None, "delay": None}}
    assert bad1["fields"] == {"ok": 0.25} and "latency_buckets" not in bad1 and "latency_p99" not in bad1
    assert bad1["error_samples"] == [{"time": 1, "logger": "<b>l</b>", "message": "m" * 300, "url": None}]

    client = monitor_api.create_app({"REDIS_URL": redis_url, "MONITOR_API_CACHE": 0}).test_client()
    for path in ("/metrics", "/metrics?fields=all", "/metrics/bad1", "/metrics/s", "/spiders", "/prometheus",
                 "/metrics/s/history"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.get_data(as_text=True)[:300])
    assert client.get("/metrics/bad1").get_json()["domains"] == bad1["domains"]
    prom = client.get("/prometheus?detail=node").get_data(as_text=True)
    assert ('scrapy_domain_error_responses_total{domain="<img src=x onerror=alert(1)>",node="bad1",spider="s",'
            'status="5xx"} 3.0') in prom
    # The rules judge the good node and pass over the hostile ones without failing.
    cfg = alert_config(monkeypatch, redis_url, "--errors-per-min", "1")
    notes = monitor_rules.evaluate(nodes, {}, {}, now, cfg)[2]
    assert {n["node"] for n in notes if n["rule"] == "latency"} == {"good"}
    assert {n["node"] for n in notes if n["rule"] == "coverage"} == {"good", "bad1"}  # its one valid field
    assert [n["summary"] for n in notes if n["rule"] == "errors" and n["node"] == "bad1"] == [
        "errors 99/min (limit 1/min); newest: <b>l</b>: " + "m" * 300]


def test_percentiles_domains_and_fields_from_the_hooks():
    """The collector on its own, as Scrapy's tests drive extensions: handlers called directly."""
    from scrapy import Request
    from scrapy.http import HtmlResponse

    ins = monitors.Insight(top_domains=2)
    log = logging.getLogger("scrapy.core.downloader.test")
    ins.handler.spider = "this spider"
    log.addHandler(ins.handler)
    try:
        log.error("Error downloading %(request)s\nTraceback...", {"request": Request("https://u:hunter2@e.example/x")})
        log.error("another spider's", extra={"spider": "other spider"})
    finally:
        log.removeHandler(ins.handler)
    [sample] = ins.handler.samples()
    assert sample["message"] == "Error downloading <GET https://u:***@e.example/x>"
    assert sample["url"] == "https://u:***@e.example/x" and sample["logger"] == "scrapy.core.downloader.test"
    for i, (host, latency, status) in enumerate([("a.example", 0.02, 200)] * 90 + [("b.example", 2.2, 503)] * 10
                                                + [("c.example", 0.3, 200)] * 5 + [("d.example", 0.3, 429)]):
        request = Request(f"https://{host}:8443/p/{i}", meta={"download_latency": latency})
        ins.response_downloaded(HtmlResponse(request.url, status=status, request=request), request, None)
    figures = ins.take_interval()
    assert 0.01 <= figures["latency_p50"] <= 0.025 and 2.0 <= figures["latency_p99"] <= 3.0
    assert ins.take_interval() == {"latency_p50": None, "latency_p95": None, "latency_p99": None}
    domains = ins.figures()["domains"]
    assert list(domains) == ["a.example", "b.example", "other"]
    assert domains["b.example"]["5xx"] == 10 and domains["other"]["pages"] == 6 and domains["other"]["429"] == 1
    # Items: dicts, Items and dataclasses alike; the first 30 fields seen when none are listed.
    import dataclasses

    import scrapy

    class Product(scrapy.Item):
        name = scrapy.Field()
        price = scrapy.Field()

    @dataclasses.dataclass
    class Offer:
        name: str
        price: object = None

    ins = monitors.Insight()
    ins.item_scraped({"name": "a", "price": 0, "seller": {"name": "x", "id": None}}, None, None)
    ins.item_scraped(Product(name="b", price=None), None, None)
    ins.item_scraped(Offer("c", ""), None, None)
    ins.item_scraped({f"f{i}": i for i in range(40)}, None, None)
    fields = ins.figures()["fields"]
    assert len(fields) == monitors.DEFAULT_FIELD_COUNT
    assert {k: fields[k] for k in ("name", "price", "seller", "seller.name", "seller.id")} == {
        "name": 0.75, "price": 0.25, "seller": 0.25, "seller.name": 0.25, "seller.id": 0.0}


def test_forecast_and_spider_p95_combine():
    rows = [{"timestamp": t, "queue_requests": q} for t, q in [(0, 0), (10, 600), (20, 500), (30, 400)]]
    assert monitor_read.queue_forecast(rows) == {"queue_rate": -600.0, "queue_eta": 40}
    growing = [{"timestamp": t, "queue_requests": 100 + t} for t in range(0, 60, 10)]
    assert monitor_read.queue_forecast(growing) == {"queue_rate": 60.0, "queue_eta": None}
    assert monitor_read.queue_forecast(rows[:1]) == {"queue_rate": None, "queue_eta": None}
    nodes = {n: {"timestamp": 1, "host": n, "latency_p95": p} for n, p in (("a", 0.5), ("b", 3.0), ("c", None))}
    assert monitor_read.combine(list(nodes.values()), ["latency_p95"]) == {"latency_p95": 3.0}


# ---------------------------------------------------------------------------- the page (headless Chromium)


def drain_history(client, node, spider, newest_queue, per_second, now):
    """Thirty reports, 10 s apart, of a queue shrinking by ``per_second`` down to ``newest_queue``."""
    with client.pipeline(transaction=False) as pipe:
        for ago in range(290, -1, -10):
            snap = snapshot(node, spider=spider, queue_requests=newest_queue + ago * per_second)
            snap["timestamp"] = now - ago
            monitor_contract.write_snapshot(pipe, "scrapy", snap, 360)
        pipe.execute()


def test_page_shows_latency_domains_coverage_errors_and_queue_forecast(api, redis_client, open_page):
    now = int(time.time())
    drain_history(redis_client, "ins-1", "drainer", 7800, 1, now)  # -60/min: empties in 2 h 10 min
    drain_history(redis_client, "flat-1", "grower", 500, 0, now)
    domains = {"ok.example": {"pages": 100, "errors": 0, "4xx": 0, "5xx": 0, "429": 0, "latency_p95": 0.3},
               "bad.example": {"pages": 50, "errors": 2, "4xx": 0, "5xx": 25, "429": 0, "latency_p95": 0.2},
               "meh.example": {"pages": 100, "errors": 0, "4xx": 10, "5xx": 0, "429": 10, "latency_p95": 0.2},
               "other": {"pages": 5, "errors": 0, "4xx": 0, "5xx": 0, "429": 0, "latency_p95": 0.1}}
    sample = {"time": now - 5, "logger": "scrapy.core.scraper", "message": "Spider error processing <GET x>",
              "url": "https://bad.example/p/1"}
    publish(redis_client, snapshot("ins-1", spider="drainer", queue_requests=7800, latency_p50=0.412,
                                   latency_p95=1.873, latency_p99=2.951, domains=domains,
                                   fields={"name": 1.0, "price": 0.25}, error_samples=[sample]),
            snapshot("hostile-1", spider="h", **HOSTILE[1]))
    page = open_page(f"{api.url}/?interval={FAST}#node=ins-1")
    until(page, "() => !document.querySelector('#d-insight').hidden")
    assert page.inner_text("#d-latency") == "p50 412 ms \u00b7 p95 1.87 s \u00b7 p99 2.95 s"
    rows = "() => [...document.querySelectorAll('#d-domains-body tr')].map((r) => r.getAttribute('data-domain'))"
    assert page.evaluate(rows) == ["bad.example", "meh.example", "ok.example", "other"]  # worst first
    page.click("#d-domains-head button:text-is('Pages')")
    assert page.evaluate(rows) == ["ok.example", "meh.example", "bad.example", "other"]  # ties: as sent
    assert page.evaluate("""() => [...document.querySelectorAll('#d-coverage .cov')].map((r) =>
        [r.getAttribute('data-field'), r.querySelector('meter').value, r.querySelector('.pct').textContent])""") == [
        ["price", 0.25, "25.0%"], ["name", 1, "100.0%"]]
    assert "scrapy.core.scraper: Spider error processing <GET x>" in page.inner_text("#d-errors")
    assert "https://bad.example/p/1" in page.inner_text("#d-errors")
    # The p95 chart of the last hour draws from the history rows.
    until(page, """() => [...document.querySelectorAll('#d-hour .chart')].some((c) =>
        c.querySelector('.ch-title').textContent === 'Download latency')""")
    queue = "(s) => document.querySelector(`details[data-spider='${s}'] .g-queue`).textContent"
    until(page, f"() => ({queue})('drainer').includes('-60/min \u00b7 empties in ~2 h 10 min')")
    until(page, f"() => ({queue})('grower').includes('not draining')")
    # A node with hostile shapes: its detail opens, names are text, nothing runs, nothing fails.
    page.evaluate("() => { location.hash = 'node=hostile-1'; }")
    until(page, "() => document.querySelector('#d-title').textContent === 'hostile-1' && "
                "document.querySelectorAll('#d-domains-body tr').length === 2")
    assert "<img src=x onerror=alert(1)>" in page.inner_text("#d-domains-body")
    assert page.evaluate("() => document.querySelectorAll('#detail img').length") == 0
    assert page.evaluate("() => window.dashboardStats.displayErrors") == 0


def test_queue_alert_is_per_spider_and_fires_after_growing_for_its_hold(redis_client, redis_url, monkeypatch):
    cfg = alert_config(monkeypatch, redis_url, "--queue-growing", "1800", "--rules", "queue")
    now = int(time.time())

    def report(at, queue_at):
        """A live node of spider "grow", named like the spider (their alerts must not mix): rows every 10 s
        over the 5 minutes to ``at``, the queue at time t being ``queue_at(t)``."""
        with redis_client.pipeline(transaction=False) as pipe:
            for t in range(at - 290, at + 1, 10):
                snap = {"timestamp": t, "spider": "grow", "node": "grow", "host": "h", "status": "running",
                        "interval": 10, "start_time": now - 7200, "queue_requests": queue_at(t)}
                monitor_contract.write_snapshot(pipe, "scrapy", snap, 360)
            pipe.execute()

    def evaluate(state, at):
        nodes = testbed.list_nodes(redis_client, now=at)[0]
        views = alert.spider_views(redis_client, nodes, "scrapy", at, cfg)
        changes, _, notes = monitor_rules.evaluate(nodes, state, {}, at, cfg, spiders=views)
        return monitor_alert_state.merged(state, changes), notes

    growing = lambda t: 1000 + (t - now)  # noqa: E731 (+60/min)
    report(now, growing)
    state, notes = evaluate({}, now)
    assert notes == [] and state["queue:grow"]["state"] == "pending"  # keyed by the spider
    report(now + 1799, growing)
    state, notes = evaluate(state, now + 1799)
    assert notes == [] and state["queue:grow"]["state"] == "pending"
    report(now + 1800, growing)
    state, [note] = evaluate(state, now + 1800)
    assert (note["rule"], note["alertname"], note["node"], note["spider"], note["status"]) == (
        "queue", "ScrapyQueueGrowing", "grow", "grow", "firing")
    assert note["summary"] == "queue growing by 60/min for 30m00s or more, 2800 requests queued"
    report(now + 2200, lambda t: 10000 - (t - now))  # draining now
    state, [note] = evaluate(state, now + 2200)
    assert note["status"] == "resolved" and note["summary"].startswith("queue no longer growing")
    assert "queue:grow" not in state
