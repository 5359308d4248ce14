"""Acting on the work (issue 19): seed, flush, dead letters and their requeue, through the API and real crawls."""

import threading

import pytest

import monitor_contract
import monitor_snapshot
from testbed import make_app, snapshot, store
from testbed_servers import wait_for

QUEUES = {"requests": "shop:requests", "start_urls": "shop:start_urls", "dupefilter": "shop:dupefilter",
          "start_urls_type": "list", "apart": False}


def shop(client, **queues):
    store(client, snapshot("shop:h:1", spider="shop", queues={**QUEUES, **queues}))


def dead(client, spider, n, reason="retry/max_reached", node="shop:h:1"):
    """``n`` dead letters as a node writes them; returns their ids, oldest first."""
    members = [monitor_contract.dead_member(
        {"url": f"http://user:secret@site.test/p/{i}?token=abc", "method": "GET", "status": 500, "exception": None,
         "reason": reason, "retries": 2, "at": 1_700_000_000 + i, "meta": {"k": i}, "callback": "parse",
         "priority": 0, "node": node}, node, i) for i in range(n)]
    with client.pipeline() as pipe:
        monitor_contract.write_dead(pipe, "scrapy", spider, members, 10000)
        pipe.execute()
    return [m.split(" ", 1)[0] for m in members]


# ---------------------------------------------------------------------------- seed and flush

@pytest.mark.parametrize("body, status, says", [
    ({}, 400, "exactly one"),
    ({"urls": []}, 400, "non-empty"),
    ({"urls": "http://a.test/"}, 400, "non-empty list"),
    ({"urls": ["http://a.test/"], "requests": []}, 400, "exactly one"),
    ({"urls": ["http://a.test/", "ftp://b.test/x", "file:///etc"]}, 400, "urls[1] is not an http(s) URL: 'ftp://b.test/x'"),
    ({"urls": ["http://a.test/", 7]}, 400, "urls[1]"),
    ({"urls": ["http:// a.test/"]}, 400, "urls[0]"),
    ({"urls": ["https://u:pw@a.test/", "javascript:alert(1)"]}, 400, "urls[1]"),
    ({"requests": [{"url": "http://a.test/", "callback": "x"}]}, 400, 'requests[0] must be an object'),
    ({"requests": [{"url": "http://a.test/", "meta": []}]}, 400, '"meta" must be an object'),
    ({"urls": ["http://a.test/"] * 10001}, 413, "at most 10000"),
    ({"urls": ["http://a.test/"], "other": 1}, 400, "unknown field 'other'"),
])
def test_a_bad_seed_is_refused_naming_what_is_wrong(redis_url, redis_client, body, status, says):
    shop(redis_client)
    resp = make_app(redis_url).test_client().post("/queues/shop/seed", json=body)
    assert resp.status_code == status and says in resp.get_json()["error"], resp.get_json()
    assert not redis_client.exists("shop:start_urls")
    assert "secret" not in resp.get_json()["error"] and "pw@" not in resp.get_json()["error"]


@pytest.mark.parametrize("kind, read", [
    ("list", lambda r: [x.decode() for x in r.lrange("shop:start_urls", 0, -1)]),
    ("set", lambda r: sorted(x.decode() for x in r.smembers("shop:start_urls"))),
    ("zset", lambda r: sorted(x.decode() for x in r.zrange("shop:start_urls", 0, -1))),
])
def test_seed_pushes_the_json_scrapy_redis_reads_onto_the_published_key_type(redis_url, redis_client, kind, read):
    shop(redis_client, start_urls_type=kind)
    c = make_app(redis_url).test_client()
    resp = c.post("/queues/shop/seed", json={"requests": [{"url": "http://a.test/1", "meta": {"job": 7}},
                                                          {"url": "https://a.test/2"}]})
    assert resp.status_code == 200 and resp.get_json()["pushed"] == 2
    expected = ['{"url":"http://a.test/1","meta":{"job":7}}', '{"url":"https://a.test/2"}']
    assert read(redis_client) == (expected if kind == "list" else sorted(expected))
    log = c.get("/control/log").get_json()["log"]
    assert [(e["command"], e["target"], e["pushed"], e["who"]) for e in log] == [
        ("seed", "spider:shop", 2, "anonymous")]
    audit = c.get("/audit").get_json()["entries"]
    assert [(e["action"], e["ref"]) for e in audit] == [("queues.seed", log[0]["id"])]


