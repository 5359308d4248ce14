"""Versions, deploy markers and like-for-like baselines (issue 21 §2): 20 nodes starting at once give one marker,
each kind of baseline, and a real crawl that reports its version, arguments, marker and rollups."""

import json
import threading

import pytest
import redis
import scrapy

import monitor_contract
import monitor_records
import monitors
import testbed
from main_spider import DistributedSpider
from monitor_contract import markers_key, run_record, write_marker, write_run
from monitor_rules import bad_run
from testbed import make_app
from testbed_servers import crawl_log

P = "scrapy"


def markers(client, spider="main_spider"):
    return [json.loads(m) for m in client.lrange(markers_key(P, spider), 0, -1)]


def test_twenty_nodes_starting_together_with_a_new_version_write_one_marker(redis_server, redis_client):
    barrier = threading.Barrier(20)
    clients = [redis.Redis(port=redis_server.port) for _ in range(20)]

    def start(client, i, version):
        with client.pipeline(transaction=False) as pipe:
            write_marker(pipe, P, "main_spider", version, 1_000_000 + i, f"node-{i}")
            barrier.wait(10)
            pipe.execute()

    for version in ("2.3", "2.4", "2.4"):  # a deploy, another, then a restart on the same version
        threads = [threading.Thread(target=start, args=(c, i, version)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    found = markers(redis_client)
    assert [m["version"] for m in found] == ["2.4", "2.3"]
    assert found[0]["node"].startswith("node-") and 1_000_000 <= found[0]["at"] < 1_000_020
    assert 0 < redis_client.ttl(markers_key(P, "main_spider")) <= monitor_contract.MARKERS_TTL
    for c in clients:
        c.close()


def seed(client, runs, start=1_000_000):
    """One finished run per ``(items, version, args_hash)``, oldest first, 100 s apart; returns the records
    as stored (with ``compare``), newest first."""
    for i, (items, version, args) in enumerate(runs):
        begin = start + i * 100
        snap = {"node": f"n{i}", "spider": "s", "start_time": begin, "timestamp": begin + 60, "items": items,
                "pages": 100, "errors": 0, "finish_reason": "finished", "status": "closed", "version": version,
                "args_hash": args}
        write_run(client, P, run_record(snap), begin, 1000)
    return monitor_records.read_runs(client, P, "s", 500)[0]


@pytest.mark.parametrize("history, of, baseline_runs, items_ratio", [
    # three earlier runs of this version and arguments: only they count (median 50)
    pytest.param([(10, "1", "a"), (50, "2", "a"), (40, "2", "a"), (60, "2", "a"), (999, "2", "b")],
                 "version", 3, 1.0, id="same-version-and-args"),
    # two of this version: not enough; the arguments' four runs (median of 10, 20, 40, 60 = 30)
    pytest.param([(10, "1", "a"), (20, "1", "a"), (40, "2", "a"), (60, "2", "a"), (999, "2", "b")],
                 "args", 4, round(50 / 30, 3), id="same-args"),
    # two with these arguments: every run (median of 10, 20, 500, 999 = 260)
    pytest.param([(10, "1", "b"), (20, "1", "b"), (500, "2", "a"), (999, "2", "a")],
                 "any", 4, round(50 / 260, 3), id="any"),
])
def test_a_run_is_compared_like_for_like_when_it_can_be(redis_client, history, of, baseline_runs, items_ratio):
    newest = seed(redis_client, history + [(50, "2", "a")])[0]
    assert newest["version"] == "2" and newest["args_hash"] == "a"
    assert newest["compare"]["baseline_of"] == of and newest["baseline_runs"] == baseline_runs
    assert newest["compare"]["items"] == items_ratio
    # the summary's baseline is for a run like the newest: with it, each history has 3 of version "2" and args "a"
    summary = monitor_records.runs_summary(redis_client, P, "s", 2_000_000)
    assert summary["baseline_of"] == "version" and summary["baseline_runs"] >= 3


def test_the_run_rule_says_which_baseline_it_used():
    class Cfg:
        ok_reasons, run_items_ratio = ["finished"], 0.5

    def why(of):
        return bad_run({"finish_reason": "finished", "compare": {"items": 0.3, "baseline_of": of}}, Cfg)

    assert why("version") == "items 30% of usual for this version and arguments (limit 50%)"
    assert why("args") == "items 30% of usual for these arguments (limit 50%)"
    assert why("any") == why(None) == "items 30% of usual (limit 50%)"


class Plain(scrapy.Spider):
    name = "plain"
    limit = "10"
    depth = None


class Versioned(Plain):
    version = "  7.1 "


@pytest.mark.parametrize("spider, configured, version", [
    pytest.param(Versioned(), "9.9", "9.9", id="setting-first"),
    pytest.param(Versioned(), None, "7.1", id="attribute"),
    pytest.param(DistributedSpider(), None, "VERSION_2.3", id="main-spider-reports-its-test-flag"),
])
def test_the_version_a_node_reports(spider, configured, version):
    assert monitors.spider_version(spider, configured) == version


def test_a_spider_without_a_version_reports_its_source_files_hash():
    import hashlib

    with open(__file__, "rb") as f:
        assert monitors.spider_version(Plain()) == hashlib.sha256(f.read()).hexdigest()[:12]


def test_the_arguments_hash_covers_names_and_values_and_hides_them():
    bare = monitors.args_hash(Plain())
    assert bare == monitors.args_hash(Plain(limit="10"))  # the class's own value: no argument
    books = monitors.args_hash(Plain(category="books"))
    assert len(books) == 12 and books not in (bare, monitors.args_hash(Plain(category="toys")))
    assert books != monitors.args_hash(Plain(genre="books"))
    assert monitors.args_hash(Plain(limit="5")) != bare
    assert monitors.args_hash(Plain(depth="3")) == bare  # a non-text class attribute: not an argument


def test_a_real_crawl_reports_version_and_arguments_marks_and_rolls_up(redis_client, redis_url, site, crawlers):
    proc = crawlers(env={"REDIS_URL": redis_url, "MONITOR_INTERVAL": "1"},
                    settings={"MAX_IDLE_TIME_BEFORE_CLOSE": 2}, args=("-a", "category=books"))
    redis_client.lpush("distributed:start_urls", json.dumps({"url": site.url}))
    assert proc.wait(120) == 0, crawl_log(proc)
    (run,) = monitor_records.read_runs(redis_client, P, "main_spider", 10)[0]
    assert run["version"] == "VERSION_2.3" and run["args_hash"] == monitors.args_hash(Plain(category="books"))
    assert [m["version"] for m in markers(redis_client)] == ["VERSION_2.3"]
    client = make_app(redis_url).test_client()
    week = client.get("/spiders/main_spider/history?days=7").get_json()
    hour = client.get("/spiders/main_spider/history?minutes=60").get_json()
    assert [m["version"] for m in week["markers"]] == [m["version"] for m in hour["markers"]] == ["VERSION_2.3"]
    assert sum(p["pages"] for p in week["points"]) == run["pages"] >= 41
    assert sum(p["items"] for p in week["points"]) == run["items"] == 40


def test_a_markers_key_of_another_type_never_fails_the_nodes_write(redis_client):
    redis_client.set(markers_key(P, "main_spider"), "hand-edited")
    with redis_client.pipeline(transaction=False) as pipe:
        write_marker(pipe, P, "main_spider", "2.5", 1_000_000, "a")
        monitor_contract.write_snapshot(pipe, P, testbed.snapshot("a"), 10)
        assert pipe.execute()[0] == 0
    assert redis_client.get(markers_key(P, "main_spider")) == b"hand-edited"
    assert redis_client.hget(monitor_contract.status_key(P), "a")
