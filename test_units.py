"""Table-driven unit tests of the pure cores: the alert rules, the read side's arithmetic, fleet control on a
fake engine, the Redis contract's gate and helpers, and the settings parsers.

No Redis, no processes, no clock: every function here takes ``now`` (or needs none), so end-to-end tests need
not prove the arithmetic. Every environment variable of monitor_settings.SETTINGS is cleared for each test.
"""

import collections
import gzip
import itertools
import json
import math
import re
import time
import types

import pytest
from prometheus_client.utils import floatToGoString

import alert
import monitor_alert_state
import monitor_cache
import monitor_contract
import monitor_nodes
import monitor_prometheus
import monitor_read
import monitor_records
import monitor_rules
import monitor_settings
import monitor_snapshot
import monitors
import testbed
from monitor_contract import HISTORY_FIELDS
from monitor_rules import MIB, NODE_DOWN
from monitor_settings import ConfigError

NOW = 1_800_000_000.0


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No setting from the machine's environment leaks into a test."""
    for s in monitor_settings.SETTINGS:
        monkeypatch.delenv(s.name, raising=False)


def config(*argv):
    """alert.py's configuration from flags, as the alerter builds it (defaults for the rest)."""
    return alert.load_config(list(argv))


def snap(node="a", state="live", **fields):
    """A node's snapshot as readers hand it to the rules (with its derived ``state``)."""
    out = {"node": node, "spider": "s", "host": f"host-{node}", "timestamp": int(NOW), "seen": NOW,
           "interval": 10, "status": {"paused": "paused", "closed": "closed"}.get(state, "running"), "state": state}
    if state == "stale":
        out["seen"] = NOW - 100
    out.update(fields)
    return out


def firing(value=95, since=NOW - 500, fired=NOW - 400, sent=NOW - 400, **extra):
    return {"state": "firing", "since": since, "fired": fired, "sent": sent, "value": value, **extra}


def pending(since=NOW - 10):
    return {"state": "pending", "since": since}


# ============================================================================ monitor_rules.step

STEP_CFG = types.SimpleNamespace(for_seconds=120, repeat=3600)
FIRED = {"state": "firing", "since": 100, "fired": 220, "sent": 220, "value": 7}


@pytest.mark.parametrize("record, value, now, hold, expected, event", [
    pytest.param(None, None, 100, None, None, None, id="inactive-stays-inactive"),
    pytest.param(None, 5, 100, None, {"state": "pending", "since": 100}, None, id="inactive-to-pending"),
    pytest.param({"state": "pending", "since": 100}, 5, 219, None, {"state": "pending", "since": 100}, None,
                 id="pending-held-under-ALERT_FOR"),
    pytest.param({"state": "pending", "since": 100}, 7, 220, None, FIRED, "firing",
                 id="pending-to-firing-at-ALERT_FOR"),
    pytest.param({"state": "pending", "since": 100}, None, 150, None, None, None, id="pending-cleared-sends-nothing"),
    pytest.param(FIRED, 8, 220 + 3599, None, FIRED, None, id="firing-quiet-before-ALERT_REPEAT"),
    pytest.param(FIRED, 8, 220 + 3600, None, {**FIRED, "sent": 3820, "value": 8}, "firing",
                 id="firing-repeated-after-ALERT_REPEAT"),
    pytest.param(FIRED, None, 300, None, None, "resolved", id="firing-to-resolved"),
    pytest.param(FIRED, NODE_DOWN, 220 + 99999, None, FIRED, None, id="node-down-keeps-firing-no-repeat"),
    pytest.param({"state": "pending", "since": 100}, NODE_DOWN, 500, None, None, None, id="node-down-forgets-pending"),
    pytest.param(None, NODE_DOWN, 500, None, None, None, id="node-down-inactive-stays-inactive"),
    pytest.param({"state": "pending", "since": 100}, 5, 650, 600, {"state": "pending", "since": 100}, None,
                 id="hold-overrides-ALERT_FOR"),
    pytest.param({"state": "pending", "since": 100}, 5, 700, 600,
                 {"state": "firing", "since": 100, "fired": 700, "sent": 700, "value": 5}, "firing",
                 id="hold-reached-fires"),
])
def test_step(record, value, now, hold, expected, event):
    before = None if record is None else dict(record)
    assert monitor_rules.step(record, value, now, STEP_CFG, hold) == (expected, event)
    assert record == before  # the stored record is never modified in place


def test_step_fires_at_once_when_for_is_zero():
    cfg = types.SimpleNamespace(for_seconds=0, repeat=3600)
    assert monitor_rules.step(None, 3, 50, cfg) == (
        {"state": "firing", "since": 50, "fired": 50, "sent": 50, "value": 3}, "firing")


# ============================================================================ monitor_rules.evaluate

def evaluate(nodes, state=None, stall=None, now=NOW, cfg=None, silences=None, spiders=None):
    nodes = {s["node"]: s for s in nodes} if isinstance(nodes, list) else nodes
    return monitor_rules.evaluate(nodes, state or {}, stall or {}, now, cfg or config("--for", "0"),
                                  silences, spiders)


def fired_rules(notes, status="firing"):
    return [(n["rule"], n["node"]) for n in notes if n["status"] == status]


@pytest.mark.parametrize("argv, fields, expected", [
    pytest.param((), {"cpu": 95}, ["cpu"], id="cpu-over"),
    pytest.param((), {"cpu": 80}, [], id="cpu-at-limit-is-not-over"),
    pytest.param(("--cpu-percent", "0"), {"cpu": 95}, [], id="cpu-off-by-zero"),
    pytest.param(("--rules", "memory"), {"cpu": 95, "memory": 95}, ["memory"], id="cpu-off-by-ALERT_RULES"),
    pytest.param((), {"cpu": True}, [], id="bool-is-not-a-figure"),
    pytest.param((), {"cpu": "95"}, [], id="text-is-not-a-figure"),
    pytest.param((), {"memory": 90.5}, ["memory"], id="memory-over"),
    pytest.param((), {"errors_per_min": 31}, ["errors"], id="errors-over"),
    pytest.param((), {"rss": 2049 * MIB}, ["rss"], id="rss-over-in-MiB"),
    pytest.param((), {"rss": 2048 * MIB}, [], id="rss-at-limit"),
    pytest.param(("--rss-mb", "100"), {"rss": 101 * MIB}, ["rss"], id="rss-own-limit"),
    pytest.param((), {"latency_p95": 12.5}, ["latency"], id="latency-over"),
    pytest.param((), {"items": 100, "fields": {"title": 0.5, "url": 1.0}, "fields_listed": True}, ["coverage"],
                 id="coverage-low"),
    pytest.param((), {"items": 99, "fields": {"title": 0.5}, "fields_listed": True}, [],
                 id="coverage-judged-from-100-items"),
    pytest.param((), {"items": 500, "fields": {"title": 0.5}, "fields_listed": False}, [],
                 id="coverage-of-unlisted-fields-not-judged"),
    pytest.param((), {"cpu": 95, "latency_p95": 12, "memory": 95}, ["cpu", "memory", "latency"],
                 id="several-in-rule-order"),
])
def test_evaluate_thresholds(argv, fields, expected):
    changes, _, notes = evaluate([snap(**fields)], cfg=config("--for", "0", *argv))
    assert [rule for rule, _ in fired_rules(notes)] == expected
    assert sorted(k for k, v in changes.items() if v and v["state"] == "firing") == sorted(f"{r}:a" for r in expected)


def test_evaluate_firing_note_and_record():
    changes, _, notes = evaluate([snap(cpu=95.04)])
    note, = notes
    assert note == {
        "status": "firing", "rule": "cpu", "alertname": "ScrapyHostCpuHigh", "severity": "warning", "node": "a",
        "spider": "s", "host": "host-a", "value": 95.0, "threshold": 80.0, "summary": "host CPU 95% (limit 80%)",
        "repeat": False, "starts_at": monitor_rules.iso(NOW), "ends_at": None}
    record = changes["cpu:a"]
    assert record["state"] == "firing" and record["fired"] == NOW and record["notified"] is True
    assert record["silenced"] is None and record["threshold"] == 80.0 and record["spider"] == "s"


def test_evaluate_pending_under_alert_for_sends_nothing():
    changes, _, notes = evaluate([snap(cpu=95)], cfg=config("--for", "120"))
    assert notes == []
    assert changes["cpu:a"]["state"] == "pending" and changes["cpu:a"]["since"] == NOW
    changes, _, notes = evaluate([snap(cpu=95)], state={"cpu:a": changes["cpu:a"]}, now=NOW + 120,
                                 cfg=config("--for", "120"))
    assert fired_rules(notes) == [("cpu", "a")]


def test_evaluate_down_node_fires_down_only():
    changes, _, notes = evaluate([snap(state="stale", cpu=95, memory=99)])
    note, = notes
    assert (note["rule"], note["value"]) == ("down", 100)
    assert note["summary"] == "no report for 100 s (reports every 10 s)"
    assert set(changes) == {"down:a"}


def test_evaluate_down_node_keeps_firing_alerts_and_forgets_pending_ones():
    state = {"cpu:a": firing(alertname="ScrapyHostCpuHigh"), "memory:a": pending(), "down:a": firing(value=50)}
    changes, _, notes = evaluate([snap(state="stale", cpu=10)], state=state, now=NOW + 86400)
    cpu = changes.get("cpu:a", state["cpu:a"])
    assert (cpu["state"], cpu["sent"]) == ("firing", NOW - 400)  # neither resolved nor repeated
    assert changes["memory:a"] is None
    assert fired_rules(notes, "resolved") == []
    assert fired_rules(notes) == [("down", "a")]  # the down alert itself repeats
    assert notes[0]["repeat"] is True


def test_evaluate_down_rule_off_still_silences_the_node():
    changes, _, notes = evaluate([snap(state="stale", cpu=95)], state={"memory:a": pending()},
                                 cfg=config("--for", "0", "--rules", "cpu,memory"))
    assert notes == [] and changes == {"memory:a": None}


@pytest.mark.parametrize("argv, node, summary", [
    pytest.param((), snap(cpu=10), "back to normal: host CPU 10%", id="back-to-normal"),
    pytest.param((), snap(state="closed", cpu=95), "node closed", id="node-closed"),
    pytest.param((), None, "node gone from the status hash", id="node-gone"),
    pytest.param(("--rules", "memory"), snap(cpu=95), "rule turned off", id="rule-turned-off"),
    pytest.param(("--cpu-percent", "0"), snap(cpu=95), "rule turned off", id="threshold-zeroed"),
])
def test_evaluate_resolutions(argv, node, summary):
    state = {"cpu:a": firing(spider="s", host="host-a")}
    changes, _, notes = evaluate([node] if node else [], state=state, cfg=config("--for", "0", *argv))
    note, = notes
    assert (note["status"], note["rule"], note["node"]) == ("resolved", "cpu", "a")
    assert note["summary"] == f"{summary} after 6m40s"
    assert note["ends_at"] == monitor_rules.iso(NOW) and note["spider"] == ("s" if node else None)
    assert changes == {"cpu:a": None}


# ---------------------------------------------------------------------------- stall tracking

STALLING = dict(pages=10, pages_per_min=0, queue_requests=5)


@pytest.mark.parametrize("fields, previous, expected", [
    pytest.param(dict(STALLING, state="live"), None, [10, NOW], id="starts"),
    pytest.param(dict(STALLING, state="live"), [10, NOW - 100], [10, NOW - 100], id="kept-while-pages-stand"),
    pytest.param(dict(STALLING, state="live", pages=11), [10, NOW - 100], [11, NOW], id="restarts-when-pages-move"),
    pytest.param(dict(STALLING, state="live", pages_per_min=3), [10, NOW - 100], None, id="rising-clears"),
    pytest.param(dict(STALLING, state="live", queue_requests=0), None, None, id="empty-queue"),
    pytest.param(dict(STALLING, state="live", queue_requests=0, queue_start_urls=2), None, [10, NOW],
                 id="start-urls-count-as-work"),
    pytest.param({"state": "live", "pages": 10, "pages_per_min": 0}, None, None, id="no-scrapy-redis-queue"),
    pytest.param(dict(STALLING, state="paused"), [10, NOW - 100], None, id="paused"),
    pytest.param(dict(STALLING, state="stale"), [10, NOW - 100], None, id="stale"),
    pytest.param(dict(STALLING, state="closed"), [10, NOW - 100], None, id="closed"),
])
def test_track_stall(fields, previous, expected):
    assert monitor_rules.track_stall(snap(**fields), previous, NOW) == expected