def test_seed_of_ten_thousand_urls_is_one_script_and_idempotent(redis_url, redis_client):
    shop(redis_client)
    c = make_app(redis_url).test_client()
    urls = [f"http://a.test/page/{i}" for i in range(10000)]
    first = c.post("/queues/shop/seed", json={"urls": urls}, headers={"Idempotency-Key": "s1"})
    again = c.post("/queues/shop/seed", json={"urls": urls}, headers={"Idempotency-Key": "s1"})
    assert first.status_code == again.status_code == 200 and first.get_json() == again.get_json()
    assert first.get_json()["pushed"] == 10000 and redis_client.llen("shop:start_urls") == 10000
    assert redis_client.lindex("shop:start_urls", 0) == b'{"url":"http://a.test/page/0"}'  # fetched in order


@pytest.mark.parametrize("path, body", [
    ("/queues/nobody/seed", {"urls": ["http://a.test/"]}),
    ("/queues/nobody/flush", {"what": ["requests"]}),
    ("/queues/nobody/dead/requeue", {"all": True}),
])
def test_acting_on_a_spider_nobody_has_seen_is_404(redis_url, redis_client, path, body):
    shop(redis_client)
    resp = make_app(redis_url).test_client().post(path, json=body)
    assert resp.status_code == 404 and "no spider" in resp.get_json()["error"]
    assert make_app(redis_url).test_client().get("/queues/nobody/dead").status_code == 404


def test_queues_kept_apart_or_never_published_are_409(redis_url, redis_client):
    shop(redis_client, apart=True)
    never = snapshot("plain:h:1", spider="plain")
    del never["queues"]  # a node that never published its keys
    store(redis_client, never)
    c = make_app(redis_url).test_client()
    assert "another Redis" in c.post("/queues/shop/seed", json={"urls": ["http://a.test/"]}).get_json()["error"]
    resp = c.post("/queues/plain/flush", json={"what": ["requests"]})
    assert resp.status_code == 409 and "no scrapy-redis keys" in resp.get_json()["error"]


def test_flush_empties_what_it_names_and_nothing_else_and_says_what_each_held(redis_url, redis_client):
    shop(redis_client)
    redis_client.zadd("shop:requests", {"r1": 0, "r2": 0, "r3": 0})
    redis_client.rpush("shop:start_urls", "a", "b")
    redis_client.sadd("shop:dupefilter", "f1", "f2", "f3", "f4")
    redis_client.set("shop:other", "kept")
    c = make_app(redis_url).test_client()
    resp = c.post("/queues/shop/flush", json={"what": ["requests", "dupefilter"]})
    assert resp.status_code == 200 and resp.get_json()["flushed"] == {"requests": 3, "dupefilter": 4}
    assert not redis_client.exists("shop:requests", "shop:dupefilter")
    assert redis_client.llen("shop:start_urls") == 2 and redis_client.get("shop:other") == b"kept"
    log = c.get("/control/log").get_json()["log"][0]
    assert (log["command"], log["flushed"]) == ("flush", {"requests": 3, "dupefilter": 4})
    for bad in ({"what": ["items"]}, {"what": []}, {"what": "requests"}, {}):
        resp = c.post("/queues/shop/flush", json=bad)
        assert resp.status_code == 400 and '"what"' in resp.get_json()["error"]
    assert redis_client.llen("shop:start_urls") == 2


