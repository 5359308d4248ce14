"""The daily digest (issue 21 §3): sent once at its hour by two alerters (aiosmtpd, a webhook), on a supplied
clock, with the figures of the seeded runs; bad ALERT_DIGEST_AT / ALERT_DIGEST_TZ stop alert.py in one line."""

import datetime
import zoneinfo

import pytest

import monitor_contract
from monitor_digest import due_day, log_notes
from monitor_rules import iso
from testbed import run_script

P = "scrapy"
PARIS = zoneinfo.ZoneInfo("Europe/Paris")
SPIDER = "<b>shop</b>"  # a spider name is data: text in the mail, escaped in its HTML


def paris(day, hour, minute=0):
    return datetime.datetime(2026, 12, day, hour, minute, tzinfo=PARIS).timestamp()


def seed(client, now):
    """Three earlier runs of version 2 (items 100), then in the last day two more (items 50 and 150: 50% and
    150% of usual, a median of 100%) and one of another spider; one lost run two days ago (out of the window)."""
    runs = [(now - 4 * 86400 + i * 3600, 100, SPIDER, "finished") for i in range(3)]
    runs += [(now - 7200, 50, SPIDER, "finished"), (now - 3600, 150, SPIDER, "closespider_timeout"),
             (now - 1800, 7, "other", "finished"), (now - 2 * 86400, 1, "other", "lost")]
    for i, (end, items, spider, reason) in enumerate(runs):
        snap = {"node": f"n{i}", "spider": spider, "start_time": end - 600, "timestamp": end, "items": items,
                "pages": 2 * items, "errors": 1, "finish_reason": reason, "status": "closed", "version": "2",
                "args_hash": "a"}
        monitor_contract.write_run(client, P, monitor_contract.run_record(snap), end - 600, 1000)
    log_notes(client, P, [
        {"status": "firing", "rule": "cpu", "spider": SPIDER, "node": "n1", "starts_at": iso(now - 5000)},
        {"status": "firing", "rule": "cpu", "spider": SPIDER, "node": "n1", "starts_at": iso(now - 5000),
         "repeat": True},
        {"status": "resolved", "rule": "cpu", "spider": SPIDER, "node": "n1", "starts_at": iso(now - 5000),
         "ends_at": iso(now - 4400)}], now - 4400)


def test_the_digest_goes_out_once_a_day_per_channel_with_two_alerters(make, smtp, webhook, redis_client):
    settings = {"ALERT_DIGEST_AT": "08:00", "ALERT_DIGEST_TZ": "Europe/Paris", "ALERT_WEBHOOK_URL": webhook.url}
    first, second = make(**settings), make(**settings)
    seed(redis_client, paris(6, 8))
    for alerter in (first, second):  # 07:59 in Paris: not yet
        alerter.run_once(paris(6, 7, 59))
    assert smtp.subjects() == [] and webhook.bodies == []

    first.run_once(paris(6, 8, 0) + 30)  # its hour: one of them sends, the other finds the day claimed
    second.run_once(paris(6, 8, 1))
    first.run_once(paris(6, 20))
    second.run_once(paris(6, 23, 59))
    assert smtp.subjects() == ["[scrapy] daily digest 2026-12-06: 3 run(s) of 2 spider(s), 1 alert(s)"]
    (body,) = webhook.bodies
    mail = smtp.messages()[0]
    text = mail.get_body(("plain",)).get_content()
    page = mail.get_body(("html",)).get_content()
    assert f"{SPIDER} | 2 | 400 | 200 | 2 | items 100% of usual (version) | 1 closespider_timeout, 1 finished" in text
    assert "other | 1 | 14 | 7 | 1 | no baseline | 1 finished" in text
    assert f"cpu on {SPIDER}: fired 1, resolved 1 (lasted 10 min in all)" in text
    assert "Alert dead letters: 0. Redis memory:" in text
    assert "&lt;b&gt;shop&lt;/b&gt;" in page and "<b>shop</b>" not in page
    spiders = {s["spider"]: s for s in body["digest"]["spiders"]}
    assert spiders[SPIDER]["runs"] == 2 and spiders[SPIDER]["items_vs_usual"] == 1.0
    assert spiders[SPIDER]["baseline_of"] == "version" and spiders["other"]["items"] == 7
    assert "&lt;b&gt;shop&lt;/b&gt;" in body["text"]  # Slack's escaping

    second.run_once(paris(7, 8, 5))  # the next day: the other alerter this time
    first.run_once(paris(7, 9))
    assert len(smtp.subjects()) == 2 and smtp.subjects()[1].startswith("[scrapy] daily digest 2026-12-07: 0 run(s)")
    assert len(webhook.bodies) == 2


def test_a_failed_digest_is_given_back_and_sent_next_evaluation(make, smtp, redis_client):
    alerter = make(ALERT_DIGEST_AT="06:30")
    now = datetime.datetime(2026, 12, 6, 6, 30, tzinfo=datetime.timezone.utc).timestamp()
    smtp.refuse = 1  # the first try fails (451)
    alerter.run_once(now)
    assert smtp.subjects() == []
    alerter.run_once(now + 60)
    assert smtp.subjects() == ["[scrapy] daily digest 2026-12-06: 0 run(s) of 0 spider(s), 0 alert(s)"]


@pytest.mark.parametrize("at, tz, day", [
    pytest.param((8, 0), PARIS, None, id="before"),
    pytest.param((0, 15), PARIS, "2026-12-07", id="after-local-midnight"),
    pytest.param((23, 30), datetime.timezone.utc, "2026-12-06", id="utc-late"),
    pytest.param((0, 0), zoneinfo.ZoneInfo("Pacific/Kiritimati"), "2026-12-07", id="ahead-of-utc"),
])
def test_due_day(at, tz, day):
    assert due_day(paris(7, 0, 30), at, tz) == day  # 2026-12-06 23:30 UTC, 00:30 in Paris


@pytest.mark.parametrize("env, says", [
    ({"ALERT_DIGEST_AT": "25:00"}, "ALERT_DIGEST_AT must be a time of day as HH:MM"),
    ({"ALERT_DIGEST_AT": "8h"}, "ALERT_DIGEST_AT must be a time of day as HH:MM"),
    ({"ALERT_DIGEST_AT": "08:00", "ALERT_DIGEST_TZ": "Mars/Olympus"}, "ALERT_DIGEST_TZ must be a time zone name"),
])
def test_bad_digest_settings_stop_alert_py_in_one_line(redis_url, env, says):
    done = run_script("--once", env={"REDIS_URL": redis_url, **env})
    assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1