def test_evaluate_stall_tracking_and_firing():
    cfg = config("--for", "0", "--stall-seconds", "300")
    _, stall, notes = evaluate([snap(**STALLING)], cfg=cfg)
    assert stall == {"a": [10, NOW]} and notes == []
    _, stall, notes = evaluate([snap(**STALLING)], stall={"a": [10, NOW - 299]}, cfg=cfg)
    assert stall == {} and notes == []  # unchanged tracker: nothing to store
    changes, stall, notes = evaluate([snap(**STALLING)], stall={"a": [10, NOW - 300]}, cfg=cfg)
    note, = notes
    assert (note["rule"], note["value"]) == ("stalled", 300)
    assert note["summary"] == "pages not rising for 300 s (limit 300 s), 5 requests queued"
    changes, stall, notes = evaluate([snap(**dict(STALLING, pages_per_min=2))], state=changes,
                                     stall={"a": [10, NOW - 300]}, cfg=cfg)
    assert stall == {"a": None} and fired_rules(notes, "resolved") == [("stalled", "a")]


@pytest.mark.parametrize("argv, nodes", [
    pytest.param(("--stall-seconds", "0"), [snap(**STALLING)], id="rule-off-drops-trackers"),
    pytest.param(("--rules", "cpu"), [snap(**STALLING)], id="rule-not-listed-drops-trackers"),
    pytest.param((), [], id="gone-node-drops-its-tracker"),
])
def test_evaluate_stall_trackers_dropped(argv, nodes):
    _, stall, _ = evaluate(nodes, stall={"a": [10, NOW - 50]}, cfg=config("--for", "0", *argv))
    assert stall == {"a": None}


# ---------------------------------------------------------------------------- spider-level queue rule

def view(**fields):
    return {"spider": "s", "queue_rate": 12.0, "nodes_live": 1, "queue_requests": 500, **fields}


@pytest.mark.parametrize("fields", [
    pytest.param({}, id="growing"),
    pytest.param({"queue_rate": 0.5}, id="slowly-growing"),
])
def test_queue_rule_holds_for_its_own_threshold_not_alert_for(fields):
    cfg = config("--for", "0", "--queue-growing", "1800")
    changes, _, notes = evaluate([], spiders={"s": view(**fields)}, cfg=cfg)
    assert notes == [] and changes["queue:s"]["state"] == "pending"
    changes, _, notes = evaluate([], state=changes, spiders={"s": view(**fields)}, now=NOW + 1799, cfg=cfg)
    assert notes == [] and "queue:s" not in changes
    changes, _, notes = evaluate([], state={"queue:s": pending(NOW - 1800)}, spiders={"s": view(**fields)}, cfg=cfg)
    note, = notes
    assert (note["rule"], note["node"], note["alertname"]) == ("queue", "s", "ScrapyQueueGrowing")
    assert note["summary"] == (f"queue growing by {monitor_rules.fmt(view(**fields)['queue_rate'])}/min for 30m00s "
                               "or more, 500 requests queued")


@pytest.mark.parametrize("fields", [
    pytest.param({"nodes_live": 0}, id="no-live-node"),
    pytest.param({"queue_rate": 0}, id="steady"),
    pytest.param({"queue_rate": -30.0}, id="draining"),
    pytest.param({"queue_rate": None}, id="no-forecast"),
])
def test_queue_rule_not_holding_clears_pending(fields):
    changes, _, notes = evaluate([], state={"queue:s": pending()}, spiders={"s": view(**fields)})
    assert changes == {"queue:s": None} and notes == []


def test_queue_rule_left_alone_without_views_resolved_when_spider_gone():
    state = {"queue:s": firing(value=12.0)}
    assert evaluate([], state=state, spiders=None) == ({}, {}, [])
    changes, _, notes = evaluate([], state=state, spiders={})
    assert changes == {"queue:s": None} and fired_rules(notes, "resolved") == [("queue", "s")]


def test_queue_rule_off_resolves():
    changes, _, notes = evaluate([], state={"queue:s": firing(value=12.0)}, spiders={"s": view()},
                                 cfg=config("--queue-growing", "0"))
    assert changes == {"queue:s": None}
    assert [n["summary"] for n in notes] == ["rule turned off after 6m40s"]


# ---------------------------------------------------------------------------- silences

def silence(**matchers):
    return {"matchers": matchers, "until": NOW + 3600}


@pytest.mark.parametrize("matchers, silenced", [
    pytest.param({"node": "a"}, True, id="by-node"),
    pytest.param({"spider": "s"}, True, id="by-spider"),
    pytest.param({"host": "host-a"}, True, id="by-host"),
    pytest.param({"rule": "cpu"}, True, id="by-rule"),
    pytest.param({"spider": "s", "rule": "cpu"}, True, id="all-matchers-match"),
    pytest.param({"node": "b"}, False, id="other-node"),
    pytest.param({"spider": "s", "rule": "memory"}, False, id="one-matcher-differs"),
    pytest.param({"rule": "cpu", "host": "host-b"}, False, id="host-differs"),
])
def test_silence_index(matchers, silenced):
    index = monitor_rules.SilenceIndex({"s1": silence(**matchers), "s2": silence(node="zzz")})
    labels = {"node": "a", "rule": "cpu", "spider": "s", "host": "host-a"}
    assert index.match(labels) == ("s1" if silenced else None)


def test_silence_index_empty_is_false():
    assert not monitor_rules.SilenceIndex({}) and monitor_rules.SilenceIndex({"x": silence(node="a")})


def test_fired_under_silence_is_sent_when_the_silence_ends():
    silences = {"s1": silence(spider="s")}
    changes, _, notes = evaluate([snap(cpu=95)], silences=silences)
    assert notes == []
    record = changes["cpu:a"]
    assert (record["state"], record["notified"], record["silenced"]) == ("firing", False, "s1")
    # still silenced: still quiet, even past ALERT_REPEAT
    later, _, notes = evaluate([snap(cpu=96)], state={"cpu:a": record}, now=NOW + 20000, silences=silences)
    assert notes == [] and later.get("cpu:a", record)["notified"] is False
    # the silence ends while it still fires: sent now, once
    changes, _, notes = evaluate([snap(cpu=97)], state={"cpu:a": record}, now=NOW + 60)
    assert fired_rules(notes) == [("cpu", "a")] and notes[0]["summary"] == "host CPU 97% (limit 80%)"
    record = changes["cpu:a"]
    assert (record["notified"], record["silenced"], record["sent"]) == (True, None, NOW + 60)
    _, _, notes = evaluate([snap(cpu=97)], state={"cpu:a": record}, now=NOW + 120)
    assert notes == []


def test_fired_under_silence_and_over_before_it_ends_sends_nothing():
    silences = {"s1": silence(node="a")}
    changes, _, _ = evaluate([snap(cpu=95)], silences=silences)
    changes, _, notes = evaluate([snap(cpu=10)], state=changes, now=NOW + 60)
    assert notes == [] and changes == {"cpu:a": None}


def test_resolution_under_silence_is_not_sent_and_repeats_are_held():
    record = firing(notified=True, spider="s", host="host-a")
    silences = {"s1": silence(rule="cpu")}
    changes, _, notes = evaluate([snap(cpu=95)], state={"cpu:a": record}, now=NOW + 86400, silences=silences)
    assert notes == [] and changes["cpu:a"]["silenced"] == "s1"
    changes, _, notes = evaluate([snap(cpu=10)], state={"cpu:a": record}, silences=silences)
    assert notes == [] and changes == {"cpu:a": None}


def test_silence_of_another_node_does_not_hold_back():
    _, _, notes = evaluate([snap(cpu=95), snap(node="b", cpu=99)], silences={"s1": silence(node="b")})
    assert fired_rules(notes) == [("cpu", "a")]


def test_malformed_stored_silence_is_skipped_not_fatal():
    """parse_silences promises to skip malformed entries; one whose matcher is a list must not crash every
    evaluation after it (SilenceIndex hashes matcher values)."""
    raw = {b"bad": json.dumps({"matchers": {"node": ["a"]}, "until": NOW + 3600}),
           b"good": json.dumps({"matchers": {"node": "b"}, "until": NOW + 3600})}
    active, _ = monitor_alert_state.parse_silences(raw, NOW)
    _, _, notes = evaluate([snap(cpu=95), snap(node="b", cpu=95)], silences=active)
    assert fired_rules(notes) == [("cpu", "a")]


# ============================================================================ run alerts

RUN_CFG = types.SimpleNamespace(ok_reasons=list(monitor_settings.OK_REASONS), run_items_ratio=0.5)


@pytest.mark.parametrize("record, ok, ratio, expected", [
    pytest.param({"finish_reason": "finished"}, None, None, None, id="finished"),
    pytest.param({"finish_reason": "shutdown"}, None, None, None, id="shutdown"),
    pytest.param({"finish_reason": "drained"}, None, None, None, id="drained"),
    pytest.param({"finish_reason": "lost"}, None, None, "lost: no report for MONITOR_LOST_AFTER, never closed",
                 id="lost"),
    pytest.param({"finish_reason": "lost"}, ["*"], None, "lost: no report for MONITOR_LOST_AFTER, never closed",
                 id="lost-even-when-every-reason-is-ok"),
    pytest.param({"finish_reason": "cancelled"}, None, None, "ended cancelled", id="reason-not-ok"),
    pytest.param({"finish_reason": "Finished"}, None, None, "ended Finished", id="reasons-are-case-sensitive"),
    pytest.param({"finish_reason": "closespider_timeout"}, None, None, "ended closespider_timeout",
                 id="closespider-not-ok-by-default"),
    pytest.param({"finish_reason": "closespider_timeout"}, ["finished", "closespider_*"], None, None,
                 id="closespider-glob-ok"),
    pytest.param({"finish_reason": "closespider_errorcount"}, ["closespider_timeout"], None,
                 "ended closespider_errorcount", id="closespider-other-pattern"),
    pytest.param({"finish_reason": "closespider_pagecount"}, ["closespider_?agecount"], None, None,
                 id="question-mark-glob"),
    pytest.param({"finish_reason": "finished", "compare": {"items": 0.3}}, None, None,
                 "items 30% of usual (limit 50%)", id="items-below-ratio"),
    pytest.param({"finish_reason": "finished", "compare": {"items": 0.5}}, None, None, None, id="items-at-ratio"),
    pytest.param({"finish_reason": "finished", "compare": {"items": 0.3}}, None, 0, None, id="ratio-zero-never"),
    pytest.param({"finish_reason": "finished", "compare": {"items": 0.7}}, None, 0.8,
                 "items 70% of usual (limit 80%)", id="own-ratio"),
    pytest.param({"finish_reason": "finished", "compare": None}, None, None, None, id="no-baseline"),
    pytest.param({"finish_reason": "finished", "compare": {}}, None, None, None, id="no-items-figure"),
    pytest.param({"finish_reason": "finished", "compare": {"items": True}}, None, None, None, id="bool-ratio-ignored"),
    pytest.param({"finish_reason": "cancelled", "compare": {"items": 0.1}}, None, None, "ended cancelled",
                 id="reason-before-ratio"),
])
def test_bad_run(record, ok, ratio, expected):
    cfg = types.SimpleNamespace(ok_reasons=ok if ok is not None else RUN_CFG.ok_reasons,
                                run_items_ratio=ratio if ratio is not None else RUN_CFG.run_items_ratio)
    assert monitor_rules.bad_run(record, cfg) == expected


def run(reason, seq_node="n", **fields):
    return {"node": seq_node, "spider": "s", "host": "h", "finish_reason": reason, "end_time": int(NOW),
            "duration": 100, "pages": 10, "items": 2, "errors": 1, **fields}


def test_run_alerts_judges_runs_after_the_cursor_in_order():
    recent = [(8, run("lost", "n8")), (4, run("cancelled", "n4")), (7, run("finished", "n7")),
              (6, run("closespider_timeout", "n6"))]
    notes, cursor = monitor_rules.run_alerts(recent, 5, config())
    assert cursor == 8
    assert [(n["node"], n["value"]) for n in notes] == [("n6", "closespider_timeout"), ("n8", "lost")]
    note = notes[0]
    assert note == {"status": "firing", "rule": "run", "alertname": "ScrapyRunFailed", "severity": "warning",
                    "node": "n6", "spider": "s", "host": "h", "value": "closespider_timeout", "threshold": None,
                    "summary": "run ended closespider_timeout; 10 pages, 2 items, 1 errors in 1m40s",
                    "repeat": False, "starts_at": monitor_rules.iso(NOW), "ends_at": None}


@pytest.mark.parametrize("recent, cursor, argv, expected_cursor", [
    pytest.param([(3, run("cancelled")), (9, run("lost"))], None, (), 9, id="first-evaluation-sends-nothing"),
    pytest.param([], None, (), 0, id="first-evaluation-no-runs"),
    pytest.param([], 12, (), 12, id="no-runs-keeps-cursor"),
    pytest.param([(3, run("cancelled"))], 12, (), 12, id="cursor-never-goes-back"),
    pytest.param([(13, run("cancelled"))], 12, ("--rules", "cpu"), 13, id="run-rule-off-moves-cursor"),
])
def test_run_alerts_sends_nothing(recent, cursor, argv, expected_cursor):
    assert monitor_rules.run_alerts(recent, cursor, config(*argv)) == ([], expected_cursor)