def test_queue_changes_need_operator_rights_and_obey_read_only(redis_url, redis_client, tmp_path):
    shop(redis_client)
    tokens = tmp_path / "tokens"
    tokens.write_text("ann viewer view-secret\nbob operator op-secret\n")
    c = make_app(redis_url, MONITOR_API_TOKENS_FILE=str(tokens)).test_client()
    seed = {"urls": ["http://a.test/"]}
    assert c.post("/queues/shop/seed", json=seed).status_code == 401
    assert c.post("/queues/shop/seed", json=seed, headers={"Authorization": "Bearer view-secret"}).status_code == 403
    resp = c.post("/queues/shop/seed", json=seed, headers={"Authorization": "Bearer op-secret"})
    assert resp.status_code == 200 and redis_client.llen("shop:start_urls") == 1
    assert c.get("/queues/shop/dead", headers={"Authorization": "Bearer view-secret"}).status_code == 200
    ro = make_app(redis_url, MONITOR_API_READONLY="1").test_client()
    assert ro.post("/queues/shop/flush", json={"what": ["start_urls"]}).status_code == 403
    assert ro.get("/queues/shop/seed").status_code in (403, 405)
    assert redis_client.llen("shop:start_urls") == 1


# ---------------------------------------------------------------------------- dead letters

def test_dead_letters_page_newest_first_with_redacted_urls_and_a_reason_filter(redis_url, redis_client):
    shop(redis_client)
    ids = dead(redis_client, "shop", 7) + dead(redis_client, "shop", 3, reason="http_error", node="shop:h:2")
    c = make_app(redis_url).test_client()
    first = c.get("/queues/shop/dead?limit=4").get_json()
    assert first["total"] == 10 and len(first["dead"]) == 4 and first["next"] == first["dead"][-1]["id"]
    seen = [d["id"] for d in first["dead"]]
    page = first
    while page["next"]:
        page = c.get(f"/queues/shop/dead?limit=4&before={page['next']}").get_json()
        seen += [d["id"] for d in page["dead"]]
    assert seen == sorted(ids, reverse=True)
    letter = first["dead"][0]
    assert "secret" not in letter["url"] and "abc" not in letter["url"] and letter["url"].startswith("http://user:")
    assert {k: letter[k] for k in ("method", "status", "retries", "callback")} == {
        "method": "GET", "status": 500, "retries": 2, "callback": "parse"}
    only = c.get("/queues/shop/dead?reason=http_error").get_json()["dead"]
    assert len(only) == 3 and {d["node"] for d in only} == {"shop:h:2"}
    assert c.get("/queues/shop/dead?before=nope").status_code == 400
    assert c.get("/queues/shop/dead?limit=0").status_code == 400


def test_requeue_moves_dead_letters_onto_the_start_urls_once_even_racing(redis_url, redis_client):
    shop(redis_client)
    ids = dead(redis_client, "shop", 40)
    app = make_app(redis_url)
    answers, start = [], threading.Barrier(2)

    def requeue():
        c = app.test_client()
        start.wait()
        answers.append(c.post("/queues/shop/dead/requeue", json={"ids": ids[:30]}))

    threads = [threading.Thread(target=requeue) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200, 404], [a.get_json() for a in answers]
    assert redis_client.llen("shop:start_urls") == 30 and redis_client.zcard("scrapy:dead:shop") == 10
    entry = monitor_contract.loads(redis_client.lindex("shop:start_urls", 0))
    assert entry["url"] == "http://user:secret@site.test/p/0?token=abc"  # as fetched: a requeue fetches it again
    assert entry["meta"] == {"k": 0, "requeued": ids[0]}
    c = app.test_client()
    partly = c.post("/queues/shop/dead/requeue", json={"ids": [ids[0], ids[35]]}).get_json()
    assert (partly["requeued"], partly["missing"]) == (1, 1)
    rest = c.post("/queues/shop/dead/requeue", json={"all": True}).get_json()
    assert rest["requeued"] == 9 and redis_client.zcard("scrapy:dead:shop") == 0
    empty = c.post("/queues/shop/dead/requeue", json={"all": True})
    assert empty.status_code == 404 and empty.get_json()["error"] == "the spider holds no dead letters"
    assert redis_client.llen("shop:start_urls") == 40
    for bad in ({"ids": ["x"]}, {"ids": []}, {"all": False}, {"ids": ids[:1], "all": True}):
        assert c.post("/queues/shop/dead/requeue", json=bad).status_code == 400
    assert [e["command"] for e in c.get("/control/log").get_json()["log"]] == ["requeue"] * 3


