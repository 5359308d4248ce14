"""Alerts in the open, against real things: a private redis-server, a real Alertmanager forwarding to a local
webhook receiver, promtool, Apprise posting to a local receiver, the API over HTTP and the page in Chromium.

Silence semantics are driven with ``Alerter.run_once(now)`` on an explicit clock, as test_alert.py does; what
meets Alertmanager or the API runs on Redis's clock.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import time

import pytest
import requests
import yaml

import monitor_alert_state
import monitor_api
import monitor_channels
import monitor_contract
import monitor_rules
import monitor_settings
import testbed
from testbed import ROOT, T0, WAIT, XSS, report, run_script, until
from testbed_servers import ApiServer, free_port, wait_for, wait_until_answers

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
PROMTOOL = shutil.which("promtool")
NO_ALERTMANAGER = ("Alertmanager is not installed (Debian: apt-get install prometheus-alertmanager, "
                   "or `make test` as root)")
NO_PROMTOOL = "promtool is not installed (Debian: apt-get install prometheus, or `make test` as root)"


def silence(r, now, **matchers):
    """Add a silence of an hour from ``now`` (the test's clock); returns its id."""
    made = monitor_alert_state.silence_from({"matchers": matchers, "duration": 3600}, now, "test")
    return monitor_alert_state.add_silence(r, "scrapy", made)


def subjects_and_rules(webhook_bodies):
    return [(a["status"], a["rule"], a["node"]) for body in webhook_bodies for a in body["alerts"]]


# ---------------------------------------------------------------------------- Alertmanager

@pytest.fixture
def alertmanager(webhook, tmp_path):
    """A real Alertmanager on a free port whose one receiver is the test's webhook, grouping by node."""
    if not ALERTMANAGER:
        pytest.skip(NO_ALERTMANAGER)
    config = tmp_path / "alertmanager.yml"
    config.write_text(yaml.safe_dump({
        "route": {"receiver": "hook", "group_by": ["alertname", "node"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "hook", "webhook_configs": [{"url": webhook.url, "send_resolved": True}]}],
    }))
    port = free_port()
    log = open(tmp_path / "alertmanager.log", "wb")
    proc = subprocess.Popen([ALERTMANAGER, f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_answers(url + "/-/ready", 30, "Alertmanager to listen", proc=proc, log=tmp_path / "alertmanager.log")
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()


def test_alertmanager_receives_firing_then_resolved_and_forwards_them(make, redis_client, alertmanager, webhook):
    alerter = make("--for", "0", ALERT_ALERTMANAGER_URL=alertmanager)
    now = monitor_contract.redis_now(redis_client.time())
    report(redis_client, "n1", now, cpu=99.0, host="h1")
    report(redis_client, "n2", now, cpu=10.0, host="h2")
    alerter.run_once()
    held = requests.get(alertmanager + "/api/v2/alerts", timeout=5).json()
    assert [(a["labels"]["alertname"], a["labels"]["node"], a["status"]["state"]) for a in held] == [
        ("ScrapyHostCpuHigh", "n1", "active")]
    wait_for(lambda: webhook.bodies, 30, what="Alertmanager to forward the firing alert")
    [fired] = webhook.bodies
    assert fired["status"] == "firing" and fired["version"] == "4"
    [a] = fired["alerts"]
    assert a["labels"] == {"alertname": "ScrapyHostCpuHigh", "severity": "warning", "node": "n1",
                           "spider": "main_spider", "host": "h1"}
    assert "host CPU 99%" in a["annotations"]["summary"] and a["annotations"]["description"]
    alerter.run_once()  # re-sent while firing: Alertmanager keeps one alert, sends nothing new
    report(redis_client, "n1", monitor_contract.redis_now(redis_client.time()), cpu=10.0, host="h1")
    alerter.run_once()
    wait_for(lambda: len(webhook.bodies) >= 2, 30, what="Alertmanager to forward the resolution")
    # group_interval is 1 s: anything extra would have come within two. A sleep, as Alertmanager shows no event
    # for a group flush that sends nothing (the group empties without a trace once its resolution is sent).
    time.sleep(2)
    assert [b["status"] for b in webhook.bodies] == ["firing", "resolved"]
    resolved = webhook.bodies[1]["alerts"][0]
    assert resolved["status"] == "resolved" and resolved["labels"] == a["labels"]
    assert resolved["startsAt"].startswith(a["startsAt"][:19])
    # Our own webhook body in Alertmanager's format has every key Alertmanager's own has.
    ours = monitor_channels.alertmanager_webhook_body([{
        "status": "firing", "rule": "cpu", "alertname": "ScrapyHostCpuHigh", "severity": "warning", "node": "n1",
        "spider": "main_spider", "host": "h1", "summary": "host CPU 99%", "starts_at": "2026-01-01T00:00:00Z",
        "ends_at": None}], "scrapy")
    assert set(fired) <= set(ours) and set(a) <= set(ours["alerts"][0])


def test_webhook_format_alertmanager_posts_alertmanagers_body(make, redis_client, webhook):
    alerter = make("--for", "0", ALERT_WEBHOOK_URL=webhook.url, ALERT_WEBHOOK_FORMAT="alertmanager")
    report(redis_client, "n1", T0, cpu=99.0, rss=5000 * 1024 * 1024)
    alerter.run_once(T0)
    report(redis_client, "n1", T0 + 60, cpu=10.0, rss=5000 * 1024 * 1024)
    alerter.run_once(T0 + 60)
    fired, resolved = webhook.bodies
    assert {"version", "status", "receiver", "groupLabels", "commonLabels", "commonAnnotations", "externalURL",
            "alerts"} <= set(fired)
    assert fired["version"] == "4" and fired["status"] == "firing"
    assert fired["commonLabels"] == {"node": "n1", "spider": "main_spider", "host": "h1", "severity": "warning"}
    names = {a["labels"]["alertname"]: a for a in fired["alerts"]}
    assert set(names) == {"ScrapyHostCpuHigh", "ScrapyProcessRssHigh"}
    cpu = names["ScrapyHostCpuHigh"]
    assert cpu["status"] == "firing" and cpu["endsAt"] == "0001-01-01T00:00:00Z"
    assert cpu["startsAt"] == monitor_rules.iso(T0) and len(cpu["fingerprint"]) == 16
    assert names["ScrapyProcessRssHigh"]["fingerprint"] != cpu["fingerprint"]
    assert resolved["status"] == "resolved"
    [end] = resolved["alerts"]
    assert end["labels"]["alertname"] == "ScrapyHostCpuHigh" and end["endsAt"] == monitor_rules.iso(T0 + 60)
    assert end["fingerprint"] == cpu["fingerprint"]


def test_bad_alertmanager_url_or_format_is_one_line_and_exit_2(redis_url):
    for env, message in (({"ALERT_ALERTMANAGER_URL": "ftp://am"}, "ALERT_ALERTMANAGER_URL must be"),
                         ({"ALERT_WEBHOOK_FORMAT": "teams"}, "ALERT_WEBHOOK_FORMAT must be one of slack, alertmanager"),
                         ({"ALERT_NOTIFY_URLS": "nosuch://tok3n@x"}, "scheme 'nosuch'")):
        done = run_script("--once", env={"REDIS_URL": redis_url, **env})
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
        assert "tok3n" not in done.stderr


def test_alertmanager_down_is_logged_once_and_mail_still_goes(make, redis_client, smtp, caplog):
    alerter = make("--for", "0", ALERT_ALERTMANAGER_URL=f"http://127.0.0.1:{free_port()}/")
    with caplog.at_level(logging.WARNING, logger="alert"):
        for t in (0, 60):
            report(redis_client, "n1", T0 + t, cpu=99.0)
            assert alerter.tick(T0 + t)
    assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on n1"]
    failed = [r.getMessage() for r in caplog.records if "cannot post" in r.getMessage()]
    assert len(failed) == 1 and "Alertmanager http://127.0.0.1" in failed[0]


# ---------------------------------------------------------------------------- Prometheus rules

def test_promtool_checks_and_unit_tests_the_rules(redis_url, redis_client):
    if not PROMTOOL:
        pytest.skip(NO_PROMTOOL)
    for args in (["check", "rules", "prometheus-rules.yml"], ["test", "rules", "prometheus-rules.test.yml"]):
        done = subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout + done.stderr
    with open(os.path.join(ROOT, "prometheus-rules.yml"), encoding="utf-8") as f:
        rules = [rule for group in yaml.safe_load(f)["groups"] for rule in group["rules"]]
    assert {(r["alert"], r["labels"]["severity"]) for r in rules} == \
        {(r.alertname, r.severity) for r in monitor_rules.RULES}
    [failed] = [r["expr"] for r in rules if r["alert"] == "ScrapyRunFailed"]  # the run reasons alert.py calls good
    assert re.search(r'finish_reason!~"([^"]*)"', failed)[1].split("|") == list(monitor_settings.OK_REASONS)
    # Every metric a rule reads is one /prometheus serves.
    report(redis_client, "n1", time.time(), queue_requests=5, fields={"price": 0.5},
           domains={"d.test": {"pages": 9, "errors": 0, "4xx": 1, "5xx": 0, "429": 1, "503": 0}})
    lost = monitor_contract.run_record(testbed.snapshot("n2", status="closed"), "lost")
    monitor_contract.write_run(redis_client, "scrapy", lost, lost["start_time"], 1000, lost=True)
    served = monitor_api.create_app({"REDIS_URL": redis_url}).test_client().get("/prometheus").get_data(as_text=True)
    served = set(re.findall(r"^(scrapy_[a-z_]+)[{ ]", served, re.M))
    for r in rules:
        used = set(re.findall(r"scrapy_[a-z_]+", r["expr"]))
        assert used and used <= served, (r["alert"], used - served)


# ---------------------------------------------------------------------------- Apprise

def test_apprise_json_url_gets_each_notification_once_and_no_secret_is_logged(make, redis_client, webhook, caplog):
    url = webhook.url.replace("http://", "json://")
    alerter = make("--for", "0", ALERT_NOTIFY_URLS=url, ALERT_TO=None, SMTP_HOST=None, SMTP_PORT=None)
    webhook.fail = 1  # the first try fails: retried on the next evaluation, still arrives once
    with caplog.at_level(logging.INFO):
        report(redis_client, "n1", T0, cpu=99.0)
        alerter.run_once(T0)
        assert webhook.bodies == [] and webhook.hits == 1
        for t in (60, 120):
            report(redis_client, "n1", T0 + t, cpu=99.0)
            alerter.run_once(T0 + t)
        for t in (180, 240, 300):
            report(redis_client, "n1", T0 + t, cpu=10.0)
            alerter.run_once(T0 + t)
    assert [b["title"] for b in webhook.bodies] == ["[scrapy] FIRING 1: cpu on n1", "[scrapy] RESOLVED 1: cpu on n1"]
    assert "host CPU 99%" in webhook.bodies[0]["message"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "SECRET-TOKEN" not in logged and str(webhook.server_address[1]) not in logged
    assert "Apprise json://..." in logged and "attempt 1" in logged
    assert redis_client.hlen("scrapy:alert:outbox") == 0


# ---------------------------------------------------------------------------- silences

def test_silence_by_node_holds_its_firing_back_until_it_expires(make, redis_client, smtp):
    alerter = make("--for", "0", "--repeat", "14400")
    sid = silence(redis_client, T0, node="a")
    for t in (0, 60):
        report(redis_client, "a", T0 + t, cpu=99.0)
        report(redis_client, "b", T0 + t, cpu=99.0)
        alerter.run_once(T0 + t)
    assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on b"]
    record = json.loads(redis_client.hget("scrapy:alert:state", "cpu:a"))
    assert record["state"] == "firing" and record["silenced"] == sid and record["notified"] is False
    report(redis_client, "a", T0 + 3601, cpu=99.0)
    report(redis_client, "b", T0 + 3601, cpu=99.0)
    alerter.run_once(T0 + 3601)  # the silence ended, a still fires: sent now, once
    assert smtp.subjects()[1:] == ["[scrapy] FIRING 1: cpu on a"]
    assert "(still firing)" not in smtp.messages()[1].get_body(("plain",)).get_content()  # its first message
    assert redis_client.hlen("scrapy:alert:silences") == 0  # expired: cleaned by the reader
    report(redis_client, "a", T0 + 3661, cpu=10.0)
    report(redis_client, "b", T0 + 3661, cpu=99.0)
    alerter.run_once(T0 + 3661)
    assert smtp.subjects()[2:] == ["[scrapy] RESOLVED 1: cpu on a"]


def test_silence_by_spider_sends_nothing_and_no_resolution_of_an_unsent_firing(make, redis_client, smtp, webhook):
    alerter = make("--for", "0", ALERT_WEBHOOK_URL=webhook.url)
    silence(redis_client, T0, spider="main_spider")
    report(redis_client, "m1", T0, cpu=99.0)
    report(redis_client, "o1", T0, spider="other", cpu=99.0)
    alerter.run_once(T0)
    report(redis_client, "m1", T0 + 60, cpu=10.0)
    report(redis_client, "o1", T0 + 60, spider="other", cpu=10.0)
    alerter.run_once(T0 + 60)
    assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on o1", "[scrapy] RESOLVED 1: cpu on o1"]
    assert subjects_and_rules(webhook.bodies) == [("firing", "cpu", "o1"), ("resolved", "cpu", "o1")]
    assert redis_client.hlen("scrapy:alert:state") == 0


def test_deleting_a_silence_with_two_alerters_sends_the_firing_once(make, redis_client, smtp):
    first, second = make("--for", "0"), make("--for", "0")
    sid = silence(redis_client, T0, node="n1", rule="cpu")
    report(redis_client, "n1", T0, cpu=99.0, memory=95.0)
    first.run_once(T0)
    assert smtp.subjects() == ["[scrapy] FIRING 1: memory on n1"]  # the silence matches cpu only
    assert monitor_alert_state.delete_silence(redis_client, "scrapy", sid)
    assert not monitor_alert_state.delete_silence(redis_client, "scrapy", sid)
    for t, alerter in ((60, second), (120, first), (180, second)):
        report(redis_client, "n1", T0 + t, cpu=99.0, memory=95.0)
        alerter.run_once(T0 + t)
    assert smtp.subjects()[1:] == ["[scrapy] FIRING 1: cpu on n1"]


def test_a_silences_key_of_the_wrong_type_is_set_aside_and_alerts_go_on(make, redis_client, smtp, caplog):
    redis_client.set("scrapy:alert:silences", "junk")
    report(redis_client, "n1", T0, cpu=99.0)
    make("--for", "0").run_once(T0)
    assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on n1"]
    assert redis_client.get("scrapy:alert:silences:aside") == b"junk"
    assert "scrapy:alert:silences is a string, not a hash" in caplog.text


def test_silence_command_line_adds_lists_and_deletes(redis_url, redis_client):
    env = {"REDIS_URL": redis_url}
    done = run_script("--silence", "spider=main_spider", "--for", "2h", "--comment", "deploy", env=env)
    assert done.returncode == 0, done.stderr
    sid = done.stdout.split()[0]
    [(field, raw)] = redis_client.hgetall("scrapy:alert:silences").items()
    stored = json.loads(raw)
    assert field.decode() == sid and stored["matchers"] == {"spider": "main_spider"} and stored["comment"] == "deploy"
    assert 7190 < stored["until"] - stored["created"] <= 7200
    listed = run_script("--silences", env=env)
    assert listed.returncode == 0 and sid in listed.stdout and "spider=main_spider" in listed.stdout
    assert "deploy" in listed.stdout
    assert run_script("--unsilence", sid, env=env).returncode == 0
    assert redis_client.hlen("scrapy:alert:silences") == 0
    audit = [json.loads(x) for x in redis_client.lrange("scrapy:audit:log", 0, -1)]  # newest first
    assert [(a["action"], a["target"], a["via"], a["from"], a["request"]) for a in audit] == [
        ("silence.delete", sid, "command line", "", ""),
        ("silence.add", '{"spider":"main_spider"}', "command line", "", "")]
    assert all(a["who"].startswith("alert.py on ") and a["outcome"] == "applied" for a in audit)
    assert run_script("--silences", env=env).stdout == "no active silences\n"
    for args, message in ((["--silence", "spider"], "LABEL=VALUE"), (["--silence", "spider=x"], "needs --for"),
                          (["--silence", "colour=red", "--for", "1h"], "unknown matcher 'colour'"),
                          (["--silence", "node=x", "--for", "40d"], "at most 30 days")):
        done = run_script(*args, env=env)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, (args, done.stderr)


# ---------------------------------------------------------------------------- the API

def test_alerts_route_matches_the_alerters_state(make, redis_client, redis_url):
    alerter = make()  # ALERT_FOR 120
    now = monitor_contract.redis_now(redis_client.time())
    report(redis_client, "a", now, cpu=99.0, host="h1")
    report(redis_client, "b", now, memory=95.0, host="h2", spider="other")
    alerter.run_once(now)
    report(redis_client, "a", now + 130, cpu=98.0, host="h1")
    report(redis_client, "b", now + 130, memory=50.0, host="h2", spider="other")
    report(redis_client, "c", now + 130, rss=3000 * 1024 * 1024, host="h3")
    alerter.run_once(now + 130)  # a's CPU fires, b's memory clears, c's RSS is pending
    c = monitor_api.create_app({"REDIS_URL": redis_url, "MONITOR_API_CACHE": "0"}).test_client()
    sid = c.post("/silences", json={"matchers": {"host": "h3"}, "duration": 600}).get_json()["id"]
    body = c.get("/alerts").get_json()
    state = {k.decode(): json.loads(v) for k, v in redis_client.hgetall("scrapy:alert:state").items()}
    assert [(a["rule"], a["node"]) for a in body["alerts"]] == [("rss", "c"), ("cpu", "a")]  # newest first
    for a in body["alerts"]:
        record = state[f"{a['rule']}:{a['node']}"]
        rule = monitor_rules.RULE[a["rule"]]
        assert a["state"] == record["state"] and a["since"] == record["since"]
        assert (a["alertname"], a["severity"]) == (rule.alertname, rule.severity)
        assert a["threshold"] == getattr(alerter.cfg, rule.attr)
        assert record.get("value") in (None, a["value"])  # live from the snapshot; a record keeps the value sent
        assert a["last_sent"] == (record["sent"] if record["state"] == "firing" else None)
    cpu, rss = body["alerts"][1], body["alerts"][0]
    assert (cpu["state"], cpu["value"], cpu["spider"], cpu["host"], cpu["silenced"]) == \
        ("firing", 98.0, "main_spider", "h1", None)
    assert (rss["state"], rss["value"], rss["silenced"]) == ("pending", 3000.0, sid)
    assert body["alerter"]["interval"] == 60 and body["silences"] == 1
    redis_client.delete("scrapy:alert:heartbeat")
    assert c.get("/alerts").get_json()["alerter"] is None  # the page says no alerter is running


def test_silence_routes_follow_the_acting_rules(redis_url, redis_client):
    token = {"Authorization": "Bearer t0ken"}
    c = monitor_api.create_app({"REDIS_URL": redis_url, "MONITOR_API_TOKEN": "t0ken"}).test_client()
    good = {"matchers": {"spider": "main_spider"}, "duration": 3600, "comment": "deploy"}
    assert c.post("/silences", json=good).status_code == 401
    for body, message in (({"matchers": {}, "duration": 60}, "matchers must be a non-empty object"),
                          ({"matchers": {"colour": "red"}, "duration": 60}, "unknown matcher"),
                          ({"matchers": {"node": 7}, "duration": 60}, "must be a non-empty string"),
                          ({"matchers": {"node": "x"}}, "either duration"),
                          ({"matchers": {"node": "x"}, "duration": 60, "until": 9e9}, "either duration"),
                          ({"matchers": {"node": "x"}, "duration": 31 * 86400}, "at most 30 days"),
                          ({"matchers": {"node": "x"}, "duration": "soon"}, "duration"),
                          ({"matchers": {"node": "x"}, "until": 1000}, "until must be"),
                          ({"matchers": {"node": "x"}, "duration": 60, "comment": 5}, "comment"),
                          ([1, 2], "send a JSON object")):
        resp = c.post("/silences", json=body, headers=token)
        assert resp.status_code == 400 and message in resp.get_json()["error"], (body, resp.get_json())
    assert c.post("/silences", data="x", headers=token).status_code == 415
    assert c.get("/silences", headers=token).get_json() == {"silences": []}
    created = c.post("/silences", json=good, headers=token)
    assert created.status_code == 201
    sid = created.get_json()["id"]
    [listed] = c.get("/silences", headers=token).get_json()["silences"]
    assert listed["id"] == sid and listed["matchers"] == good["matchers"] and listed["comment"] == "deploy"
    assert "token" in listed["who"] and "t0ken" not in listed["who"]
    until = monitor_contract.redis_now(redis_client.time()) + 60
    assert c.post("/silences", json={"matchers": {"rule": "cpu"}, "until": until}, headers=token).status_code == 201
    assert c.delete(f"/silences/{sid}").status_code == 401
    assert c.delete(f"/silences/{sid}", headers=token).get_json() == {"id": sid, "deleted": True}
    resp = c.delete(f"/silences/{sid}", headers=token)
    assert resp.status_code == 404 and resp.get_json() == {"error": "no silence by that id"}
    readonly = monitor_api.create_app({"REDIS_URL": redis_url, "MONITOR_API_READONLY": "1"}).test_client()
    assert readonly.post("/silences", json=good).status_code == 403
    assert readonly.get("/silences").status_code == 200
    open_api = monitor_api.create_app({"REDIS_URL": redis_url}).test_client()  # no token, loopback
    assert open_api.post("/silences", json=good, headers={"Origin": "https://evil.example"}).status_code == 403
    assert open_api.post("/silences", json=good).status_code == 201  # curl on the machine itself
    assert len(c.get("/silences", headers=token).get_json()["silences"]) == 2


# ---------------------------------------------------------------------------- the page

def test_page_shows_a_firing_alert_and_silences_it(make, redis_client, redis_server, open_page):
    server = ApiServer(redis_server.url, MONITOR_API_CACHE="0").start()
    try:
        alerter = make("--for", "0")
        now = monitor_contract.redis_now(redis_client.time())
        report(redis_client, "main_spider:w1:1", now, cpu=99.0, host="w1")
        report(redis_client, "main_spider:w2:2", now, cpu=10.0, host="w2")
        report(redis_client, "main_spider:w3:3", now, memory=95.0, host="w3")
        report(redis_client, XSS, now, rss=3000 * 1024 * 1024, host=XSS, spider="__proto__")
        alerter.run_once()
        page = open_page(f"{server.url}/?interval=300")
        until(page, "() => document.getElementById('s-alerts').textContent === '3'")
        row = page.locator('#a-list li[data-alert="cpu:main_spider:w1:1"]')
        row.wait_for(timeout=WAIT)
        assert "ScrapyHostCpuHigh" in row.inner_text() and row.get_attribute("data-state") == "firing"
        hostile = page.locator(f"#a-list li[data-alert={json.dumps('rss:' + XSS)}]")
        assert XSS in hostile.inner_text() and page.evaluate("() => window.__xss") is None
        # Cards and alerts arrive by separate polls: wait until both cards carry their alert.
        carries = ("([node, name]) => (document.querySelector(`[data-node=${JSON.stringify(node)}]`)"
                   "?.getAttribute('data-alert') || '').includes(name)")
        until(page, carries, [XSS, "ScrapyProcessRssHigh"])
        until(page, carries, ["main_spider:w1:1", "ScrapyHostCpuHigh"])
        assert page.locator('[data-node="main_spider:w2:2"]').get_attribute("data-alert") is None
        row.locator("button.silence").click()
        until(page, """() => {
            const li = document.querySelector('#a-list li[data-alert="cpu:main_spider:w1:1"]');
            return li && li.hasAttribute('data-silenced');
        }""")
        until(page, "() => document.getElementById('s-alerts').textContent === '2'")  # the silenced one not counted
        assert page.get_attribute("#s-alerts", "title") == "1 more firing, silenced"
        [stored] = monitor_alert_state.read_silences(redis_client, "scrapy").values()
        assert stored["matchers"] == {"node": "main_spider:w1:1", "rule": "cpu"}
        assert 3500 < stored["until"] - stored["created"] <= 3600
        assert page.is_hidden("#detail")  # the button does not open the card's detail
        # A node's own button silences the whole node.
        page.locator('[data-node="main_spider:w3:3"] button.silence').click()
        silences = lambda: monitor_alert_state.read_silences(redis_client, "scrapy").values()  # noqa: E731
        wait_for(lambda: len(silences()) == 2, 15, what="the node's silence")
        assert {"node": "main_spider:w3:3"} in [s["matchers"] for s in silences()]
        redis_client.delete("scrapy:alert:heartbeat")
        until(page, "() => document.getElementById('alerts').getAttribute('data-alerter') === 'none'")
        assert "No alerter running" in page.inner_text("#a-note")
        # As a file without a token: the buttons are there, disabled, saying why.
        redis_client.delete("scrapy:alert:silences")
        filed = open_page(f"file://{os.path.join(ROOT, 'dashboard.html')}?api={server.url}&interval=300")
        button = filed.locator('#a-list li[data-alert="cpu:main_spider:w1:1"] button.silence')
        button.wait_for(timeout=WAIT)
        assert button.is_disabled() and "?token=" in button.get_attribute("title")
    finally:
        server.stop()