# ============================================================================ monitor_read.combine

ROWS = [{"host": "h1", "timestamp": 10}, {"host": "h1", "timestamp": 20}, {"host": "h2", "timestamp": 15}]


def test_spider_fields_rule_kinds_are_the_known_ones():
    assert set(monitor_read.SPIDER_FIELDS.values()) == {"sum", "host_sum", "host_mean", "newest", "max"}
    assert set(HISTORY_FIELDS) - {"timestamp"} <= set(monitor_read.SPIDER_FIELDS)  # every chart column combines
    assert monitor_read.CRAWLING_FIELDS <= set(monitor_read.SPIDER_FIELDS)


@pytest.mark.parametrize("field, values, expected", [
    pytest.param("pages", [1, 2, 3], 6, id="sum-ints-stay-int"),
    pytest.param("pages", [10 ** 17, 10 ** 17, 1], 2 * 10 ** 17 + 1, id="sum-large-ints-exact"),
    pytest.param("pages_per_min", [1.5, 2.25, 0.25], 4.0, id="sum-floats"),
    pytest.param("rss", [1, 2.5, 3], 6.5, id="sum-mixed"),
    pytest.param("requests", [0.1, 0.2, 0.004], 0.3, id="sum-rounded-2-places"),
    pytest.param("errors", [1, None, "3"], 1, id="sum-skips-non-numbers"),
    pytest.param("items", [True, 2, False], 2, id="sum-bools-not-numbers"),
    pytest.param("items", [None, "x", True], None, id="sum-none-without-a-number"),
    pytest.param("bytes_sent", [100, 150, 50], 200, id="host_sum-newest-row-per-host"),
    pytest.param("net_recv_rate", [1.0, 2.5, 0.25], 2.75, id="host_sum-floats"),
    pytest.param("bytes_recv", [100, None, 50], 50, id="host_sum-host-newest-row-without-figure"),
    pytest.param("cpu", [10, 50, 70], 60.0, id="host_mean-newest-row-per-host"),
    pytest.param("memory", [0, 1 / 3, 0], 0.17, id="host_mean-rounded"),
    pytest.param("cpu", [None, None, None], None, id="host_mean-none"),
    pytest.param("queue_requests", [5, 7, 9], 7, id="newest-by-timestamp-not-position"),
    pytest.param("queue_dupefilter", [5, None, 9], 9, id="newest-with-a-number"),
    pytest.param("queue_start_urls", [False, False, False], None, id="newest-bools-not-numbers"),
    pytest.param("latency_p95", [1.5, 0.2, 3], 3, id="max"),
    pytest.param("latency_p95", [1.5, None, 0.25], 1.5, id="max-skips-none"),
])
def test_combine(field, values, expected):
    rows = [dict(row, **{field: v}) for row, v in zip(ROWS, values) if v is not None]
    rows += [row for row, v in zip(ROWS, values) if v is None]
    out = monitor_read.combine(rows, [field])
    assert out == {field: expected}
    assert type(out[field]) is type(expected)


def test_combine_hosts_argument_overrides_row_hosts():
    rows = [{"timestamp": 1, "cpu": 10}, {"timestamp": 2, "cpu": 30}, {"timestamp": 3, "cpu": 80}]
    assert monitor_read.combine(rows, ["cpu"], ["x", "y", "y"]) == {"cpu": 45.0}
    assert monitor_read.combine(rows, ["cpu"], ["x", "y", "z"]) == {"cpu": 40.0}


@pytest.mark.parametrize("values, expected", [
    pytest.param([], [], id="empty"),
    pytest.param([1, 2.5, None, "3", True, False, -4], [1, 2.5, -4], id="ints-and-floats-in-order"),
    pytest.param((None, [1], {"a": 1}), [], id="none"),
])
def test_numbers(values, expected):
    assert monitor_read.numbers(values) == expected


@pytest.mark.parametrize("times, newest", [
    pytest.param([3, 1, 2.5], 0, id="gated"),
    pytest.param([3, None, 2], 0, id="missing-counts-0"),
    pytest.param([3, "x", 1, True], 0, id="non-numbers-count-0"),
    pytest.param([2, math.inf, 1], 0, id="infinity-counts-0"),
    pytest.param([2, 1, 2, 1], 2, id="equal-times-the-later-node"),
    pytest.param([None, "x"], 1, id="none-a-number-the-later-node"),
])
def test_a_spider_view_reads_its_nodes_in_time_order(times, newest):
    nodes = {f"n{i}": {"spider": "s", "state": "live", "timestamp": t, "queue_requests": i, "host": f"h{i}"}
             for i, t in enumerate(times)}
    view = monitor_read.cluster_view(nodes, "s")
    assert view["queue_requests"] == newest  # the newest node's reading
    assert view["timestamp"] == int(max(monitor_read.number(t, 0) for t in times))


@pytest.mark.parametrize("nodes, chosen, rows", [
    pytest.param({}, {}, 0, id="none"),
    pytest.param({"b": ("s", "live", 5, 10), "a": ("s", "paused", 5, 10), "c": ("s", "live", 1, 5)},
                 {"s": "c"}, 62, id="started-first-shortest-interval-rows"),
    pytest.param({"b": ("s", "live", 5, 10), "a": ("s", "live", 5, 10), "z": ("t", "stale", 0, 10)},
                 {"s": "a"}, 32, id="tie-lowest-id-not-crawling-left-out"),
])
def test_forecast_nodes(nodes, chosen, rows):
    nodes = {n: {"spider": sp, "state": st, "start_time": start, "interval": interval}
             for n, (sp, st, start, interval) in nodes.items()}
    assert monitor_read.forecast_nodes(nodes) == (chosen, rows)


@pytest.mark.parametrize("changes", [
    pytest.param({}, id="unchanged"),
    pytest.param({"b": {"cpu": 10, "pages": 99}}, id="one-node-reported"),
    pytest.param({"a": {"state": "stale"}, "c": {"timestamp": int(NOW) + 5, "queue_requests": 1}}, id="two"),
    pytest.param({"d": {}}, id="a-node-came"),
])
def test_spiders_view_memo_and_row_cache_give_the_fresh_figures(changes):
    nodes = {n: snap(n, pages=i, cpu=10.0 * i, pages_per_min=i, queue_requests=5 - i, rss=i, latency_p95=i / 10)
             for i, n in enumerate("abc")}
    memo = {}
    assert monitor_read.spiders_view(nodes, now=NOW, memo=memo) == monitor_read.spiders_view(nodes, now=NOW)
    nodes = dict(nodes)
    for n, fields in changes.items():
        nodes[n] = {**nodes.get(n, snap(n)), **fields}  # a new object, as a reader makes for a changed value
    assert monitor_read.spiders_view(nodes, now=NOW, memo=memo) == monitor_read.spiders_view(nodes, now=NOW)


# ---------------------------------------------------------------------------- Prometheus values

@pytest.mark.parametrize("value", [
    0, 1, -1, 7, 999_999, 1_000_000, 1_000_001, 150_000_000, 1_700_000_000, -12_345_678, 2 ** 53 - 1, 2 ** 53,
    2 ** 53 + 1, 10 ** 16, 10 ** 20, 0.0, -0.0, 0.125, 0.3, 1e-7, 12.5, 123_456.75, 1_234_567.0, 12_345_678.9,
    -12_345_678.9, 1e16, 1e22, 1.5e300, math.inf, -math.inf])
def test_prometheus_values_are_written_as_prometheus_client_writes_them(value):
    assert monitor_prometheus._value(value) == floatToGoString(value)


# ---------------------------------------------------------------------------- cluster_view

def view_nodes():
    return {
        "a": snap("a", "live", timestamp=100, cpu=50, pages=10, pages_per_min=6, latency_p95=1.0, rss=100),
        "b": snap("b", "paused", timestamp=110, cpu=70, pages=20, pages_per_min=4, latency_p95=2.0, rss=200),
        "c": snap("c", "stale", timestamp=50, cpu=90, pages=30, pages_per_min=100, latency_p95=9.0, rss=400),
        "d": snap("d", "closed", timestamp=120, cpu=10, pages=40, pages_per_min=50, queue_requests=0, rss=800),
        "e": dict(snap("e", "live", pages=1000, cpu=1), spider="other"),
    }


def test_cluster_view_counts_states_and_rates_only_crawling_nodes():
    v = monitor_read.cluster_view(view_nodes(), "s")
    assert {k: v[k] for k in ("nodes_live", "nodes_paused", "nodes_stale", "nodes_closed")} == {
        "nodes_live": 1, "nodes_paused": 1, "nodes_stale": 1, "nodes_closed": 1}
    assert sorted(v["nodes"]) == ["a", "b", "c", "d"]
    assert v["pages"] == 100  # counters: every node, closed and stale too
    assert v["pages_per_min"] == 10  # rates: live and paused only
    assert v["cpu"] == 60.0 and v["rss"] == 300 and v["latency_p95"] == 2.0  # gauges: crawling nodes
    assert v["timestamp"] == 120 and v["queue_requests"] == 0 and v["spider"] == "s"


def test_cluster_view_without_crawling_nodes():
    nodes = {n: s for n, s in view_nodes().items() if n in ("c", "d")}
    v = monitor_read.cluster_view(nodes, "s")
    assert v["pages_per_min"] == 0 and v["items_per_min"] == 0  # nothing per minute, not None
    assert v["cpu"] == 50.0 and v["rss"] == 1200  # gauges fall back to every node
    assert v["nodes_live"] == 0 and v["nodes_stale"] == 1


def test_cluster_view_of_unknown_spider_is_none():
    assert monitor_read.cluster_view(view_nodes(), "nobody") is None


def test_spiders_view_one_view_per_spider_with_sorted_node_ids():
    views = monitor_read.spiders_view(view_nodes())
    assert list(views) == ["other", "s"]
    assert views["s"]["nodes"] == ["a", "b", "c", "d"] and views["other"]["pages"] == 1000


# ---------------------------------------------------------------------------- spider_points

def hrow(ts, **fields):
    return {f: fields.get(f) for f in HISTORY_FIELDS} | {"timestamp": ts}


def points(series, holds, last, step=10, before=None):
    hosts = {n: f"h-{n}" for n in series}
    return monitor_read.spider_points(series, holds, hosts, step, last, before)


def brief(pts, *fields):
    return [(p["timestamp"], p["nodes"], *(p[f] for f in fields)) for p in pts]


def test_spider_points_fill_buckets_and_hold_a_nodes_last_row():
    series = {"a": [hrow(0, pages=10, pages_per_min=6), hrow(20, pages=30, pages_per_min=6)],
              "b": [hrow(0, pages=5, pages_per_min=3)]}
    pts = points(series, {"a": 30, "b": 10}, last=5)
    assert brief(pts, "pages", "pages_per_min") == [
        (0, 2, 15, 9), (10, 2, 15, 9),  # b's row held one bucket more (its hold)
        (20, 1, 35, 6), (30, 1, 35, 6), (40, 1, 35, 6), (50, 1, 35, 6)]  # b stopped: its pages still count


def test_spider_points_stop_at_last_and_at_hold():
    series = {"a": [hrow(0, pages=1, cpu=50)]}
    assert [p["timestamp"] for p in points(series, {"a": 20}, last=9)] == [0, 10, 20]  # holds / step + 1
    assert [p["timestamp"] for p in points(series, {"a": 200}, last=3)] == [0, 10, 20, 30]


def test_spider_points_newest_row_of_a_bucket_wins():
    series = {"a": [hrow(0, pages=1, cpu=10), hrow(5, pages=2, cpu=30)]}
    assert brief(points(series, {"a": 10}, last=0), "pages", "cpu") == [(0, 1, 2, 30.0)]


def test_spider_points_gap_longer_than_hold():
    series = {"a": [hrow(0, pages=1, pages_per_min=6), hrow(50, pages=9, pages_per_min=6)],
              "b": [hrow(t, pages=100, pages_per_min=1) for t in range(0, 60, 10)]}
    pts = points(series, {"a": 10, "b": 10}, last=5)
    assert brief(pts, "pages", "pages_per_min") == [
        (0, 2, 101, 7), (10, 2, 101, 7), (20, 1, 101, 1), (30, 1, 101, 1), (40, 1, 101, 1), (50, 2, 109, 7)]


