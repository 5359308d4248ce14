"""Live and light at scale (issue 22, §3-§5): the alerter writes only what changed in at most three round trips,
an idle cluster answers 304, ``?fields=`` projects, Prometheus exports per spider by default."""

import json

import pytest

import monitor_alert_state
import monitor_contract
import testbed
from testbed import MB, T0, CountingConnection, report, wait_for

# ---------------------------------------------------------------------------- the lighter alerter


def alert_events(redis_client):
    """A subscription to every change of the alerter's keys (keyspace notifications on the private Redis)."""
    redis_client.config_set("notify-keyspace-events", "KA")
    sub = redis_client.pubsub()
    sub.psubscribe("__keyspace@0__:scrapy:alert:*")
    wait_for(lambda: sub.get_message(timeout=0.1) is not None, what="the subscription")
    return sub


def changed_keys(sub):
    """The alert keys written since the last call, up to the heartbeat every evaluation ends its write with."""
    keys = []

    def heartbeat_seen():
        while (message := sub.get_message(timeout=0.1)) is not None:
            keys.append(message["channel"].decode().rpartition(":alert:")[2])
        return "heartbeat" in keys

    wait_for(heartbeat_seen, what="the evaluation's write")
    return keys


def test_a_steady_alert_costs_no_write_and_an_evaluation_three_round_trips(make, redis_client):
    alerter = make("--for", "0", "--stall-seconds", "120")
    alerter.r.connection_pool.connection_class = CountingConnection
    sub = alert_events(redis_client)

    def evaluate(t, cpu):
        report(redis_client, "hot", T0 + t, cpu=cpu)
        report(redis_client, "stuck", T0 + t, pages=5, pages_per_min=0.0, queue_requests=10)
        if t == 0:
            report(redis_client, "down", T0 - 100)  # never reports again: its age grows
        before = CountingConnection.sends
        notes = alerter.run_once(T0 + t)
        return notes, CountingConnection.sends - before

    notes, _ = evaluate(0, 95.0)
    assert sorted((n["rule"], n["node"]) for n in notes) == [("cpu", "hot"), ("down", "down")]
    assert {"state", "stall", "outbox"} <= set(changed_keys(sub))
    notes, _ = evaluate(60, 96.0)  # stuck has stood still long enough... not yet (120 s)
    assert notes == []
    assert "state" not in changed_keys(sub)  # the hot node's CPU moved, the down node's age grew: no write
    notes, trips = evaluate(180, 97.0)
    assert [(n["rule"], n["node"]) for n in notes] == [("stalled", "stuck")]
    changed_keys(sub)
    notes, trips = evaluate(240, 98.0)
    assert notes == [] and trips <= 3  # lock and read in one, the queue forecast's histories, the write
    assert set(changed_keys(sub)) == {"lock", "heartbeat"}  # taken and released; no record or tracker written
    # /alerts derives the live figures from the snapshots: the CPU now, the down node's age, the stall's length
    alerts = {a["rule"]: a for a in monitor_alert_state.read_alerts(redis_client, "scrapy")["alerts"]}
    assert alerts["cpu"]["value"] == 98.0 and alerts["cpu"]["last_sent"] == T0
    # read_alerts judges on Redis's clock, years after the tests' made-up one: ages of years
    assert alerts["down"]["value"] > 10 ** 6 and alerts["stalled"]["value"] > 10 ** 6
    stored = json.loads(redis_client.hget("scrapy:alert:state", "cpu:hot"))
    assert stored["value"] == 95.0 and stored["summary"] == "host CPU 95% (limit 80%)"  # as it was sent


def test_the_alerter_reads_slim_snapshots_and_still_quotes_error_samples(make, redis_client, smtp):
    sample = {"time": T0, "logger": "scrapy.core.scraper", "message": "Spider error processing", "url": "http://x/1"}
    report(redis_client, "e1", T0, errors_per_min=50.0, error_samples=[sample], domains={"x": {"pages": 1}},
           fields={"title": 0.5, "url": 1.0}, fields_listed=True, items=500)
    slim = json.loads(redis_client.hget(monitor_contract.slim_key("scrapy"), "e1"))
    assert not monitor_contract.BIG_FIELDS & set(slim) and slim["fields_lowest"] == ["title", 0.5]
    # a node of an older extension writes only the status hash: read from there
    old = testbed.snapshot("old", now=T0, **{**testbed.QUIET, "rss": 3000 * MB})
    redis_client.hset(monitor_contract.status_key("scrapy"), "old", json.dumps(old))
    notes = make("--for", "0").run_once(T0)
    summaries = {(n["rule"], n["node"]): n["summary"] for n in notes}
    assert summaries[("errors", "e1")].endswith("; newest: scrapy.core.scraper: Spider error processing (http://x/1)")
    assert summaries[("coverage", "e1")] == "item field coverage 50% for field 'title' over 500 items (limit 90%)"
    assert ("rss", "old") in summaries
    record = json.loads(redis_client.hget("scrapy:alert:state", "errors:e1"))
    assert record["summary"] == summaries[("errors", "e1")]


@pytest.mark.parametrize("raw, ok", [
    ('{"spider":"s","timestamp":1,"pages":999999999999999999}', True),
    ('{"spider":"s","timestamp":1,"pages":1000000000000000000}', False),
    ('{"spider":"s","timestamp":1,"cpu":-1e18}', False),
    ('{"spider":"s","timestamp":1,"cpu":1e400}', False),
    ('{"spider":"s","timestamp":1,"command":{"id":[1,2,{"a":1e19}]}}', False),
    ('{"spider":"s","timestamp":1,"cpu":NaN}', False),
    ('{"spider":"s","timestamp":1,"fields_lowest":["t",0.5]}', True),
])
def test_the_snapshot_gate_bounds_every_number(raw, ok):
    assert (monitor_contract.decode_snapshot(raw) is not None) is ok