def test_delete_dead_empties_them_and_counts_what_it_held(redis_url, redis_client):
    shop(redis_client)
    dead(redis_client, "shop", 5)
    c = make_app(redis_url).test_client()
    resp = c.delete("/queues/shop/dead")
    assert resp.status_code == 200 and resp.get_json()["flushed"] == {"dead": 5}
    assert not redis_client.exists("scrapy:dead:shop") and redis_client.hget("scrapy:deadmeta:totals", "shop") == b"5"
    assert c.delete("/queues/nobody/dead").status_code == 404


# ---------------------------------------------------------------------------- against a real crawl

def node_of(client, spider="main_spider"):
    """The spider's first node snapshot that publishes its queue names, or None."""
    for raw in client.hvals("scrapy:node:status"):
        snap = monitor_snapshot.decode_snapshot(raw)
        if snap and snap["spider"] == spider and snap.get("queues"):
            return snap
    return None


def test_seeded_urls_are_fetched_once_and_a_page_failing_for_good_is_one_dead_letter_requeued_once(
        redis_url, redis_client, site, crawlers):
    bad = {13, 27}
    site.status_of = lambda i: 500 if i in bad else 200
    proc = crawlers(env={"REDIS_URL": redis_url, "MONITOR_INTERVAL": "1"},
                    settings={"RETRY_TIMES": 1, "ROBOTSTXT_OBEY": "False", "CONCURRENT_REQUESTS": 4})
    snap = wait_for(lambda: node_of(redis_client), 30, what="the node to publish its queues")
    assert snap["queues"] == {"requests": "main_spider:requests", "start_urls": "distributed:start_urls",
                              "dupefilter": "main_spider:dupefilter", "start_urls_type": "list", "apart": False}
    c = make_app(redis_url).test_client()
    urls = [site.url.rstrip("/") + path for path in site.page_paths()]
    resp = c.post("/queues/main_spider/seed", json={"urls": urls})
    assert resp.status_code == 200 and resp.get_json()["pushed"] == 40
    # each once; a page failing for good once plus its one retry
    fetched = {path: 2 if path != "/" and int(path.rsplit("/", 1)[-1]) in bad else 1 for path in site.page_paths()}
    wait_for(lambda: site.page_hits() == fetched, 30, what="every seeded page fetched")

    def letters():
        found = c.get("/queues/main_spider/dead").get_json()
        return found if found["total"] == len(bad) else None

    found = wait_for(letters, 10, what="one dead letter per failing page")
    assert sorted(d["url"] for d in found["dead"]) == sorted(f"{site.url}page/{i}" for i in bad)
    assert {(d["reason"], d["status"], d["retries"], d["method"]) for d in found["dead"]} == {
        ("retry/max_reached", 500, 1, "GET")}
    assert {d["callback"] for d in found["dead"]} <= {None, "parse"}  # seeded, or followed from a link
    wait_for(lambda: (node_of(redis_client) or {}).get("dead") == 2, 10, what="the snapshot's dead count")
    assert 'scrapy_dead_requests_total{spider="main_spider"} 2.0' in c.get("/prometheus").get_data(as_text=True)

    resp = c.post("/queues/main_spider/dead/requeue", json={"ids": [found["dead"][0]["id"]]})
    assert resp.status_code == 200 and resp.get_json()["requeued"] == 1
    again = int(found["dead"][0]["url"].rsplit("/", 1)[-1])
    fetched[f"/page/{again}"] += 2
    wait_for(lambda: site.page_hits() == fetched, 20, what="the requeued page fetched again")
    wait_for(lambda: c.get("/queues/main_spider/dead").get_json()["total"] == 2, 10, what="it failing again")
    assert proc.poll() is None


# ---------------------------------------------------------------------------- the extension's dead letters