def test_spider_points_nodes_before_the_window_count_their_counters_only():
    series = {"a": [hrow(0, pages=10, pages_per_min=6)]}
    before = {"c": {"pages": 100, "items": 7, "pages_per_min": 50, "cpu": 99}}
    pts = points(series, {"a": 10}, last=1, before=before)
    assert brief(pts, "pages", "items", "pages_per_min", "cpu") == [(0, 1, 110, 7, 6, None), (10, 1, 110, 7, 6, None)]


def test_spider_points_empty():
    assert points({}, {}, last=5) == []
    assert points({"a": []}, {"a": 10}, last=5) == []


# ---------------------------------------------------------------------------- queue_forecast

def qrows(*pairs):
    return [{"timestamp": t, "queue_requests": q} for t, q in pairs]


@pytest.mark.parametrize("rows, expected", [
    pytest.param(qrows((0, 100), (10, 90), (20, 80)), (-60.0, 80), id="draining"),
    pytest.param(qrows((0, 10), (10, 20), (20, 30)), (60.0, None), id="filling"),
    pytest.param(qrows((0, 20), (10, 20), (20, 20)), (0.0, None), id="steady"),
    pytest.param(qrows((0, 50), (10, 0), (20, 10), (30, 20)), (60.0, None), id="refill-after-empty-is-a-new-batch"),
    pytest.param(qrows((0, 30), (10, 20), (20, 10), (30, 0)), (-60.0, 0), id="drained-to-empty"),
    pytest.param(qrows((0, 10), (10, 50), (20, 40), (30, 30)), (-60.0, 30), id="from-the-peak-on"),
    pytest.param(qrows((0, 10), (10, 20), (20, 50)), (120.0, None), id="peak-is-newest-reading"),
    pytest.param(qrows((0, 50), (10, 0), (20, 10)), (None, None), id="one-reading-since-empty"),
    pytest.param(qrows((0, 100)), (None, None), id="one-reading"),
    pytest.param([], (None, None), id="no-reading"),
    pytest.param(qrows((5, 100), (5, 80)), (None, None), id="same-timestamp"),
    pytest.param(qrows((0, 100), (10, None), (20, "x"), (30, True), (40, 80)), (-30.0, 160),
                 id="non-numbers-skipped"),
])
def test_queue_forecast(rows, expected):
    assert monitor_read.queue_forecast(rows) == {"queue_rate": expected[0], "queue_eta": expected[1]}


# ---------------------------------------------------------------------------- baseline

def past(items=None, reason="finished", **fields):
    return {"finish_reason": reason, "items": items, **fields}


@pytest.mark.parametrize("records, field, median, used", [
    pytest.param([past(10), past(30), past(20)], "items", 20, 3, id="odd-median"),
    pytest.param([past(10), past(40), past(30), past(20)], "items", 25, 4, id="even-median"),
    pytest.param([past(1000, "lost"), past(10), past(20), past(30)], "items", 20, 3, id="lost-runs-skipped"),
    pytest.param([past(100)] * 10 + [past(1)] * 5, "items", 100, 10, id="first-10-runs-only"),
    pytest.param([past(10), past(None), past(30)], "items", None, 3, id="field-with-fewer-than-3-figures"),
    pytest.param([past(1, pages=10, errors=1), past(1, pages=10, errors=5), past(1, pages=0, errors=5),
                  past(1, pages=20, errors=2)], "error_ratio", 0.1, 4, id="error-ratio-errors-per-page"),
    pytest.param([past(1, duration=60), past(1, duration=120), past(1, duration=600)], "duration", 120, 3,
                 id="duration"),
])
def test_baseline(records, field, median, used):
    medians, count, of = monitor_records.baseline(records)
    assert of == "any"
    assert count == used
    assert medians[field] == median
    assert set(medians) == set(monitor_records.COMPARED)


@pytest.mark.parametrize("records", [
    pytest.param([], id="none"),
    pytest.param([past(10), past(20)], id="two"),
    pytest.param([past(10), past(20), past(30, "lost"), past(40, "lost")], id="two-not-lost"),
])
def test_baseline_needs_three_runs(records):
    medians, used, _ = monitor_records.baseline(records)
    assert medians is None and used == len([r for r in records if r["finish_reason"] != "lost"])


# ---------------------------------------------------------------------------- run_bound

RID = "01700000000-01699990000-0123456789ab"


@pytest.mark.parametrize("before, expected", [
    pytest.param(None, "+", id="none-newest"),
    pytest.param("", "+", id="empty-newest"),
    pytest.param(RID, f"({RID} ", id="cursor"),
    pytest.param("1700000000", "(01700000000", id="unix-seconds-padded"),
    pytest.param("0", "(00000000000", id="zero"),
    pytest.param("99999999999", "(99999999999", id="eleven-digits"),
    pytest.param("100000000000", None, id="twelve-digits"),
    pytest.param("-5", None, id="negative"),
    pytest.param("1.5", None, id="fraction"),
    pytest.param("abc", None, id="text"),
    pytest.param("\u0661\u0662", None, id="non-ascii-digits"),
    pytest.param(RID.upper(), None, id="cursor-uppercase-hex"),
    pytest.param(RID + "0", None, id="cursor-too-long"),
])
def test_run_bound(before, expected):
    assert monitor_records.run_bound(before) == expected


def test_run_bound_excludes_the_cursor_and_newer_runs():
    """Members are ``<id> <json>`` in a score-0 sorted set: the bound sorts after every older member and
    before the cursor's own member and every newer one, byte by byte as Redis compares them."""
    older = "01699999999-01699990000-ffffffffffff {}"
    own = f"{RID} " + "{}"
    same_end_newer_start = "01700000000-01699990001-000000000000 {}"
    bound = monitor_records.run_bound(RID)[1:]
    assert older < bound < own < same_end_newer_start
    seconds = monitor_records.run_bound("1700000000")[1:]
    assert older < seconds < own  # runs that ended before that second only


# ============================================================================ fleet control: NodeControl

class FakeEngine:
    """What NodeControl uses of Scrapy's ExecutionEngine."""

    def __init__(self, idle=True, slot=True):
        self.spider = types.SimpleNamespace(name="s")
        self.paused = False
        self.idle = idle
        self.calls = []
        self._slot = types.SimpleNamespace(nextcall=types.SimpleNamespace(
            schedule=lambda: self.calls.append("schedule"))) if slot else None

    def pause(self):
        self.paused = True
        self.calls.append("pause")

    def unpause(self):
        self.paused = False
        self.calls.append("unpause")

    def spider_is_idle(self):
        if isinstance(self.idle, BaseException):
            raise self.idle
        return self.idle

    def close_spider_async(self, reason):
        self.calls.append(("close", reason))


class FakeMonitor:
    def __init__(self):
        self.ticks = []
        self.redis = None
        self.prefix = "p"
        self.node_id = "s:host:1"

    def tick(self, queued=False):
        self.ticks.append(queued)


def control(engine=None):
    ctl = monitors.NodeControl(FakeMonitor())
    ctl.engine = FakeEngine() if engine is None else engine
    return ctl


def command(name, cid=1):
    return {"id": cid, "command": name, "at": NOW, "target": "all"}


@pytest.mark.parametrize("name, calls, draining, paused", [
    pytest.param("pause", ["pause"], False, True, id="pause"),
    pytest.param("resume", ["unpause", "schedule"], False, False, id="resume-schedules-the-next-call"),
    pytest.param("stop", [("close", "stopped")], False, False, id="stop-closes-stopped"),
    pytest.param("drain", [], True, False, id="drain-waits-for-empty"),
])
def test_control_apply(name, calls, draining, paused):
    ctl = control()
    before = time.time()
    ctl.apply(command(name, 7))
    assert ctl.engine.calls == calls
    assert ctl.draining is draining and ctl.engine.paused is paused
    assert ctl.command["id"] == 7 and ctl.command["name"] == name
    assert before - 0.001 <= ctl.command["at"] <= time.time() + 0.001
    assert list(ctl.acks) == [(7, ctl.command["at"])]
    assert ctl.monitor.ticks == [True]  # published at once, after any tick in progress
    status = ctl.status()
    assert status["command"] == ctl.command
    assert status.get("status") == ("paused" if paused else None)


def test_control_resume_ends_a_drain_and_works_without_a_slot():
    ctl = control(FakeEngine(slot=False))
    ctl.apply(command("drain", 1))
    ctl.apply(command("pause", 2))
    assert ctl.status()["status"] == "paused"
    ctl.apply(command("resume", 3))
    assert ctl.draining is False and ctl.engine.calls == ["pause", "unpause"]
    assert [cid for cid, _ in ctl.acks] == [1, 2, 3] and ctl.monitor.ticks == [True] * 3
    assert "status" not in ctl.status()


@pytest.mark.parametrize("engine", [
    pytest.param(None, id="no-engine"),
    pytest.param(types.SimpleNamespace(spider=None, paused=False), id="spider-not-open"),
])
def test_control_apply_without_a_running_spider_does_nothing(engine):
    ctl = monitors.NodeControl(FakeMonitor())
    ctl.engine = engine
    ctl.apply(command("stop"))
    assert ctl.command is None and not ctl.acks and ctl.monitor.ticks == []
    assert ctl.status() == {}


EMPTY = {"queue_requests": 0, "queue_start_urls": 0, "queue_dupefilter": 500}


@pytest.mark.parametrize("draining, paused, idle, sizes, closes", [
    pytest.param(True, False, True, EMPTY, True, id="idle-and-empty-closes"),
    pytest.param(True, False, True, {}, True, id="no-scrapy-redis-queue-idle-closes"),
    pytest.param(False, False, True, EMPTY, False, id="not-draining"),
    pytest.param(True, True, True, EMPTY, False, id="paused"),
    pytest.param(True, False, False, EMPTY, False, id="not-idle"),
    pytest.param(True, False, True, dict(EMPTY, queue_requests=3), False, id="requests-left"),
    pytest.param(True, False, True, dict(EMPTY, queue_start_urls=1), False, id="start-urls-left"),
    pytest.param(True, False, True, dict.fromkeys(EMPTY), False, id="sizes-unknown-after-a-failed-read"),
    pytest.param(True, False, True, dict(EMPTY, queue_start_urls=None), False, id="one-size-unknown"),
    pytest.param(True, False, RuntimeError("engine gone"), EMPTY, False, id="idle-check-fails"),
])
def test_check_drain(draining, paused, idle, sizes, closes):
    ctl = control(FakeEngine(idle=idle))
    ctl.draining, ctl.engine.paused = draining, paused
    ctl.check_drain(sizes)
    assert ctl.engine.calls == ([("close", "drained")] if closes else [])
    assert ctl.draining is (draining and not closes)


def test_check_drain_closes_once():
    ctl = control()
    ctl.apply(command("drain"))
    ctl.check_drain(EMPTY)
    ctl.check_drain(EMPTY)
    assert ctl.engine.calls == [("close", "drained")]


# ============================================================================ monitor_contract

GOOD = {"spider": "s", "timestamp": 1}


def enc(**fields):
    return json.dumps({**GOOD, **fields})


@pytest.mark.parametrize("raw, expected", [
    pytest.param(enc(), GOOD, id="minimal"),
    pytest.param(enc().encode(), GOOD, id="bytes"),
    pytest.param(enc(interval=86400, seen=2.5, node="n", status=None), dict(GOOD, interval=86400, seen=2.5, node="n",
                                                                          status=None), id="bounds-and-null-text"),
    pytest.param(enc(latency_p95="x", fields={"a": 2, "b": 0.5}), dict(GOOD, fields={"b": 0.5}),
                 id="bad-insight-dropped-node-kept"),
    pytest.param(enc(domains=[1]), GOOD, id="domains-not-an-object-dropped"),
    pytest.param(b"\xff", None, id="not-utf8"),
    pytest.param("not json", None, id="not-json"),
    pytest.param("[]", None, id="not-an-object"),
    pytest.param(None, None, id="none"),
    pytest.param(json.dumps({"timestamp": 1}), None, id="no-spider"),
    pytest.param(enc(spider=1), None, id="spider-not-text"),
    pytest.param(enc(timestamp="1"), None, id="timestamp-text"),
    pytest.param(enc(timestamp=True), None, id="timestamp-bool"),
    pytest.param('{"spider":"s","timestamp":NaN}', None, id="nan"),
    pytest.param('{"spider":"s","timestamp":1e18}', None, id="number-too-large"),
    pytest.param('{"spider":"s","timestamp":1,"deep":{"a":[1e400]}}', None, id="nested-infinity"),
    pytest.param(enc(node=5), None, id="node-not-text"),
    pytest.param('{"spider":"s","timestamp":1,"host":"\\ud800"}', None, id="lone-surrogate"),
    pytest.param(enc(finish_reason=["x"]), None, id="finish-reason-list"),
    pytest.param(enc(interval=0), None, id="interval-zero"),
    pytest.param(enc(interval=86401), None, id="interval-over-a-day"),
    pytest.param(enc(interval=True), None, id="interval-bool"),
    pytest.param(enc(seen="x"), None, id="seen-not-a-number"),
])
def test_decode_snapshot(raw, expected):
    assert monitor_snapshot.decode_snapshot(raw) == expected


