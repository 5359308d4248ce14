"""The testbed's snapshots are the ones nodes write: same fields, read back the same way."""

import json
import types

from scrapy.utils.test import get_crawler

import monitor_contract
import monitors
import testbed


class NoLoop:
    """Stands in for the extension's LoopingCall: the test calls collect_and_publish itself."""

    running = False

    def __init__(self, f):
        pass

    def start(self, interval, now=True):
        pass


def test_snapshot_has_every_field_a_node_writes(redis_url, redis_client, monkeypatch):
    from twisted.internet import task

    monkeypatch.setattr(task, "LoopingCall", NoLoop)
    ext = monitors.SpiderMonitor.from_crawler(get_crawler(settings_dict={"REDIS_URL": redis_url}))
    ext.start(types.SimpleNamespace(name="main_spider", redis_key="distributed:start_urls"))
    running = ext.collect_and_publish({}, {"status": "running"})
    closed = ext.collect_and_publish({}, {"status": "closed", "finish_reason": "finished"}, final=True)
    made, made_closed = testbed.snapshot("n"), testbed.snapshot("n", status="closed")
    assert set(running) <= set(made), set(running) - set(made)
    assert set(closed) <= set(made_closed), set(closed) - set(made_closed)
    assert {k: type(v) for k, v in made.items() if k in running} == {k: type(v) for k, v in running.items()}


def test_publish_writes_as_a_node_does(redis_client):
    snaps = [testbed.snapshot("a", age=5), testbed.snapshot("b", spider="other", status="closed", interval=2)]
    testbed.publish(redis_client, *snaps, prefix="tb", history=40)
    stored = {k.decode(): json.loads(v) for k, v in redis_client.hgetall(monitor_contract.status_key("tb")).items()}
    assert stored == {"a": snaps[0], "b": snaps[1]} and stored["b"]["finish_reason"] == "finished"
    rows = [json.loads(r) for r in redis_client.lrange(monitor_contract.history_key("tb", "a"), 0, -1)]
    assert [r[0] for r in rows] == [snaps[0]["timestamp"] - 10 * i for i in range(41)]  # newest first
    assert rows[0] == monitor_contract.history_row(snaps[0])
    assert redis_client.llen(monitor_contract.trend_key("tb", "a")) >= 1  # 40 rows at 10 s span two 5-minute buckets
    assert redis_client.llen(monitor_contract.history_key("tb", "b")) == 41
