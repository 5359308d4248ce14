"""Spider history for 7 and 90 days: write-time rollups against a real Redis, on a supplied clock (issue 21 §1)."""

import pytest

import monitor_contract
from monitor_contract import redis_now, rollup_key, write_snapshot
from monitor_read import read_rollups, rollup_point
from testbed import make_app, snapshot

WEEK = 7 * 86400


def write(client, snaps_at, previous):
    """Write each ``(snapshot, at)`` through the node's write path, ``previous`` holding each node's last
    rollup counts (updated)."""
    with client.pipeline(transaction=False) as pipe:
        for snap, at in snaps_at:
            node = snap["node"]
            previous[node] = write_snapshot(pipe, "scrapy", snap, 10, rollup=(at, previous.get(node, {})))
        pipe.execute()


def fill_week(client, now):
    """Two nodes over the last 1,008 10-minute buckets, three writes each per bucket (200 s apart, their
    interval): node a +10 pages, +5 items, +1 request per write and +1 error per bucket; node b the same
    without errors. Returns the buckets' starts."""
    last = int(now) // 600
    starts = [(last - i) * 600 for i in range(1007, -1, -1)]
    previous, counts = {}, {"a": [0, 0, 0, 0], "b": [0, 0, 0, 0]}
    batch = []
    for start in starts:
        for k, offset in enumerate((100, 300, 500)):
            for node in ("a", "b"):
                c = counts[node]
                c[0] += 10
                c[1] += 5
                c[2] += 1
                c[3] += 1 if node == "a" and k == 0 else 0
                snap = snapshot(node, now=start + offset, interval=200.0, pages=c[0], items=c[1], requests=c[2],
                                errors=c[3], queue_requests=start // 600 % 1000, latency_p95=round(0.1 * (k + 1), 1))
                batch.append((snap, start + offset))
        if len(batch) > 600:
            write(client, batch, previous)
            batch = []
    write(client, batch, previous)
    return starts


def test_a_week_of_10_minute_buckets_reads_1008_points_with_the_right_sums(redis_client, redis_url):
    now = redis_now(redis_client.time())
    starts = fill_week(redis_client, now)
    end = starts[-1] + 599  # the last bucket's end: every bucket's span is (almost) whole
    week = read_rollups(redis_client, "scrapy", "main_spider", 7, end)
    assert week["step"] == 600 and len(week["points"]) == 1008
    assert [p["timestamp"] for p in week["points"]] == starts
    for p in week["points"][:-1]:
        assert (p["pages"], p["items"], p["requests"], p["errors"]) == (60, 30, 6, 1)
        assert p["pages_per_min"] == 6.0 and p["errors_per_min"] == 0.1
        assert p["nodes"] == 2.0  # node-seconds: 2 nodes x 3 writes x 200 s over 600 s
        assert p["latency_p95"] == 0.3  # the max of the nodes' p95s
        assert p["queue_requests"] == p["timestamp"] // 600 % 1000
    assert sum(p["pages"] for p in week["points"]) == 1008 * 60

    hourly = read_rollups(redis_client, "scrapy", "main_spider", 90, end)
    assert hourly["step"] == 3600 and 168 <= len(hourly["points"]) <= 169 <= 2160
    assert sum(p["pages"] for p in hourly["points"]) == 1008 * 60
    assert sum(p["errors"] for p in hourly["points"]) == 1008
    assert all(p["timestamp"] % 3600 == 0 for p in hourly["points"])

    # Expiry: a 10-minute bucket lives 7 days past its end, an hourly one 90 days, on Redis's clock.
    oldest = redis_client.ttl(rollup_key("scrapy", "main_spider", 600, starts[0]))
    assert 0 < oldest <= starts[0] + 600 + WEEK - now + 1
    newest_hour = redis_client.ttl(rollup_key("scrapy", "main_spider", 3600, starts[-1] // 3600 * 3600))
    assert 90 * 86400 - 3600 < newest_hour <= 90 * 86400 + 3600

    # The API: the same points, through ?days=; the write-time figures need no node alive.
    c = make_app(redis_url).test_client()
    resp = c.get("/spiders/main_spider/history?days=7")
    assert resp.status_code == 200 and len(resp.get_json()["points"]) == 1008
    assert sum(p["pages"] for p in resp.get_json()["points"]) == 1008 * 60
    assert c.get("/spiders/main_spider/history?days=90").get_json()["step"] == 3600


def test_a_bucket_older_than_its_tier_is_gone_at_once_and_the_hourly_one_stays(redis_client):
    now = redis_now(redis_client.time())
    at = now - 8 * 86400
    write(redis_client, [(snapshot("a", now=at, pages=5), at)], {})
    assert not redis_client.exists(rollup_key("scrapy", "main_spider", 600, int(at) // 600 * 600))
    hour = rollup_key("scrapy", "main_spider", 3600, int(at) // 3600 * 3600)
    assert redis_client.hget(hour, "p") == b"5"
    assert 82 * 86400 - 3600 < redis_client.ttl(hour) <= 82 * 86400 + 3600


def test_gauges_combine_by_their_rule_whatever_order_writes_arrive_in(redis_client):
    start = int(redis_now(redis_client.time())) // 600 * 600
    previous = {}
    # node a reads the queue later than node b, but its write arrives first: the newest reading is kept
    write(redis_client, [(snapshot("a", now=start + 500, queue_requests=100, latency_p95=0.4, pages=0), start + 500)],
          previous)
    write(redis_client, [(snapshot("b", now=start + 300, queue_requests=50, latency_p95=1.5, pages=0), start + 300)],
          previous)
    write(redis_client, [(snapshot("a", now=start + 550, queue_requests=None, latency_p95=0.7, pages=7), start + 550)],
          previous)
    # a closed node's last write counts its pages, not its time
    write(redis_client, [(snapshot("c", now=start + 560, status="closed", pages=3, latency_p95=None,
                                     queue_requests=None), start + 560)],
          previous)
    (point,) = read_rollups(redis_client, "scrapy", "main_spider", 7, start + 600)["points"]
    assert point["queue_requests"] == 100 and point["latency_p95"] == 1.5
    assert point["pages"] == 10 and point["nodes"] == round(30 / 600, 2)
    # counters only grow by what was counted since the node's previous rollup; a reset counts nothing
    write(redis_client, [(snapshot("a", now=start + 590, pages=2), start + 590)], previous)
    (point,) = read_rollups(redis_client, "scrapy", "main_spider", 7, start + 600)["points"]
    assert point["pages"] == 10


def test_a_hand_edited_bucket_never_fails_the_nodes_write(redis_client):
    start = int(redis_now(redis_client.time())) // 600 * 600
    key = rollup_key("scrapy", "main_spider", 600, start)
    redis_client.hset(key, mapping={"p": "lots", "l": "slow", "qt": "soon"})
    write(redis_client, [(snapshot("a", now=start + 10, pages=4, latency_p95=0.2), start + 10)], {})
    assert redis_client.hget(monitor_contract.status_key("scrapy"), "a")  # the snapshot went in
    (point,) = read_rollups(redis_client, "scrapy", "main_spider", 7, start + 600)["points"]
    assert point["pages"] == 0 and point["latency_p95"] == 0.2 and point["queue_requests"] == 4321


def test_days_other_than_7_or_90_is_a_400_and_an_unknown_spider_a_404(redis_client, redis_url):
    c = make_app(redis_url).test_client()
    for days in ("30", "0", "7.0", "", "x"):
        resp = c.get(f"/spiders/main_spider/history?days={days}")
        assert resp.status_code == 400 and "days must be 7 or 90" in resp.get_json()["error"]
    resp = c.get("/spiders/nobody/history?days=7")
    assert resp.status_code == 404 and resp.is_json
    write(redis_client, [(snapshot("a"), redis_now(redis_client.time()))], {})
    assert c.get("/spiders/main_spider/history?minutes=60").get_json()["kind"] == "spider"


@pytest.mark.parametrize("values, expect", [
    pytest.param(["60", "30", "6", "1", "", "1200000", "42", "0.3"],
                 {"pages": 60, "pages_per_min": 6.0, "dead": 0, "nodes": 2.0, "queue_requests": 42, "latency_p95": 0.3},
                 id="whole-bucket"),
    pytest.param(["²", "-5", "1" * 19, "1e3", "x", "-1000", "4.5", "nan"],
                 {"pages": 0, "items": 0, "requests": 0, "errors": 0, "nodes": 0, "queue_requests": None,
                  "latency_p95": None}, id="hostile-values"),
    pytest.param(["1", "", "", "", "", "", "", "inf"], {"pages": 1, "latency_p95": None}, id="infinite-p95"),
    pytest.param(["1"], {"pages": 1, "items": 0, "nodes": 0, "queue_requests": None}, id="short-line"),
])
def test_rollup_point_reads_each_value_by_its_rule(values, expect):
    point = rollup_point(values, 6000, 600, 7000)
    assert {k: point[k] for k in expect} == expect


def test_a_value_holding_separators_does_not_shift_later_buckets(redis_client):
    start = int(redis_now(redis_client.time())) // 600 * 600 - 1200
    for i in range(3):
        write(redis_client, [(snapshot("a", now=start + i * 600, pages=10 * (i + 1)), start + i * 600)], {})
    redis_client.hset(rollup_key("scrapy", "main_spider", 600, start), "q", "1\n2,3")
    points = read_rollups(redis_client, "scrapy", "main_spider", 7, start + 1800)["points"]
    assert [p["pages"] for p in points] == [10, 20, 30] and points[0]["queue_requests"] == 123