@pytest.mark.parametrize("raw, error", [
    pytest.param("NaN", "NaN is not JSON", id="nan"),
    pytest.param("[Infinity]", "Infinity is not JSON", id="infinity"),
    pytest.param("-Infinity", "-Infinity is not JSON", id="minus-infinity"),
    pytest.param("1e18", "out of range", id="float-1e18"),
    pytest.param("-1e18", "out of range", id="float-minus-1e18"),
    pytest.param("1000000000000000000", "out of range", id="int-1e18"),
    pytest.param('{"a": 1e400}', "out of range", id="float-overflow"),
    pytest.param("[" * 100000 + "]" * 100000, "nested too deeply", id="deep-nesting"),
])
def test_loads_refuses(raw, error):
    with pytest.raises(ValueError, match=error):
        monitor_contract.loads(raw)


@pytest.mark.parametrize("raw, expected", [
    pytest.param("999999999999999999", 10 ** 18 - 1, id="largest-int"),
    pytest.param("-999999999999999999", -(10 ** 18 - 1), id="smallest-int"),
    pytest.param("9.99e17", 9.99e17, id="large-float"),
    pytest.param('{"a": [1, 2.5, null, "x"]}', {"a": [1, 2.5, None, "x"]}, id="object"),
])
def test_loads_accepts(raw, expected):
    assert monitor_contract.loads(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    pytest.param('"\\ud800"', "\ud800", id="lone-surrogate-escape-kept-for-the-gate"),
    pytest.param(b'"\xed\xa0\x80"', "\ud800", id="lone-surrogate-bytes-kept-for-the-gate"),
    pytest.param("123456789012345678", 123456789012345678, id="int-stays-int"),
    pytest.param('{"a": 1, "a": 2}', {"a": 2}, id="duplicate-key-last-wins"),
    pytest.param(" [-0, 1E2, 0.1] ", [0, 100.0, 0.1], id="blanks-and-exponents"),
])
def test_loads_gives_the_stdlib_value(raw, expected):
    value = monitor_contract.loads(raw)
    assert value == expected and type(value) is type(expected)
    assert value == json.loads(raw.decode("utf-8", "surrogatepass") if isinstance(raw, bytes) else raw)


@pytest.mark.parametrize("value, expected", [
    pytest.param({}, True, id="empty"),
    pytest.param([1, -2.5, "x", None, True, {"a": [3]}], True, id="mixed"),
    pytest.param({"a": 10 ** 18 - 1, "b": -(10 ** 18 - 1)}, True, id="largest"),
    pytest.param({"a": 10 ** 18}, False, id="int-limit"),
    pytest.param({"a": -1e18}, False, id="negative-float-limit"),
    pytest.param({"a": ["x", {"b": [float("inf")]}]}, False, id="nested-infinity"),
    pytest.param(7, True, id="scalar"),
    pytest.param(1e300, False, id="scalar-too-large"),
])
def test_in_bounds(value, expected):
    assert monitor_contract.in_bounds(value) is expected


@pytest.mark.parametrize("raw, expected", [
    pytest.param(b'{"a": 999999999999999999, "b": -12.5, "c": "x"}', True, id="18-digits"),
    pytest.param(b'{"a": 1000000000000000000}', False, id="19-digits"),
    pytest.param(b'{"a": 1000000000000000000.0}', False, id="19-digits-float"),
    pytest.param(b'{"a": 1e3}', False, id="exponent-a-maybe"),
    pytest.param(b'{"a": 1.5E+2}', False, id="capital-exponent"),
    pytest.param(b'{"host": "box-1e5"}', False, id="exponent-in-a-string-a-maybe"),
    pytest.param(b'{"domains": {"e": 1, "x.test": [1, 2]}}', True, id="e-without-a-digit-before"),
    pytest.param(b'[' * 199 + b']' * 199, True, id="199-brackets"),
    pytest.param(b'[' * 100 + b'{"a":' * 100 + b'1' + b'}' * 100 + b']' * 100, False, id="200-brackets"),
    pytest.param('{"a": 1}', False, id="text-a-maybe"),
])
def test_surely_in_bounds(raw, expected):
    assert monitor_contract.surely_in_bounds(raw) is expected


@pytest.mark.parametrize("seed", range(5))
def test_surely_in_bounds_never_passes_what_in_bounds_refuses(seed):
    import random
    rng = random.Random(seed)
    forms = [lambda x: str(int(x)), lambda x: repr(float(x)), lambda x: f"{x:.3e}", lambda x: f"{x:.1f}"]
    seen = collections.Counter()
    for _ in range(2000):  # numbers about the limit, written whole, as floats and with exponents
        x = rng.choice([-1, 1]) * 10 ** rng.uniform(0, 20)
        raw = f'{{"n": {rng.choice(forms)(x)}}}'.encode()
        value, sure = monitor_contract.loads(raw, bounded=False), monitor_contract.surely_in_bounds(raw)
        seen[sure, monitor_contract.in_bounds(value)] += 1
        assert not sure or monitor_contract.in_bounds(value), raw
        if monitor_contract.in_bounds(value):  # loads, which takes the shortcut, decides as before
            assert monitor_contract.loads(raw) == value
        else:
            with pytest.raises(ValueError):
                monitor_contract.loads(raw)
    assert seen[True, True] and seen[False, True] and seen[False, False]  # each side was tried


def test_a_pause_freezes_what_lives_on_and_a_tidy_collects_frozen_cycles(monkeypatch):
    import gc
    import weakref

    class Node:
        pass

    monkeypatch.setattr(monitor_nodes, "_tidied", [time.monotonic()])
    with monitor_nodes.gc_paused():
        cycle = Node()
        cycle.me, ref = cycle, weakref.ref(cycle)
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() > 0
    del cycle
    gc.collect()
    assert ref() is not None  # frozen: no collection looks at it
    monitor_nodes.gc_tidy(within=monitor_nodes.TIDY_EVERY / 2)
    assert ref() is not None  # not due yet
    monitor_nodes.gc_tidy(within=monitor_nodes.TIDY_EVERY)
    assert ref() is None and gc.get_freeze_count() == 0


def test_surely_in_bounds_of_a_block_is_each_texts():
    usual, exponent = b'{"a": [1, 2.5]}', b'{"a": 2e3}'
    nested, deep = b"[" * 150 + b"]" * 150, b"[" * 100 + b'{"a":' * 100 + b"1" + b"}" * 100 + b"]" * 100
    assert monitor_contract.surely_in_bounds(usual, usual, b'{"b": "x"}', nested, nested)
    assert not monitor_contract.surely_in_bounds(usual, exponent)
    assert not monitor_contract.surely_in_bounds(usual, deep)
    assert monitor_contract.surely_in_bounds(b"1234567890", b"123456789")  # kept apart: no run of 19 digits
    assert not monitor_contract.surely_in_bounds(b"1234567890123456789", usual)
    assert not monitor_contract.surely_in_bounds(usual, '{"a": 1}') and not monitor_contract.surely_in_bounds()
    curly = b'{"a":' * 150 + b"1" + b"}" * 150
    assert monitor_contract.surely_in_bounds(nested, curly)  # each text's own brackets, not the block's most of each
    assert monitor_contract.surely_in_bounds(curly, nested, usual) and not monitor_contract.surely_in_bounds(
        usual, b"[" * 60 + curly + b"]" * 60)


WHOLE = dict.fromkeys(monitor_contract.DOMAIN_COUNTS + ("latency_p95", "delay"), 1)  # a domain's every figure
# What the gate's block path must agree on with decode_snapshot: each change makes a value unusual, or wrong.
WRONGS = ["remove", None, True, "x", "", -1, 0, 0.5, 2, 86401, 1e300, 10 ** 18, "h\u00e9", "\ud800", [], {},
          [[[[[1]]]]], [1], ["a"], [1, "a"], ["a", 2], ["x" * 301, 0.1], ["a", -1], ["a", 0.5, 1], ["x.test", "y"],
          "x" * 301, {"": 0.5}, {"x" * 301: 0.5}, [["a.test"], [1]], [["a.test"], [1], [0]],
          [[f"d{k}" for k in range(102)], [1] * 102, [0] * 102], {f"d{k}": WHOLE for k in range(102)},
          {"": WHOLE}, {"x" * 301: WHOLE}, {**{k: v for k, v in WHOLE.items() if k != "delay"}, "bogus": 1}]
PLACES = ["spider", "timestamp", "seen", "interval", "node", "host", "status", "version", "queues",
          ("queues", "requests"), ("queues", "start_urls_type"), ("queues", "apart"), "latency_p50", "latency_sum",
          "latency_buckets", ("latency_buckets", 0), "fields", ("fields", "price"), "fields_lowest",
          ("fields_lowest", 0), ("fields_lowest", 1), "domains", ("domains", 0), ("domains", 1), ("domains", 2),
          ("domains", 3), ("domains", 0, 0), ("domains", 1, 0), ("domains", "d0.test"), ("domains", "d1.test", "pages"),
          ("domains", "d1.test", "delay"), ("domains", "d0.test", "extra"), "error_samples", ("error_samples", 0),
          "age", "extra", ()]


@pytest.mark.parametrize("slim", [True, False], ids=["slim", "whole"])
def test_parse_snapshots_is_parse_snapshot_one_by_one(slim, monkeypatch):
    """The block path (``_usual``, checked over many values at C speed) gives what the gate gives value by value:
    the same snapshot (same keys in the same order) or None, and the same stale_after: over blocks of usual values
    with each wrong or unusual value (non-ASCII, exponents, deep nesting, whole domains) in each place."""
    import random
    rng = random.Random(7)
    monkeypatch.setattr(monitor_snapshot, "BLOCK", 4)

    def value(i):
        snap = testbed.snapshot(f"s{i % 3}:h{i}:{i}", f"s{i % 3}", now=NOW - rng.choice([0, 5, 31, 100]),
                                status=rng.choice(["running", "running", "paused", "closed"]),
                                interval=rng.choice([10, 2.5, 60]), pages=rng.randrange(10 ** 6),
                                fields={"price": 0.5, "title": 1.0}, latency_p50=rng.choice([None, 0.2]),
                                domains={f"d{k}.test": {"pages": k, "429": k % 2, "delay": rng.choice([0, 1.5])}
                                         for k in range(rng.randrange(4))})
        if rng.random() < 0.7:  # as Redis stamps it on a write; else the node's own timestamp counts
            snap["seen"] = snap["timestamp"] + rng.choice([0, 3, 50])
        if slim:
            return json.loads(monitor_contract.slim_value(snap))
        return {k: v for k, v in snap.items() if k not in ("domains", "error_samples")}  # else each goes slowly

    def spoiled(snap, place, wrong):
        if place == ():
            return json.dumps(wrong).encode()
        *path, last = place if isinstance(place, tuple) else (place,)
        target = snap
        for key in path:
            target = target.get(key) if isinstance(target, dict) else target[key] if isinstance(
                target, list) and isinstance(key, int) and key < len(target) else None
        if isinstance(target, list) and isinstance(last, int) and last < len(target):
            target[last] = None if wrong == "remove" else wrong
        elif isinstance(target, dict):
            target.pop(last, None) if wrong == "remove" else target.__setitem__(last, wrong)
        return json.dumps(snap).encode().replace(b"\\\\u", b"\\u")

    fast = collections.Counter()
    for place, wrong, _ in itertools.product(PLACES, WRONGS, range(2)):
        raws = [json.dumps(value(i)).encode() for i in range(rng.randrange(2, 10))]
        k = rng.randrange(len(raws))
        raws[k] = spoiled(json.loads(raws[k]), place, wrong)
        now = NOW + rng.choice([0, 40, 200])
        for start in range(0, len(raws), 4):
            fast[monitor_snapshot._usual(raws[start:start + 4], slim) is not None] += 1
        got, flips = monitor_snapshot.parse_snapshots(raws, now, slim)
        want = [monitor_snapshot.parse_snapshot(raw, now, slim) for raw in raws]
        assert got == want and [list(g or ()) for g in got] == [list(w or ()) for w in want], (place, wrong)
        assert flips == [None if w is None or w["state"] == "closed" else monitor_snapshot.stale_after(w)
                         for w in want]
    assert fast[True] > 200 and fast[False] > 200  # both paths were taken, often


NO_FIGURES = dict.fromkeys(monitor_contract.DOMAIN_COUNTS + ("latency_p95", "delay"))