def scrapy_records(kind, request):
    """The log record Scrapy writes when ``request`` fails for good in the way ``kind`` names."""
    import logging

    from scrapy.http import HtmlResponse
    from twisted.internet.error import ConnectionRefusedError

    if kind == "gave up (status)":
        return logging.LogRecord("scrapy.downloadermiddlewares.retry", logging.ERROR, "", 0,
                                 "Gave up retrying %(request)s (failed %(retry_times)d times): %(reason)s",
                                 ({"request": request, "retry_times": 3, "reason": "503 Service Unavailable"},), None)
    if kind == "gave up (exception)":
        return logging.LogRecord("scrapy.downloadermiddlewares.retry", logging.ERROR, "", 0,
                                 "Gave up retrying %(request)s (failed %(retry_times)d times): %(reason)s",
                                 ({"request": request, "retry_times": 3, "reason": ConnectionRefusedError()},), None)
    if kind == "download error":
        try:
            raise ConnectionRefusedError()
        except ConnectionRefusedError:
            import sys
            return logging.LogRecord("scrapy.core.scraper", logging.ERROR, "", 0, "Error downloading %(request)s",
                                     ({"request": request},), sys.exc_info())
    response = HtmlResponse(request.url, status=404, request=request)
    return logging.LogRecord("scrapy.spidermiddlewares.httperror", logging.INFO, "", 0,
                             "Ignoring response %(response)r: HTTP status code is not handled or not allowed",
                             ({"response": response},), None)


@pytest.mark.parametrize("kinds, expected", [
    (["gave up (status)"], [("retry/max_reached", 503, None)]),
    (["gave up (exception)", "download error"],  # one failure, logged twice by Scrapy: one dead letter
     [("retry/max_reached", None, "twisted.internet.error.ConnectionRefusedError")]),
    (["download error"], [("download_error", None, "twisted.internet.error.ConnectionRefusedError")]),
    (["gave up (status)", "ignored"], [("retry/max_reached", 503, None)]),
    (["ignored"], [("http_error", 404, None)]),
])
def test_dead_letters_are_read_from_scrapys_own_records_once_per_failure(kinds, expected):
    from scrapy import Request

    import monitors

    def parse(response):
        return None

    dead = monitors.DeadLetters(10)
    request = Request("https://u:pw@a.test/p?x=1", callback=parse, priority=3,
                      meta={"retry_times": 2, "job": 7, "download_slot": "a.test", "obj": object(), "_private": 1})
    for kind in kinds:
        dead.handle(scrapy_records(kind, request))
    taken = dead.take()
    assert [(d["reason"], d["status"], d["exception"]) for d in taken] == expected and dead.count == 1
    assert {k: taken[0][k] for k in ("url", "method", "retries", "meta", "callback", "priority")} == {
        "url": "https://u:pw@a.test/p?x=1", "method": "GET", "retries": 2, "meta": {"job": 7}, "callback": "parse",
        "priority": 3}
    dead.put_back(taken)  # a failed write keeps them for the next
    members = dead.members(dead.take(), "n1", 0.0)
    assert monitor_contract.DEAD_ID.match(members[0].split(" ", 1)[0]) and '"node":"n1"' in members[0]


def test_a_request_failing_again_at_a_freed_requests_address_is_a_dead_letter_again():
    """CPython gives a new object the address of one just freed: a dead letter requeued and failing again
    can be a request at its first failure's id, and is a failure of its own."""
    from scrapy import Request

    import monitors

    dead = monitors.DeadLetters(10)
    first = Request("http://a.test/p")
    address = id(first)
    dead.handle(scrapy_records("gave up (status)", first))
    del first
    again = [Request("http://a.test/p") for _ in range(1000)]  # held, so each is at an address of its own
    reused = [r for r in again if id(r) == address]
    assert reused, "no request took the freed address"
    dead.handle(scrapy_records("gave up (status)", reused[0]))
    dead.handle(scrapy_records("ignored", reused[0]))  # the same failure logged again: still one
    assert dead.count == 2 and [d["url"] for d in dead.take()] == ["http://a.test/p"] * 2