@pytest.mark.parametrize("domains, slim, expected", [
    pytest.param({"a.test": {"pages": 3, "429": 1}}, False, {"a.test": NO_FIGURES | {"pages": 3, "429": 1}},
                 id="absent-figures-none"),
    pytest.param({"a.test": {"pages": 3, "429": 1}}, True, {"a.test": {"pages": 3, "429": 1}}, id="slim-kept-as-is"),
    pytest.param({"a.test": NO_FIGURES | {"pages": 3}}, False, {"a.test": NO_FIGURES | {"pages": 3}}, id="full"),
    pytest.param({"a.test": {"pages": -1, "429": True, "503": "x", "odd": 5}}, False, {"a.test": NO_FIGURES},
                 id="wrong-figures-none"),
    pytest.param({"a.test": {"pages": -1, "429": True, "503": "x", "odd": 5, "delay": 2}}, True,
                 {"a.test": {"delay": 2}}, id="slim-wrong-figures-absent"),
    pytest.param({"": {}, "x" * 301: {}, "ok": [], "\ud800": {}}, False, {}, id="bad-names-and-values-dropped"),
    pytest.param({f"d{i}": {"pages": i} for i in range(102)}, True, {f"d{i}": {"pages": i} for i in range(101)},
                 id="at-most-101"),
    pytest.param({"d\u00e9": {"pages": 1}}, True, {"d\u00e9": {"pages": 1}}, id="non-ascii-name"),
])
def test_domains_cleaned(domains, slim, expected):
    assert monitor_snapshot._domains(domains, slim) == expected


@pytest.mark.parametrize("domains", [
    pytest.param({"a.test": {"pages": 10 ** 18}}, id="known-figure"),
    pytest.param({"a.test": {"odd": [1e300]}}, id="unknown-figure"),
    pytest.param({"": {"pages": -1e19}}, id="dropped-domain"),
    pytest.param({f"d{i}": {"pages": 1} for i in range(101)} | {"late": [10 ** 18]}, id="beyond-the-101"),
])
def test_domains_out_of_bounds_refuse_the_node(domains):
    with pytest.raises(ValueError):
        monitor_snapshot._domains(domains)
    assert monitor_snapshot.decode_snapshot(enc(domains=domains)) is None


@pytest.mark.parametrize("domains, expected", [
    pytest.param(None, {}, id="none"),
    pytest.param({"other": {"pages": 5, "429": 5}}, {}, id="only-other"),
    pytest.param({"a": {"pages": 4, "503": 1}, "b": {"pages": 2.9, "429": "x", "503": None},
                  "c": {"pages": 1, "429": 2}, "d": "not figures"},
                 {("a", "pages"): 4, ("a", "refused"): 1, ("b", "pages"): 2, ("b", "refused"): 0,
                  ("c", "pages"): 1, ("c", "refused"): 2}, id="fractions-and-non-numbers"),
])
def test_refusal_counts(domains, expected):  # what a node adds to the refusal buckets, before its last rollup's counts
    assert monitor_contract.refusal_counts({"domains": domains}) == expected


@pytest.mark.parametrize("domains, slim", [
    pytest.param({"a": {"pages": 4, "429": 1}}, None, id="none-slowed: no domains"),
    pytest.param({"a": {"pages": 4, "429": 1, "delay": 2.0}, "other": {"pages": 1}},
                 [["a"], [4], [1], [2.0]], id="one-slowed: columns with delays"),
])
def test_slim_value_has_domains_only_when_one_is_slowed(domains, slim):
    assert monitor_contract.loads(monitor_contract.slim_value({"node": "n", "domains": domains})).get("domains") == slim


@pytest.mark.parametrize("domains, expected", [
    pytest.param([["a", "b"], [3, 0], [1, 0]], [["a", "b"], [3, 0], [1, 0]], id="columns"),
    pytest.param([["a"], [3], [1], [2.5]], [["a"], [3], [1], [2.5]], id="with-delays"),
    pytest.param([[], [], []], [[], [], []], id="none"),
    pytest.param([["d\u00e9"], [1], [0]], [["d\u00e9"], [1], [0]], id="non-ascii-name"),
    pytest.param({"a": {"pages": 3, "429": 1, "503": 2}, "other": {"pages": 9}, "b": {"delay": 2}},
                 [["a", "b"], [3, 0], [3, 0], [0, 2]], id="an-older-extensions-object"),
    pytest.param([["a", "b"], [3], [1]], None, id="columns-of-other-lengths"),
    pytest.param([["a"], [-3], [1]], None, id="a-negative-count"),
    pytest.param([["a"], [True], [1]], None, id="a-bool"),
    pytest.param([[""], [1], [1]], None, id="an-empty-name"),
    pytest.param([[7], [1], [1]], None, id="a-number-for-a-name"),
    pytest.param([["a"], [1]], None, id="two-columns"),
    pytest.param("a", None, id="text"),
    pytest.param([[f"d{i}" for i in range(102)], [1] * 102, [0] * 102], None, id="too-many"),
])
def test_slim_domains_read_as_columns(domains, expected):
    snapshot = monitor_snapshot.decode_snapshot(enc(domains=domains), slim=True)
    assert snapshot is not None and snapshot.get("domains") == expected


@pytest.mark.parametrize("domains", [[["a"], [10 ** 18], [0]], [["a"], [1], [0], [1e300]], ["x", [10 ** 18]]])
def test_slim_domains_out_of_bounds_refuse_the_node(domains):
    assert monitor_snapshot.decode_snapshot(enc(domains=domains), slim=True) is None


def test_loads_unbounded_still_refuses_nan():
    assert monitor_contract.loads("1e18", bounded=False) == 1e18
    with pytest.raises(ValueError):
        monitor_contract.loads("NaN", bounded=False)


@pytest.mark.parametrize("url, expected", [
    pytest.param("redis://:secret@host:6379/0", "redis://:***@host:6379/0", id="password-only"),
    pytest.param("redis://user:pw@h/0", "redis://user:***@h/0", id="user-and-password"),
    pytest.param("redis://:p@ss@h/0", "redis://:***@h/0", id="at-sign-in-password"),
    pytest.param("redis://user@h/0", "redis://user@h/0", id="user-only-kept"),
    pytest.param("redis://h/0?password=x&db=1", "redis://h/0?password=***&db=1", id="password-option"),
    pytest.param("https://h/hook?Token=abc&x=1", "https://h/hook?Token=***&x=1", id="token-option-any-case"),
    pytest.param("redis://h:6379/0", "redis://h:6379/0", id="nothing-secret"),
    pytest.param("http://[::1", "<unparsable URL>", id="unparsable"),
])
def test_redact(url, expected):
    assert monitor_settings.redact(url) == expected


@pytest.mark.parametrize("url, expected", [
    pytest.param("https://hooks.slack.com/services/T/B/X", "https://hooks.slack.com/...", id="path-cut"),
    pytest.param("https://u:pw@h:8443/x?t=1", "https://h:8443/...", id="port-kept-secrets-cut"),
    pytest.param("http://h:99999/x", "<unparsable URL>", id="bad-port"),
])
def test_safe_url(url, expected):
    assert monitor_settings.safe_url(url) == expected


def test_scrub_cuts_the_given_url_and_redacts_others():
    text = "cannot post to https://h/secret/path: refused; also redis://:pw@x:1/0?token=t down"
    out = monitor_settings.scrub(text, "https://h/secret/path", None)
    assert out == "cannot post to https://h/...: refused; also redis://:***@x:1/0?token=*** down"
    assert "secret" not in out and "pw" not in out


@pytest.mark.parametrize("fields, now, expected", [
    pytest.param({"timestamp": 100, "interval": 10}, 130, "live", id="live-at-three-intervals"),
    pytest.param({"timestamp": 100, "interval": 10}, 130.5, "stale", id="stale-past-three-intervals"),
    pytest.param({"timestamp": 100}, 131, "stale", id="default-interval-10"),
    pytest.param({"timestamp": 100, "interval": 0}, 129, "live", id="zero-interval-is-default"),
    pytest.param({"timestamp": 100, "interval": 60}, 250, "live", id="own-interval"),
    pytest.param({"timestamp": 0, "seen": 100, "interval": 10}, 130, "live", id="seen-over-own-clock"),
    pytest.param({"timestamp": 100, "seen": 0, "interval": 10}, 130, "stale", id="seen-stale"),
    pytest.param({"timestamp": 100, "status": "paused"}, 110, "paused", id="paused"),
    pytest.param({"timestamp": 100, "status": "paused"}, 500, "stale", id="paused-then-silent"),
    pytest.param({"timestamp": 100, "status": "closed"}, 10 ** 9, "closed", id="closed-forever"),
])
def test_node_state(fields, now, expected):
    assert monitor_snapshot.node_state(fields, now) == expected


def row(ts, value=None, **fields):
    """A history row (list of HISTORY_FIELDS) with every column ``value`` unless given."""
    return [ts] + [fields.get(f, value) for f in HISTORY_FIELDS[1:]]


def col(merged, field):
    return merged[HISTORY_FIELDS.index(field)]


def test_merge_rows_means_gauges_keeps_last_counters():
    merged = monitor_contract.merge_rows([row(301, cpu=10.0, pages=5, latency_p95=None),
                                          row(420, cpu=20.0, pages=9, latency_p95=1.5),
                                          row(599, cpu=None, pages=12, latency_p95=None)])
    assert merged[0] == 300  # the bucket's start
    assert col(merged, "cpu") == 15.0  # mean of the figures given
    assert col(merged, "latency_p95") == 1.5
    assert col(merged, "pages") == 12  # counters: the last value
    assert col(merged, "memory") is None


def test_trend_buffer_hands_back_one_row_per_bucket():
    buffer = monitor_contract.TrendBuffer()
    assert buffer.add(row(0, 1)) is None
    assert buffer.add(row(299, 3)) is None
    merged = buffer.add(row(300, 5))
    assert merged[0] == 0 and col(merged, "cpu") == 2.0 and col(merged, "pages") == 3
    merged = buffer.flush()
    assert merged[0] == 300 and col(merged, "pages") == 5
    assert buffer.flush() is None


def rec(node, start, end):
    return {"node": node, "start_time": start, "end_time": end}


def test_run_ids_sort_by_end_then_start():
    records = [rec("n1", 50, 200), rec("n2", 10, 100), rec("n3", 90, 100), rec("n4", 5, 1000), rec("n5", 0, 99)]
    ids = [monitor_contract.run_id(r) for r in records]
    assert all(monitor_contract.RUN_ID.match(i) for i in ids)
    order = sorted(range(len(records)), key=lambda i: ids[i])
    assert [records[i]["node"] for i in order] == ["n5", "n2", "n3", "n1", "n4"]


def test_run_id_is_stable_per_run_and_distinct_per_node():
    assert monitor_contract.run_id(rec("n", 1, 2)) == monitor_contract.run_id(rec("n", 1, 2))
    assert monitor_contract.run_id(rec("n", 1, 2)) != monitor_contract.run_id(rec("m", 1, 2))
    assert monitor_contract.run_id(rec("n", 1, 2))[:23] == "00000000002-00000000001"


@pytest.mark.parametrize("start, end, prefix", [
    pytest.param(-5, -1, "00000000000-00000000000-", id="negative-clamped"),
    pytest.param(10 ** 12, 10 ** 12, "99999999999-99999999999-", id="huge-clamped"),
    pytest.param(1.9, 2.9, "00000000002-00000000001-", id="fractions-truncated"),
])
def test_run_id_clamps(start, end, prefix):
    rid = monitor_contract.run_id(rec("n", start, end))
    assert rid.startswith(prefix) and monitor_contract.RUN_ID.match(rid)


# ============================================================================ monitor_settings parsers

OK, BAD = "ok", "bad"


@pytest.mark.parametrize("parse, raw, outcome, expected", [
    # flag: 1/true/yes/on and 0/false/no/off in any case, nothing else
    *[pytest.param("flag", raw, OK, raw.strip().lower() in ("1", "true", "yes", "on"), id=f"flag-{raw!r}")
      for raw in ("0", "1", "true", "false", "yes", "no", "on", "off", "TRUE", "False", "Yes", "NO", "On", "oFF",
                  " on ", "1\n")],
    pytest.param("flag", True, OK, True, id="flag-bool-true"),
    pytest.param("flag", 0, OK, False, id="flag-int-0"),
    *[pytest.param("flag", raw, BAD, "must be one of 1/true/yes/on or 0/false/no/off", id=f"flag-bad-{raw!r}")
      for raw in ("disabled", "enabled", "2", "-1", "", "  ", "y", "t", "nope", "1.0", 2, 1.0)],
    # whole: digits only
    pytest.param("whole", "5", OK, 5, id="whole-5"),
    pytest.param("whole", " 42 ", OK, 42, id="whole-stripped"),
    pytest.param("whole", 7, OK, 7, id="whole-int"),
    pytest.param("whole", "999999999", OK, 999999999, id="whole-max"),
    *[pytest.param("whole", raw, BAD, "must be a whole number from 0 to 999999999", id=f"whole-bad-{raw!r}")
      for raw in ("+5", "5_000", "-3", "1.0", "0x10", True, False, "", "five", "1e3", "\u0665", "1000000000", 5.0)],
    # seconds: finite, 0 to a year
    pytest.param("seconds", "0", OK, 0.0, id="seconds-zero"),
    pytest.param("seconds", "2.5", OK, 2.5, id="seconds-fraction"),
    pytest.param("seconds", "1e3", OK, 1000.0, id="seconds-exponent"),
    pytest.param("seconds", "31536000", OK, 31536000.0, id="seconds-a-year"),
    *[pytest.param("seconds", raw, BAD, "must be a number of seconds, 0 or more and at most 31536000",
                   id=f"seconds-bad-{raw!r}")
      for raw in ("nan", "NaN", "inf", "-inf", "1e308", "-1", "-0.5", "31536001", "", "ten", True)],
    # number
    pytest.param("number", "80", OK, 80.0, id="number"),
    pytest.param("number", "1e308", OK, 1e308, id="number-large-finite"),
    *[pytest.param("number", raw, BAD, "must be a number 0 or more", id=f"number-bad-{raw!r}")
      for raw in ("-1", "nan", "inf", "5e", "", True)],
    # port
    pytest.param("port", "65535", OK, 65535, id="port-max"),
    pytest.param("port", " 80 ", OK, 80, id="port-stripped"),
    *[pytest.param("port", raw, BAD, "must be a port number from 1 to 65535", id=f"port-bad-{raw!r}")
      for raw in ("0", "65536", "80.0", "-1", "http", "")],
    # duration
    *[pytest.param("duration", raw, OK, seconds, id=f"duration-{raw}")
      for raw, seconds in (("3600", 3600.0), ("90m", 5400.0), ("2h", 7200.0), ("2H", 7200.0), ("1d", 86400.0),
                           ("1.5h", 5400.0), ("30d", 2592000.0), (" 45s ", 45.0))],
    *[pytest.param("duration", raw, BAD, "must be a duration such as 3600, 90m, 2h or 1d", id=f"duration-bad-{raw!r}")
      for raw in ("0", "-1h", "31d", "abc", "", "h", "infd", "nanh", "2w")],
    # choice, rules, token, lists
    pytest.param("choice", " SLACK ", OK, "slack", id="choice-any-case"),
    pytest.param("choice", "teams", BAD, "must be one of slack, alertmanager, not 'teams'", id="choice-bad"),
    pytest.param("rules", "cpu, MEMORY", OK, ["cpu", "memory"], id="rules-list"),
    pytest.param("rules", ",", OK, [], id="rules-none"),
    pytest.param("rules", "cpu,bogus", BAD, "unknown rule 'bogus'", id="rules-unknown"),
    pytest.param("token", "s3cr3t-token", OK, "s3cr3t-token", id="token"),
    *[pytest.param("token", raw, BAD, "printable ASCII without leading or trailing spaces", id=f"token-bad-{raw!r}")
      for raw in (" abc", "abc ", "\u00e9t\u00e9", "a\tb", "a\nb")],
    # URLs
    *[pytest.param("redis_url", raw, OK, raw, id=f"redis-url-{raw}")
      for raw in ("redis://localhost:6379/0", "rediss://h/1", "redis://:pw@h:6380/2", "unix:///tmp/r.sock")],
    pytest.param("redis_url", "http://h/0", BAD, "not a usable Redis URL", id="redis-url-scheme"),
    pytest.param("redis_url", "redis://h:notaport/0", BAD, "not a usable Redis URL", id="redis-url-port"),
    pytest.param("redis_url", "redis://h/0?bogus=1", BAD, "unknown option 'bogus'", id="redis-url-option"),
    *[pytest.param("http_url", raw, OK, raw, id=f"http-url-{raw}")
      for raw in ("https://hooks.example/x", "http://h:8080/p", "https://[::1]/x")],
    *[pytest.param("http_url", raw, BAD, "must be an http:// or https:// URL", id=f"http-url-bad-{raw!r}")
      for raw in ("ftp://h/x", "http://", "http://h:0/", "http://h:99999/", "http://h:abc/", "http://h/a b",
                  "https://h/x\n", "http://[::1/", "hooks.example/x")],
])
def test_parsers(parse, raw, outcome, expected):
    call = {
        "flag": lambda: monitor_settings.flag("THE_SETTING", raw),
        "whole": lambda: monitor_settings.whole("THE_SETTING", raw),
        "seconds": lambda: monitor_settings.seconds("THE_SETTING", raw),
        "number": lambda: monitor_settings.number("THE_SETTING", raw),
        "port": lambda: monitor_settings.port("THE_SETTING", raw),
        "duration": lambda: monitor_settings.duration("THE_SETTING", raw),
        "choice": lambda: monitor_settings.choice("THE_SETTING", raw, ("slack", "alertmanager")),
        "rules": lambda: monitor_settings.rules("THE_SETTING", raw, monitor_settings.RULE_NAMES),
        "token": lambda: monitor_settings.token("THE_SETTING", raw),
        "redis_url": lambda: monitor_settings.redis_url("THE_SETTING", raw),
        "http_url": lambda: monitor_settings.http_url("THE_SETTING", raw),
    }[parse]
    if outcome == OK:
        got = call()
        assert got == expected and type(got) is type(expected)
    else:
        with pytest.raises(ConfigError) as info:
            call()
        assert "THE_SETTING" in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize("raw, secret", [
    pytest.param("redis://:sekrit@h:notaport/0", "sekrit", id="redis-password"),
    pytest.param("redis://h/0?password=sekrit&bogus=1", "sekrit", id="redis-password-option"),
    pytest.param("https://h/services/sekrit path", "sekrit", id="webhook-path"),
])
def test_url_errors_never_quote_secrets(raw, secret):
    parse = monitor_settings.http_url if raw.startswith("https") else monitor_settings.redis_url
    with pytest.raises(ConfigError) as info:
        parse("THE_URL", raw)
    assert secret not in str(info.value) and "THE_URL" in str(info.value)


@pytest.mark.parametrize("raw, expected", [
    pytest.param("a, b,,c ", ["a", "b", "c"], id="text"),
    pytest.param(["a", " b", ""], ["a", "b"], id="scrapy-list"),
    pytest.param(("x",), ["x"], id="tuple"),
    pytest.param("", [], id="empty"),
    pytest.param(None, [], id="none"),
])
def test_split_list(raw, expected):
    assert monitor_settings.split_list(raw) == expected


# ---------------------------------------------------------------------------- value(): precedence and bounds

@pytest.mark.parametrize("name, raw, environment, expected", [
    pytest.param("MONITOR_INTERVAL", None, None, 10.0, id="default"),
    pytest.param("MONITOR_INTERVAL", None, "5", 5.0, id="environment-over-default"),
    pytest.param("MONITOR_INTERVAL", "7", "5", 7.0, id="raw-over-environment"),
    pytest.param("MONITOR_INTERVAL", "", "5", 5.0, id="empty-raw-is-unset"),
    pytest.param("MONITOR_INTERVAL", None, "", 10.0, id="empty-environment-is-unset"),
    pytest.param("MONITOR_INTERVAL", "", "", 10.0, id="both-empty-default"),
    pytest.param("MONITOR_ENABLED", None, "off", False, id="flag-from-environment"),
    pytest.param("MONITOR_ENABLED", False, "on", False, id="scrapy-bool-over-environment"),
    pytest.param("MONITOR_NODE_ID", None, None, None, id="default-none-stays-none"),
    pytest.param("MONITOR_NODE_ID", None, " w1 ", "w1", id="text-stripped"),
    pytest.param("MONITOR_ITEM_FIELDS", ["a", "b"], "x", ["a", "b"], id="scrapy-list-over-environment"),
    pytest.param("ALERT_RULES", None, None, list(monitor_settings.RULE_NAMES), id="default-parsed"),
    pytest.param("MONITOR_CORS_ORIGINS", None, None, ["null"], id="list-default-parsed"),
    pytest.param("SCHEDULER", None, "from-environment", "", id="scrapy-only-setting-ignores-environment"),
    pytest.param("ALERT_INTERVAL", None, "0.5", 0.5, id="open-low-above-zero"),
    pytest.param("MONITOR_API_CACHE", None, "0", 0.0, id="closed-low-zero"),
])
def test_value(monkeypatch, name, raw, environment, expected):
    if environment is not None:
        monkeypatch.setenv(name, environment)
    assert monitor_settings.value(name, raw) == expected


@pytest.mark.parametrize("name, raw, environment, error", [
    pytest.param("MONITOR_ENABLED", None, "disabled", "MONITOR_ENABLED must be one of", id="flag-environment"),
    pytest.param("MONITOR_ENABLED", None, "  ", "MONITOR_ENABLED must be one of", id="blank-is-not-empty"),
    pytest.param("MONITOR_CONTROL", "2", None, "MONITOR_CONTROL must be one of", id="flag-raw"),
    pytest.param("MONITOR_INTERVAL", None, "0.5", "MONITOR_INTERVAL must be a number of seconds, 1 or more and at "
                 "most 86400", id="own-low-bound"),
    pytest.param("MONITOR_INTERVAL", None, "86401", "at most 86400", id="own-high-bound"),
    pytest.param("ALERT_INTERVAL", None, "0", "ALERT_INTERVAL must be a number of seconds, more than 0", id="open-low"),
    pytest.param("ALERT_GIVE_UP", "0", None, "ALERT_GIVE_UP must be a number of seconds, more than 0",
                 id="open-low-give-up"),
    pytest.param("MONITOR_TOP_DOMAINS", None, "101", "MONITOR_TOP_DOMAINS must be a whole number from 0 to 100",
                 id="whole-bounds"),
    pytest.param("MONITOR_RUNS_KEEP", None, "0", "MONITOR_RUNS_KEEP must be a whole number from 1", id="whole-low"),
    pytest.param("MONITOR_API_PORT", "0", None, "MONITOR_API_PORT must be a port number", id="port"),
    pytest.param("ALERT_WEBHOOK_FORMAT", None, "teams", "ALERT_WEBHOOK_FORMAT must be one of slack, alertmanager",
                 id="choice"),
    pytest.param("REDIS_URL", None, "http://h", "REDIS_URL: http://h is not a usable Redis URL", id="redis-url"),
])
def test_value_errors_name_the_setting(monkeypatch, name, raw, environment, error):
    if environment is not None:
        monkeypatch.setenv(name, environment)
    with pytest.raises(ConfigError, match=re.escape(error)):
        monitor_settings.value(name, raw)


def test_value_label_names_the_flag():
    with pytest.raises(ConfigError) as info:
        monitor_settings.value("MONITOR_API_PORT", "70000", "--port")
    assert str(info.value).startswith("--port must be a port number") and "MONITOR_API_PORT" not in str(info.value)


@pytest.mark.parametrize("name", ["SCHEDULER", "NOT_A_SETTING"])
def test_env_refuses_undeclared_and_scrapy_only_names(monkeypatch, name):
    monkeypatch.setenv(name, "x")
    with pytest.raises(KeyError):
        monitor_settings.env(name)


def test_env_empty_is_none(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "")
    assert monitor_settings.env("REDIS_URL") is None
    monkeypatch.setenv("REDIS_URL", "redis://h/0")
    assert monitor_settings.env("REDIS_URL") == "redis://h/0"


def test_scrapy_setting_over_environment_and_empty_is_unset(monkeypatch):
    """The extension's reading: the crawler's Scrapy setting, else the environment, else the default."""
    monkeypatch.setenv("MONITOR_INTERVAL", "5")
    crawler = types.SimpleNamespace(settings={"MONITOR_INTERVAL": "3", "MONITOR_KEY_PREFIX": ""})
    assert monitors.scrapy_setting(crawler, "MONITOR_INTERVAL") == 3.0
    assert monitors.scrapy_setting(crawler, "MONITOR_KEY_PREFIX") == "scrapy"
    crawler.settings = {}
    assert monitors.scrapy_setting(crawler, "MONITOR_INTERVAL") == 5.0


def test_every_default_passes_its_own_parser():
    for s in monitor_settings.SETTINGS:
        assert s.kind in monitor_settings.PARSERS, s.name
        parsed = monitor_settings.value(s.name)
        assert (parsed is None) == (s.default is None), s.name
        assert not isinstance(parsed, float) or math.isfinite(parsed)


# ---------------------------------------------------------------------------- the response cache


@pytest.mark.parametrize("later, kept", [
    pytest.param(1.5, True, id="just-expired-kept-for-the-next-reader"),
    pytest.param(monitor_cache.KEEP_EXPIRED + 0.5, True, id="within-keep-expired-of-its-expiry"),
    pytest.param(monitor_cache.KEEP_EXPIRED + 2, False, id="long-expired-dropped-when-another-is-stored"),
])
def test_cache_drops_long_expired_entries(monkeypatch, later, kept):
    clock = [100.0]
    monkeypatch.setattr(monitor_cache, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    cache = monitor_cache.Cache(1.0)
    assert cache.get("big", lambda: "body") == "body"
    clock[0] += later
    assert cache.get("other", lambda: "x") == "x"
    assert ("big" in cache.entries) is kept
    assert cache.get("big", lambda: "new") == "new"  # expired either way: computed again


@pytest.mark.parametrize("accept, match, status, zipped", [
    pytest.param("identity", None, 200, False, id="identity-never-compressed"),
    pytest.param("gzip, deflate", None, 200, True, id="gzip-compressed-when-asked"),
    pytest.param("gzip;q=0", None, 200, False, id="gzip-refused-by-q0"),
    pytest.param("gzip", "-gz", 304, False, id="gzip-etag-holds-304-without-compressing"),
    pytest.param("identity", "", 304, False, id="plain-etag-holds-304"),
])
def test_a_body_is_gzipped_only_for_a_client_that_takes_it(accept, match, status, zipped):
    data = monitor_cache.to_json({"nodes": ["n%d" % i for i in range(2000)]})
    body = monitor_cache.Body(data)
    environ = {"HTTP_ACCEPT_ENCODING": accept}
    if match is not None:
        environ["HTTP_IF_NONE_MATCH"] = f'"{body.plain[1]}{match}"'
    got, headers, sent = body.pick(environ)
    assert got == status and (body.zipped[0] is not None) is zipped
    assert (("Content-Encoding", "gzip") in headers) is (zipped or match == "-gz")
    if status == 200:
        assert (gzip.decompress(sent) if zipped else sent) == data
        assert body.pick(environ)[2] is sent  # made once, then kept
    else:
        assert sent == b""


def _stored(node, seen, **fields):
    return json.dumps({"spider": "s", "node": node, "timestamp": seen, "seen": seen, "interval": 10, **fields}).encode()


# Reads of one status hash in turn: (what the hash holds, Redis's clock, nodes whose snapshot is the last read's).
READS = [
    ({b"a": _stored("a", 100), b"b": _stored("b", 100), b"c": _stored("c", 100, status="closed")}, 105, ()),
    ({b"a": _stored("a", 100), b"b": _stored("b", 100), b"c": _stored("c", 100, status="closed")}, 106, "abc"),
    ({b"a": _stored("a", 100), b"b": _stored("b", 100), b"c": _stored("c", 100, status="closed")}, 140, "c"),  # stale
    ({b"a": _stored("a", 100), b"b": _stored("b", 138), b"c": _stored("c", 100, status="closed")}, 140, "ac"),
    ({b"a": _stored("a", 100), b"b": _stored("b", 138), b"c": _stored("c", 100, status="closed")}, 120, "bc"),  # back
    ({b"a": _stored("a", 100), b"b": b"{not json", b"c": _stored("c", 100, status="closed")}, 121, "ac"),
    ({b"a": _stored("a", 100), b"b": _stored("b", 121, status="paused"), b"c": _stored("c", 100)}, 121, "a"),
    ({b"b": _stored("b", 121, status="paused"), b"a": _stored("a", 100), b"c": _stored("c", 100)}, 121, "abc"),
    ({b"b": _stored("b", 121), b"a": _stored("a", 100), b"d": _stored("d", 120)}, 150, ""),  # a node gone, one new
    ({b"\xff": _stored("x", 120), b"\xfe": _stored("y", 120), b"d": _stored("d", 120)}, 150, "d"),  # one id, twice
    ({b"\xff": _stored("x", 120), b"\xfe": _stored("y", 120), b"d": _stored("d", 120)}, 150, "d\ufffd"),
]


def test_a_reader_decodes_again_only_what_changed_and_reads_as_a_fresh_reader_does():
    reader, last = monitor_nodes.NodeReader(None, "p"), {}
    for held, now, kept in READS:
        nodes, skipped = reader._decode(held, now)
        fresh, fresh_skipped = monitor_nodes.NodeReader(None, "p")._decode(held, now)
        assert (nodes, skipped) == (fresh, fresh_skipped) and list(nodes) == list(fresh), now
        assert {n for n in nodes if nodes[n] is last.get(n)} == set(kept), now
        assert {n: e.snapshot for n, e in reader.entries.items() if e.snapshot is not None} == nodes
        last = nodes


@pytest.mark.parametrize("seed", range(12))
def test_evaluate_goes_through_only_the_nodes_it_must_and_decides_as_over_all(seed, monkeypatch):
    """``to_judge`` leaves out nodes found quiet at C speed: the outcome is the one of judging every node, over
    figures above, at and below each threshold, not numbers, stall trackers, alerts pending and firing, gone nodes."""
    import random
    rng = random.Random(seed)
    cfg = config("--cpu-percent", "90", "--memory-percent", "80", "--errors-per-min", "5", "--rss-mb", "100",
                 "--coverage-min", "90", "--latency-p95", "2", "--stall-seconds", "60", "--for", "30")

    def figure(limit):  # mostly below it, as on a healthy node
        return rng.choice([None, "x", True, 0, limit, limit + 0.5, limit - 1, int(limit * 2), -3]) \
            if rng.random() < 0.2 else limit / 2

    nodes = {}
    for i in range(rng.randrange(1, 60)):
        nodes[f"n{i}"] = snap(f"n{i}", rng.choice(["live", "live", "live", "paused", "stale", "closed"]),
                              cpu=figure(90), memory=figure(80), errors_per_min=figure(5), rss=figure(100 * MIB),
                              latency_p95=figure(2), pages_per_min=rng.choice([0, 0.0, 3, None, "x"]),
                              pages=rng.randrange(3), queue_requests=rng.choice([0, 5, None]),
                              fields_listed=rng.choice([True, False, None]), items=rng.choice([50, 500]),
                              fields_lowest=rng.choice([["price", 0.5], ["price", 0.95], ["price", 0.9]] + (
                                  [None] if seed % 2 else [])))  # some all slim: at C speed
    names = list(nodes) + ["gone"]
    stall = {n: [rng.randrange(3), NOW - rng.choice([10, 100])] for n in rng.sample(names, len(names) // 4)}
    state = {}
    for n in rng.sample(names, len(names) // 3):
        rule = rng.choice(["down", "cpu", "memory", "stalled", "errors", "rss", "coverage", "latency"])
        state[f"{rule}:{n}"] = rng.choice([firing(), {"state": "pending", "since": NOW - rng.choice([5, 50])}])
    to_judge, went = monitor_rules.to_judge, []
    monkeypatch.setattr(monitor_rules, "to_judge", lambda *args: went.append(to_judge(*args)) or went[-1])
    judged = monitor_rules.evaluate(nodes, state, stall, NOW, cfg)
    monkeypatch.setattr(monitor_rules, "to_judge", lambda nodes, *_: list(nodes))
    assert judged == monitor_rules.evaluate(nodes, state, stall, NOW, cfg)
    assert len(went[0]) < len(nodes) or len(nodes) < 5  # some were left out


@pytest.mark.parametrize("seed", range(8))
def test_crawl_starts_at_c_speed_is_node_by_node(seed):
    import random
    rng = random.Random(seed)
    nodes = {}
    for i in range(rng.randrange(1, 40)):
        nodes[f"n{i}"] = snap(f"n{i}", rng.choice(["live", "paused", "stale", "closed"]), spider=rng.choice("ab"),
                              start_time=rng.choice([NOW - 500, NOW - 100.5, NOW - 7]),
                              timestamp=NOW - rng.randrange(9))
        if rng.random() < 0.3:
            del nodes[f"n{i}"]["seen"]  # the node's own clock then
        if seed % 2 and rng.random() < 0.1:
            nodes[f"n{i}"][rng.choice(["start_time", "seen", "timestamp"])] = rng.choice([None, "x"])  # node by node
    expected = {}
    for s in nodes.values():
        if s["state"] in ("live", "paused") and monitor_contract.is_number(s.get("start_time")):
            start = s["start_time"] + monitor_snapshot.last_report(s) - monitor_contract.number(s.get("timestamp"), 0)
            expected[s["spider"]] = min(start, expected.get(s["spider"], start))
    assert monitor_rules.crawl_starts(nodes) == expected


def _random_nodes(rng, count, spider="s", usual=False):
    """``count`` nodes of ``spider`` with random figures; ``usual``: every node crawling, each figure a number (of
    one type in some fields, ints and floats of equal value in others), every time a number."""
    def value():
        return rng.choice([None, "x", True, rng.randint(0, 9), float(rng.randint(0, 9)), round(rng.uniform(0, 9), 3)])

    kinds = {f: rng.choice([(int,), (float,), (int, float)]) for f in monitor_read.SPIDER_FIELDS}

    def number(f):
        return rng.choice(kinds[f])(rng.randint(0, 9))
    return {f"n{i}": {"spider": spider, "node": f"n{i}", "host": f"h{rng.randint(0, count // 3)}",
                      "state": rng.choice(monitor_read.CRAWLING_STATES if usual else monitor_read.STATES),
                      "timestamp": rng.choice([1, 2, 3] if usual else [1, 2, 3, None]),
                      "start_time": rng.choice([None, rng.randint(0, 9)]),
                      **{f: number(f) if usual else value() for f in monitor_read.SPIDER_FIELDS}} for i in range(count)}


@pytest.mark.parametrize("seed", range(20))
def test_a_spider_view_by_columns_combines_as_rows_do_and_a_pass_updates_only_what_changed(seed):
    import random
    rng = random.Random(seed)
    usual = seed % 2 == 0  # every column a number and every node crawling: the views' shortcuts
    nodes = _random_nodes(rng, 60, usual=usual)
    rows = list(nodes.values())
    crawling = [r for r in rows if r["state"] in monitor_read.CRAWLING_STATES]
    view = monitor_read.cluster_view(nodes, "s")
    rest = [f for f in monitor_read.SPIDER_FIELDS if f not in monitor_read.CRAWLING_FIELDS]
    crawl = [f for f in monitor_read.SPIDER_FIELDS if f in monitor_read.CRAWLING_FIELDS]
    expected = monitor_read.combine(rows, rest)
    if crawling:
        expected.update(monitor_read.combine(crawling, crawl))
    expected.update({f: expected.get(f) or 0 for f in crawl if f.endswith("_per_min")})
    assert json.dumps({f: view[f] for f in expected}) == json.dumps(expected)  # 2 and 2.0 apart
    memo = {}
    monitor_read.spiders_view(nodes, memo=memo)
    for count in (3, 10, 30, 60):  # some nodes report: new snapshot objects (few: positions updated; many: all read)
        for node in rng.sample(sorted(nodes), count):
            nodes[node] = _random_nodes(rng, 60, usual=usual)[node]
        passed = monitor_read.spiders_view(nodes, now=100, memo=memo)
        assert json.dumps(passed) == json.dumps(monitor_read.spiders_view(nodes, now=100))  # as one keeping nothing
        # the forecast's node, as the columns find it (the alerter's), is the one the rows give
        assert monitor_read.forecast_nodes(nodes, monitor_read.memo_firsts(memo)) == monitor_read.forecast_nodes(nodes)


@pytest.mark.parametrize("domains, expected", [
    pytest.param([[["a", "b"], [1, 2], [0, 0]], [["a"], [1], [0]]], {}, id="slim-none-slowed"),
    pytest.param([[["a", "b"], [1, 2], [0, 0], [0, 2.5]], [["a"], [1], [0]], [["b"], [1], [0], [4]]],
                 {"b": 4}, id="slim-the-highest-delay"),
    pytest.param([None, [["a"], [1], [0], [1.5]], {"c": {"delay": 3}, "d": {"delay": None}}], {"a": 1.5, "c": 3},
                 id="slim-and-whole-mixed"),
    pytest.param([{}, None], {}, id="empty"),
])
def test_slowed_domains(domains, expected):
    assert monitor_read.slowed_domains(domains) == expected


@pytest.mark.parametrize("snapshots, expected", [
    pytest.param([{"seen": 90.5}, {"seen": 100}, {"seen": 130}], [9, 0, 0], id="stamped-future-is-0"),
    pytest.param([{"seen": 90}, {"timestamp": 70}], [10, 30], id="one-unstamped-its-timestamp"),
    pytest.param([{"seen": "x", "timestamp": 95}, {}], [5, 100], id="no-number"),
    pytest.param([], [], id="none"),
])
def test_ages(snapshots, expected):  # from each one's report time, as the list views keep it beside its JSON
    times = list(map(monitor_snapshot.last_report, snapshots))
    assert monitor_snapshot.ages(times, 100) == expected == [monitor_snapshot.age(s, 100) for s in snapshots]
