"""alert.py against real things: a private redis-server, an aiosmtpd SMTP server, a local webhook receiver.

Most tests drive ``Alerter.run_once(now)`` with an explicit clock, so ALERT_FOR and ALERT_REPEAT are
checked without sleeping; a few run ``python alert.py`` as a subprocess, and one kills a real crawler.
"""

import datetime
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading

import pytest
from aiosmtpd.controller import Controller

import alert
import monitor_channels
import monitor_rules
import testbed
from testbed import MB, ROOT, T0, TO, report, run_script
from testbed_servers import Inbox, RedisServer, clean_env, free_port, wait_for

# ---------------------------------------------------------------------------- semantics

def test_fires_once_repeats_after_alert_repeat_and_resolves(make, redis_client, smtp):
    alerter = make()
    for t in (0, 60):  # pending: true for less than ALERT_FOR
        report(redis_client, "n1", T0 + t, cpu=95.0)
        assert alerter.run_once(T0 + t) == []
    assert smtp.envelopes == []
    report(redis_client, "n1", T0 + 120, cpu=95.0)
    alerter.run_once(T0 + 120)
    assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on n1"]
    for t in range(180, 3720, 600):  # still firing, inside ALERT_REPEAT: nothing more
        report(redis_client, "n1", T0 + t, cpu=96.0)
        alerter.run_once(T0 + t)
    assert len(smtp.envelopes) == 1
    report(redis_client, "n1", T0 + 3720, cpu=97.0)
    alerter.run_once(T0 + 3720)  # 3600 s after it was sent
    assert len(smtp.envelopes) == 2
    repeat = smtp.messages()[1]
    assert repeat["Subject"] == "[scrapy] FIRING 1: cpu on n1"
    assert "(still firing)" in repeat.get_body(("plain",)).get_content()
    report(redis_client, "n1", T0 + 3780, cpu=12.0)
    alerter.run_once(T0 + 3780)
    assert smtp.subjects()[2] == "[scrapy] RESOLVED 1: cpu on n1"
    body = smtp.messages()[2].get_body(("plain",)).get_content()
    assert "back to normal: host CPU 12%" in body and "after 1h01m" in body
    for t in (3840, 3900):
        report(redis_client, "n1", T0 + t, cpu=12.0)
        alerter.run_once(T0 + t)
    assert len(smtp.envelopes) == 3
    assert redis_client.hlen("scrapy:alert:state") == 0
    assert smtp.envelopes[0].rcpt_tos == [TO]


def test_pending_alert_that_clears_sends_nothing(make, redis_client, smtp):
    alerter = make()
    report(redis_client, "n1", T0, memory=95.0)
    alerter.run_once(T0)
    assert json.loads(redis_client.hget("scrapy:alert:state", "memory:n1"))["state"] == "pending"
    report(redis_client, "n1", T0 + 60, memory=50.0)
    alerter.run_once(T0 + 60)
    report(redis_client, "n1", T0 + 400, memory=50.0)
    alerter.run_once(T0 + 400)
    assert smtp.envelopes == []
    assert redis_client.hlen("scrapy:alert:state") == 0


def test_one_message_per_evaluation_and_node_down_silences_its_other_alerts(make, redis_client, smtp,
                                                                           webhook):
    alerter = make("--for", "0", ALERT_WEBHOOK_URL=webhook.url)
    report(redis_client, "a", T0, cpu=99.0)
    report(redis_client, "b", T0, memory=99.0)
    report(redis_client, "c", T0 - 100, cpu=99.0, rss=5000 * MB)  # silent for 10 intervals: down
    report(redis_client, "d", T0 - 100, status="closed", cpu=99.0)  # closed normally: never down
    redis_client.hset("scrapy:node:status", "junk", "{not json")
    alerter.run_once(T0)
    assert smtp.subjects() == ["[scrapy] FIRING 3: down on c, cpu on a, memory on b"]
    [body] = webhook.bodies
    assert body["firing"] == 3 and body["resolved"] == 0
    assert body["text"].startswith("[scrapy] FIRING 3")
    assert sorted((a["rule"], a["node"], a["status"]) for a in body["alerts"]) == [
        ("cpu", "a", "firing"), ("down", "c", "firing"), ("memory", "b", "firing")]
    down = next(a for a in body["alerts"] if a["rule"] == "down")
    assert down["value"] == 100 and down["spider"] == "main_spider" and down["host"] == "h1"
    # a's CPU goes down as c comes back: both in one message; c's high CPU is news only now it is up
    report(redis_client, "a", T0 + 60, cpu=10.0)
    report(redis_client, "b", T0 + 60, memory=99.0)
    report(redis_client, "c", T0 + 60, cpu=10.0, rss=5000 * MB)
    alerter.run_once(T0 + 60)
    assert smtp.subjects()[1] == "[scrapy] FIRING 1: rss on c; RESOLVED 2: down on c, cpu on a"
    assert len(webhook.bodies) == 2 and webhook.bodies[1]["resolved"] == 2


def test_a_firing_alert_waits_while_its_node_is_down(make, redis_client, smtp):
    alerter = make("--for", "0", "--repeat", "60")
    report(redis_client, "n1", T0, cpu=99.0)
    alerter.run_once(T0)
    alerter.run_once(T0 + 100)  # no report since T0: down; the CPU alert is neither repeated nor resolved
    alerter.run_once(T0 + 200)  # the down alert repeats (ALERT_REPEAT 60); the CPU alert stays silent
    assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on n1", "[scrapy] FIRING 1: down on n1",
                               "[scrapy] FIRING 1: down on n1"]
    report(redis_client, "n1", T0 + 260, cpu=10.0)
    alerter.run_once(T0 + 260)
    assert smtp.subjects()[3] == "[scrapy] RESOLVED 2: down on n1, cpu on n1"
    redis_client.hdel("scrapy:node:status", "n1")
    alerter.run_once(T0 + 320)
    assert len(smtp.envelopes) == 4


@pytest.mark.parametrize("rule, fields, off", [
    ("errors", {"errors_per_min": 45.0}, {"ALERT_ERRORS_PER_MIN": "0"}),
    ("rss", {"rss": 3000 * MB}, {"ALERT_RSS_MB": "0"}),
    ("cpu", {"cpu": 85.0}, {"ALERT_RULES": "down,memory,stalled,errors,rss"}),
    ("memory", {"memory": 95.0}, {"ALERT_MEMORY_PERCENT": "0"}),
])
def test_each_threshold_rule_fires_and_each_can_be_turned_off(make, redis_client, smtp, rule, fields, off):
    report(redis_client, "n1", T0, **fields)
    make("--for", "0").run_once(T0)
    assert smtp.subjects() == [f"[scrapy] FIRING 1: {rule} on n1"]
    turned_off = make("--for", "0", **off)
    turned_off.run_once(T0 + 1)  # the firing alert is closed, saying why
    assert smtp.subjects()[1] == f"[scrapy] RESOLVED 1: {rule} on n1"
    assert "rule turned off" in smtp.messages()[1].get_body(("plain",)).get_content()
    turned_off.run_once(T0 + 2)
    assert len(smtp.envelopes) == 2 and redis_client.hlen("scrapy:alert:state") == 0


def test_stalled_needs_work_queued_and_pages_standing_still(make, redis_client, smtp):
    alerter = make("--for", "0", "--stall-seconds", "300")
    report(redis_client, "busy", T0, pages=10, queue_requests=50)
    report(redis_client, "stuck", T0, pages=10, queue_requests=50)
    report(redis_client, "idle", T0, pages=10, queue_requests=0, queue_start_urls=0)
    report(redis_client, "plain", T0, pages=10, queue_requests=None, queue_start_urls=None)  # no redis queue
    for t in range(0, 360, 60):
        report(redis_client, "busy", T0 + t, pages=10 + t, queue_requests=50)
        report(redis_client, "stuck", T0 + t, pages=10, queue_requests=50)
        report(redis_client, "idle", T0 + t, pages=10, queue_requests=0, queue_start_urls=0)
        report(redis_client, "plain", T0 + t, pages=10, queue_requests=None, queue_start_urls=None)
        alerter.run_once(T0 + t)
    assert smtp.subjects() == ["[scrapy] FIRING 1: stalled on stuck"]
    assert "requests queued" in smtp.messages()[0].get_body(("plain",)).get_content()
    for node in ("busy", "stuck", "idle", "plain"):
        report(redis_client, node, T0 + 360, pages=11, queue_requests=50)
    alerter.run_once(T0 + 360)
    assert smtp.subjects()[1] == "[scrapy] RESOLVED 1: stalled on stuck"


def test_messages_are_utf8_and_hostile_names_are_escaped(make, redis_client, smtp, webhook):
    node = "蜘蛛:<b>主机</b>\r\nBcc: victim@example.com:7"
    report(redis_client, node, T0, cpu=99.0)
    make("--for", "0", ALERT_WEBHOOK_URL=webhook.url).run_once(T0)
    [msg] = smtp.messages()
    shown = "蜘蛛:<b>主机</b>??Bcc: victim@example.com:7"
    assert msg["Subject"] == f"[scrapy] FIRING 1: cpu on {shown}"
    assert msg["Bcc"] is None and smtp.envelopes[0].rcpt_tos == [TO]
    assert msg["To"] == TO and msg["Message-ID"] and msg["Date"]
    plain, page = msg.get_body(("plain",)), msg.get_body(("html",))
    assert plain.get_content_charset() == "utf-8" and page.get_content_charset() == "utf-8"
    assert shown in plain.get_content() and "host CPU 99% (limit 80%)" in plain.get_content()
    assert "蜘蛛:&lt;b&gt;主机&lt;/b&gt;" in page.get_content() and "<b>主机" not in page.get_content()
    assert "<table" in page.get_content()
    [body] = webhook.bodies
    assert body["alerts"][0]["node"] == node  # the structured part keeps the real id
    assert "cpu on 蜘蛛:&lt;b&gt;主机&lt;/b&gt;" in body["text"] and "<b>" not in body["text"]


# ---------------------------------------------------------------------------- delivery

def test_smtp_refusing_twice_then_accepting_delivers_exactly_once(make, redis_client, smtp, caplog):
    alerter = make("--for", "0", SMTP_USER=None)
    smtp.refuse = 2
    report(redis_client, "n1", T0, cpu=99.0)
    with caplog.at_level(logging.WARNING, logger="alert"):
        for t in range(0, 600, 60):
            report(redis_client, "n1", T0 + t, cpu=99.0)
            alerter.run_once(T0 + t)
    assert smtp.refused == 2
    assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on n1"]
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 2, failures
    assert "attempt 1, next try in 60s" in failures[0] and "attempt 2, next try in 120s" in failures[1]
    assert "451" in failures[0]
    assert redis_client.hlen("scrapy:alert:outbox") == 0


def test_smtp_server_down_then_back_loses_nothing(make, redis_client, smtp, monkeypatch):
    down = free_port()  # nothing listens there
    alerter = make("--for", "0", SMTP_PORT=str(down))
    report(redis_client, "n1", T0, cpu=99.0)
    alerter.run_once(T0)
    report(redis_client, "n1", T0 + 60, cpu=10.0)
    alerter.run_once(T0 + 60)  # resolved while mail is down: queued behind the firing message
    assert redis_client.hlen("scrapy:alert:outbox") == 2
    fixed = make("--for", "0")
    for t in (120, 240):
        report(redis_client, "n1", T0 + t, cpu=10.0)
        fixed.run_once(T0 + t)
    assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on n1", "[scrapy] RESOLVED 1: cpu on n1"]
    report(redis_client, "n1", T0 + 300, cpu=10.0)
    fixed.run_once(T0 + 300)
    assert len(smtp.envelopes) == 2


def test_webhook_and_mail_are_retried_separately(make, redis_client, smtp, webhook):
    alerter = make("--for", "0", ALERT_WEBHOOK_URL=webhook.url)
    webhook.fail = 1
    report(redis_client, "n1", T0, errors_per_min=100.0)
    alerter.run_once(T0)
    assert len(smtp.envelopes) == 1 and webhook.bodies == []
    for t in (60, 120):
        report(redis_client, "n1", T0 + t, errors_per_min=100.0)
        alerter.run_once(T0 + t)
    assert len(smtp.envelopes) == 1
    [body] = webhook.bodies
    assert body["alerts"][0]["rule"] == "errors" and body["alerts"][0]["value"] == 100.0


def test_login_only_with_smtp_user_and_password_never_logged(make, redis_client, caplog):
    server = Inbox()
    controller = Controller(server, hostname="127.0.0.1", port=free_port(), auth_require_tls=False,
                            authenticator=server.authenticate)
    controller.start()
    try:
        report(redis_client, "n1", T0, cpu=99.0)
        make("--for", "0", SMTP_PORT=str(controller.port)).run_once(T0)
        assert len(server.envelopes) == 1 and server.logins == []
        redis_client.delete("scrapy:alert:state")
        report(redis_client, "n1", T0 + 60, cpu=99.0)
        with caplog.at_level(logging.WARNING, logger="alert"):
            wrong = make("--for", "0", SMTP_PORT=str(controller.port), SMTP_USER="robot",
                         SMTP_PASSWORD="hunter2-pw")
            wrong.run_once(T0 + 60)
        assert server.logins and set(server.logins) == {"robot"} and len(server.envelopes) == 1
        [failure] = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
        assert "535" in failure
        assert "hunter2-pw" not in caplog.text
        right = make("--for", "0", SMTP_PORT=str(controller.port), SMTP_USER="robot",
                     SMTP_PASSWORD="s3cret-pw")
        report(redis_client, "n1", T0 + 120, cpu=99.0)
        right.run_once(T0 + 120)
        assert len(server.envelopes) == 2 and server.envelopes[1].mail_from.startswith("alerts@")
        assert server.messages()[1]["Subject"] == "[scrapy] FIRING 1: cpu on n1"
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, and its key."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_smtp_security_starttls_and_ssl(make, redis_client, tls_files, monkeypatch, security):
    # A plain client waits for a greeting that an ssl port never sends: do not wait 10 s for it.
    monkeypatch.setattr(monitor_channels, "SEND_TIMEOUT", 2)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    server = Inbox()
    if security == "ssl":
        controller = Controller(server, hostname="127.0.0.1", port=free_port(), ssl_context=context)
    else:
        controller = Controller(server, hostname="127.0.0.1", port=free_port(), tls_context=context,
                                require_starttls=True)
    controller.start()
    try:
        monkeypatch.setenv("SSL_CERT_FILE", tls_files[0])  # the client trusts our certificate, nothing else
        report(redis_client, "n1", T0, cpu=99.0)
        make("--for", "0", SMTP_PORT=str(controller.port), SMTP_SECURITY=security).run_once(T0)
        assert len(server.envelopes) == 1
        assert server.messages()[0]["Subject"] == "[scrapy] FIRING 1: cpu on n1"
        redis_client.delete("scrapy:alert:state")
        plain = make("--for", "0", SMTP_PORT=str(controller.port), SMTP_SECURITY="none")
        report(redis_client, "n1", T0 + 60, cpu=99.0)
        plain.run_once(T0 + 60)  # a plain-text client is refused (ssl) or told to STARTTLS first
        assert len(server.envelopes) == 1
    finally:
        controller.stop()


# ---------------------------------------------------------------------------- state in Redis

def test_restart_sends_no_duplicate_and_keeps_alert_for(make, redis_client, smtp):
    report(redis_client, "n1", T0, cpu=99.0)
    make().run_once(T0)  # pending since T0 ...
    report(redis_client, "n1", T0 + 120, cpu=99.0)
    make().run_once(T0 + 120)  # ... so a new process fires it on time
    assert len(smtp.envelopes) == 1
    for t in (180, 240):
        report(redis_client, "n1", T0 + t, cpu=99.0)
        make().run_once(T0 + t)
    assert len(smtp.envelopes) == 1


def test_two_instances_at_once_send_one_message(make, redis_client, smtp):
    for round_ in range(5):  # a few rounds, so the two really race
        node, now, before = f"n{round_}", T0 + round_ * 1000, len(smtp.envelopes)
        alerters = [make("--for", "0"), make("--for", "0")]
        barrier = threading.Barrier(2)
        errors = []

        def race(at, barrier=barrier, errors=errors, alerters=alerters):
            def run(a):
                barrier.wait()
                try:
                    a.run_once(at)
                except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                    errors.append(exc)
            threads = [threading.Thread(target=run, args=(a,)) for a in alerters]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)

        report(redis_client, node, now, cpu=99.0)
        race(now)
        assert smtp.subjects()[before:] == [f"[scrapy] FIRING 1: cpu on {node}"]
        report(redis_client, node, now + 60, cpu=99.0, status="closed")
        race(now + 60)
        assert smtp.subjects()[before:] == [f"[scrapy] FIRING 1: cpu on {node}",
                                            f"[scrapy] RESOLVED 1: cpu on {node}"]
        assert errors == []


@pytest.mark.parametrize("fail, mend, says, back", [
    pytest.param(RedisServer.stop, RedisServer.start, "cannot reach Redis", "is back", id="down"),
    pytest.param(lambda s: s.client().config_set("maxmemory", 1),  # every write refused: no evaluation lock
                 lambda s: s.client().config_set("maxmemory", 0),
                 "refused the evaluation (OutOfMemoryError", "accepts the evaluation again", id="refusing"),
])
def test_a_redis_outage_or_refusal_is_logged_once_and_recovered_from(make, smtp, caplog, fail, mend, says, back):
    server = RedisServer().start()
    try:
        alerter = make("--for", "0", REDIS_URL=server.url)
        client = server.client()
        report(client, "n1", T0, cpu=99.0)
        fail(server)
        with caplog.at_level(logging.INFO, logger="alert"):
            assert [alerter.tick(T0 + t) for t in (0, 60, 120)] == [False, False, False]
            mend(server)
            report(client, "n1", T0 + 180, cpu=99.0)
            assert alerter.tick(T0 + 180) is True
        [outage] = [r for r in caplog.records if says in r.getMessage()]
        assert server.url in outage.getMessage() and not outage.exc_info  # one line, no traceback
        assert any(back in r.getMessage() for r in caplog.records)
        assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on n1"]
    finally:
        server.cleanup()


# ---------------------------------------------------------------------------- delivery never goes silent

def dead_letters(r):
    return [json.loads(raw) for raw in r.lrange("scrapy:alert:dead", 0, -1)]


@pytest.mark.parametrize("channel", ["webhook", "mail"])
def test_a_permanent_refusal_is_dead_lettered_and_later_messages_still_arrive(make, redis_client, smtp,
                                                                              webhook, caplog, channel):
    alerter = make("--for", "0", ALERT_WEBHOOK_URL=webhook.url)
    webhook.fail, webhook.status = 1, 404
    smtp.refuse, smtp.refusal = 1, "554 5.6.0 Message refused"
    report(redis_client, "n1", T0, cpu=99.0)
    if channel == "webhook":
        smtp.refuse = 0
    else:
        webhook.fail = 0
    with caplog.at_level(logging.ERROR, logger="alert"):
        alerter.run_once(T0)
    [letter] = dead_letters(redis_client)
    assert letter["value"]["channel"] == channel and letter["field"].endswith(channel)
    assert letter["value"]["alerts"][0]["rule"] == "cpu"
    assert ("404" if channel == "webhook" else "554") in letter["reason"]
    assert redis_client.get("scrapy:alert:dead_total") == b"1"
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "dead letter" in error and letter["reason"] in error and "scrapy:alert:dead" in error
    assert "SECRET-TOKEN" not in caplog.text
    report(redis_client, "n1", T0 + 60, cpu=10.0)
    alerter.run_once(T0 + 60)  # the refused message holds nothing back
    assert [b["alerts"][0]["status"] for b in webhook.bodies] == (
        ["resolved"] if channel == "webhook" else ["firing", "resolved"])
    assert smtp.subjects()[-1] == "[scrapy] RESOLVED 1: cpu on n1"
    assert redis_client.hlen("scrapy:alert:outbox") == 0 and len(dead_letters(redis_client)) == 1


def test_a_transient_failure_is_retried_with_capped_backoff_until_alert_give_up(make, redis_client, smtp,
                                                                                webhook, caplog):
    alerter = make("--for", "0", "--repeat", "14400", "--give-up", "3600", ALERT_WEBHOOK_URL=webhook.url)
    webhook.fail, webhook.status = 10**6, 503
    with caplog.at_level(logging.WARNING, logger="alert"):
        for t in range(0, 3600, 60):
            report(redis_client, "n1", T0 + t, cpu=99.0)
            alerter.run_once(T0 + t)
    # tried at 0, 60, 180, 420, 900 s, then every 900 s (half an interval early)
    assert webhook.hits == 7 and len(smtp.envelopes) == 1  # mail is not held back
    waits = [r.getMessage().split("next try in ")[1].split(",")[0] for r in caplog.records
             if "next try in" in r.getMessage()]
    assert waits == ["60s", "120s", "240s", "480s", "900s", "900s", "900s"]
    assert dead_letters(redis_client) == []
    report(redis_client, "n1", T0 + 3600, cpu=99.0)
    alerter.run_once(T0 + 3600)  # failing for ALERT_GIVE_UP: a dead letter
    assert webhook.hits == 8 and redis_client.hlen("scrapy:alert:outbox") == 0
    [letter] = dead_letters(redis_client)
    assert "failing for 1h00m (8 attempts)" in letter["reason"] and "503" in letter["reason"]
    webhook.fail = 0
    report(redis_client, "n1", T0 + 3660, cpu=10.0)
    alerter.run_once(T0 + 3660)
    assert [b["alerts"][0]["status"] for b in webhook.bodies] == ["resolved"]


def test_a_huge_attempt_count_stored_in_redis_neither_crashes_nor_overflows(make, redis_client, webhook,
                                                                            caplog):
    alerter = make("--for", "0", ALERT_WEBHOOK_URL=webhook.url)
    webhook.fail = 1
    report(redis_client, "n1", T0, cpu=99.0)
    alerter.run_once(T0)
    [(field, raw)] = [(f, v) for f, v in redis_client.hgetall("scrapy:alert:outbox").items() if f.endswith(b"webhook")]
    redis_client.hset("scrapy:alert:outbox", field, json.dumps({**json.loads(raw), "attempts": 10**6}))
    webhook.fail = 1
    with caplog.at_level(logging.WARNING, logger="alert"):
        report(redis_client, "n1", T0 + 60, cpu=99.0)
        alerter.run_once(T0 + 60)
    assert "attempt 1000001, next try in 900s" in caplog.text
    assert json.loads(redis_client.hget("scrapy:alert:outbox", field))["attempts"] == 10**6 + 1
    report(redis_client, "n1", T0 + 960, cpu=99.0)
    alerter.run_once(T0 + 960)
    assert len(webhook.bodies) == 1 and redis_client.hlen("scrapy:alert:outbox") == 0


def test_malformed_alert_records_are_set_aside_and_the_loop_goes_on(make, redis_client, smtp, caplog):
    good_pending = json.dumps({"state": "pending", "since": T0})
    bad_state = {"cpu:n1": "{not json", "memory:n1": json.dumps({"state": "firing", "since": T0}),
                 "disk:n1": good_pending, "rss:n1": "[1, 2]",
                 "errors:n1": '{"state": "firing", "since": NaN, "fired": 1, "sent": 1}'}
    redis_client.hset("scrapy:alert:state", mapping=bad_state)
    redis_client.hset("scrapy:alert:stall", mapping={"n1": '"x"', "n2": "[1]"})
    entry = {"channel": "mail", "created": T0, "attempts": 0, "next_try": T0}
    bad_outbox = {"o1": "nope", "o2": json.dumps({**entry, "alerts": "x"}),
                  "o3": json.dumps({**entry, "attempts": "many", "alerts": [{"status": "firing"}]}),
                  "o4": json.dumps({**entry, "created": 10**30, "alerts": []})}
    redis_client.hset("scrapy:alert:outbox", mapping=bad_outbox)
    redis_client.rpush("scrapy:alert:dead_total", "a list")  # the wrong type: moved aside
    redis_client.set("scrapy:alert:lock", "no expiry")  # no alert.py wrote that: moved aside
    alerter = make("--for", "0")
    report(redis_client, "n1", T0, cpu=99.0)
    with caplog.at_level(logging.WARNING, logger="alert"):
        alerter.run_once(T0)
    assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on n1"]
    letters = dead_letters(redis_client)
    assert sorted((d["key"], d["field"]) for d in letters) == sorted(
        [("scrapy:alert:state", f) for f in bad_state] + [("scrapy:alert:stall", f) for f in ("n1", "n2")]
        + [("scrapy:alert:outbox", f) for f in bad_outbox])
    for d in letters:
        assert f"{d['key']} field {d['field']!r}" in caplog.text
    assert letters[-1]["value"] in list(bad_state.values()) + list(bad_outbox.values()) + ['"x"', "[1]"]
    assert list(redis_client.hkeys("scrapy:alert:state")) == [b"cpu:n1"]
    assert redis_client.hlen("scrapy:alert:outbox") == 0
    assert redis_client.type("scrapy:alert:dead_total:aside") == b"list"
    assert redis_client.get("scrapy:alert:lock:aside") == b"no expiry"
    assert "scrapy:alert:dead_total is a list, not a string: moved to scrapy:alert:dead_total:aside" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alert"):
        report(redis_client, "n1", T0 + 60, cpu=10.0)
        alerter.run_once(T0 + 60)  # set aside once: nothing more to say
    assert smtp.subjects()[1] == "[scrapy] RESOLVED 1: cpu on n1" and caplog.records == []


def test_smtp_refusing_some_recipients_retries_or_dead_letters_only_those(make, redis_client, smtp, caplog):
    later, never = "later@example.com", "nobody@example.com"
    smtp.refuse_rcpt = {later: "450 4.2.1 Mailbox busy", never: "550 5.1.1 No such user"}
    alerter = make("--for", "0", ALERT_TO=f"{TO},{later},{never}")
    report(redis_client, "n1", T0, cpu=99.0)
    with caplog.at_level(logging.WARNING, logger="alert"):
        alerter.run_once(T0)
    assert [e.rcpt_tos for e in smtp.envelopes] == [[TO]]
    assert f"{later}: 450 4.2.1 Mailbox busy" in caplog.text and f"{never}: 550" in caplog.text
    [letter] = dead_letters(redis_client)
    assert letter["value"]["to"] == [never] and "550 5.1.1 No such user" in letter["reason"]
    [waiting] = [json.loads(v) for v in redis_client.hvals("scrapy:alert:outbox")]
    assert waiting["to"] == [later] and waiting["attempts"] == 1
    del smtp.refuse_rcpt[later]
    report(redis_client, "n1", T0 + 60, cpu=99.0)
    alerter.run_once(T0 + 60)
    assert [e.rcpt_tos for e in smtp.envelopes] == [[TO], [later]]  # the accepted ones are not sent twice
    assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on n1"] * 2
    smtp.refuse_rcpt = {TO: "550 no", later: "551 no", never: "452 full"}  # all refused: nobody has it
    report(redis_client, "n1", T0 + 120, cpu=10.0)
    alerter.run_once(T0 + 120)
    [waiting] = [json.loads(v) for v in redis_client.hvals("scrapy:alert:outbox")]
    assert waiting["to"] == [never] and len(smtp.envelopes) == 2
    assert dead_letters(redis_client)[0]["value"]["to"] == [TO, later]


def test_an_alerter_that_lost_the_lock_mid_send_leaves_the_outbox_to_the_holder(make, redis_client, webhook,
                                                                               caplog):
    alerter = make("--for", "0", ALERT_TO=None, SMTP_HOST=None, SMTP_PORT=None, ALERT_WEBHOOK_URL=webhook.url)
    webhook.fail = 1
    report(redis_client, "n1", T0, cpu=99.0)
    alerter.run_once(T0)  # failed once: queued
    [before] = redis_client.hvals("scrapy:alert:outbox")
    # While the next send runs, the lock passes to another alert.py (as when it expires).
    webhook.on_post = lambda: redis_client.set("scrapy:alert:lock", "another", px=60_000)
    report(redis_client, "n1", T0 + 60, cpu=10.0)
    with caplog.at_level(logging.WARNING, logger="alert"):
        alerter.run_once(T0 + 60)
    assert len(webhook.bodies) == 1  # sent, but not recorded: that is the holder's outbox now
    assert "lost the evaluation lock" in caplog.text
    assert before in redis_client.hvals("scrapy:alert:outbox") and redis_client.hlen("scrapy:alert:outbox") == 2
    assert redis_client.get("scrapy:alert:lock") == b"another"
    webhook.on_post = None
    redis_client.delete("scrapy:alert:lock")
    report(redis_client, "n1", T0 + 120, cpu=10.0)
    alerter.run_once(T0 + 120)  # so the firing message arrives twice: at least once, as the README says
    assert [b["alerts"][0]["status"] for b in webhook.bodies] == ["firing", "firing", "resolved"]


def test_an_evaluation_takes_at_most_three_round_trips(make, redis_client, webhook, monkeypatch):
    import redis

    alerter = make("--for", "0", ALERT_TO=None, SMTP_HOST=None, SMTP_PORT=None, ALERT_WEBHOOK_URL=webhook.url)
    sent = []
    real = redis.Connection.send_packed_command

    def counting(self, command, check_health=True):
        sent.append(self)
        return real(self, command, check_health)

    monkeypatch.setattr(redis.Connection, "send_packed_command", counting)
    alerter.r.ping()  # connected: the handshake is not the evaluation's
    trips = []
    for t, cpu in ((0, 10.0), (60, 10.0), (120, 99.0), (180, 99.0), (240, 10.0)):
        report(redis_client, "n1", T0 + t, cpu=cpu, queue_requests=5)
        before = len(sent)
        alerter.run_once(T0 + t)
        trips.append(len(sent) - before)
    # read (+ the queue forecast's history, the first time) and write; a send adds its settling, which releases
    assert trips == [3, 2, 3, 2, 3]
    assert [b["alerts"][0]["status"] for b in webhook.bodies] == ["firing", "resolved"]
    assert not redis_client.exists("scrapy:alert:lock")


def test_a_send_past_its_deadline_is_kept_for_a_retry(make, redis_client, webhook, monkeypatch, caplog):
    import time
    monkeypatch.setattr(alert, "SEND_DEADLINE", 0.5)
    alerter = make("--for", "0", ALERT_TO=None, SMTP_HOST=None, SMTP_PORT=None, ALERT_WEBHOOK_URL=webhook.url)
    answer = threading.Event()
    webhook.on_post = lambda: answer.wait(2)  # a receiver that answers too late: at 2 s, or once the test is done
    report(redis_client, "n1", T0, cpu=99.0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="alert"):
        alerter.run_once(T0)
    assert time.monotonic() - started < 1.5
    answer.set()
    assert "no answer within 0.5 s" in caplog.text
    [waiting] = [json.loads(v) for v in redis_client.hvals("scrapy:alert:outbox")]
    assert waiting["attempts"] == 1


def test_tick_logs_any_error_with_its_traceback_and_keeps_going(make, redis_client, smtp, monkeypatch, caplog):
    alerter = make("--for", "0")
    report(redis_client, "n1", T0, cpu=99.0)
    real = monitor_rules.evaluate

    def broken(*args):
        raise KeyError("a bug")

    monkeypatch.setattr(alert, "evaluate", broken)
    with caplog.at_level(logging.ERROR, logger="alert"):
        assert alerter.tick(T0) is False
    [record] = caplog.records
    assert record.exc_info and "KeyError: 'a bug'" in caplog.text
    assert not redis_client.exists("scrapy:alert:lock")  # released
    monkeypatch.setattr(alert, "evaluate", real)
    report(redis_client, "n1", T0 + 60, cpu=99.0)
    assert alerter.tick(T0 + 60) is True
    assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on n1"]


# ---------------------------------------------------------------------------- honest diagnostics, no secrets

def test_a_key_of_the_wrong_type_is_named_not_taken_for_an_outage(make, redis_client, smtp, caplog):
    alerter = make("--for", "0")
    redis_client.set("scrapy:node:status", "not a hash")
    with caplog.at_level(logging.INFO, logger="alert"):
        assert [alerter.tick(T0), alerter.tick(T0 + 60)] == [False, False]
        messages = [r.getMessage() for r in caplog.records]
        assert [m for m in messages if "scrapy:node:status is a string, not a hash" in m] == [messages[0]]
        assert len(messages) == 1 and "cannot reach Redis" not in caplog.text
        redis_client.delete("scrapy:node:status")
        redis_client.lpush("scrapy:alert:state", "x")
        report(redis_client, "n1", T0 + 120, cpu=99.0)
        assert alerter.tick(T0 + 120) is True
    assert "scrapy:alert:state is a list, not a hash: moved to scrapy:alert:state:aside" in caplog.text
    assert "is readable again" in caplog.text
    assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on n1"]


def test_no_secret_in_logs_help_or_errors(make, redis_client, webhook, caplog, capsys):
    with pytest.raises(SystemExit):
        alert.main(["--help"])
    assert "hunter2" not in capsys.readouterr().out
    down = make(REDIS_URL=f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    with caplog.at_level(logging.INFO, logger="alert"):
        assert down.tick(T0) is False
        # a webhook whose answer quotes a URL with a password
        webhook.fail, webhook.status = 1, 302
        webhook.headers = {"Location": "gopher://robot:hunter2@127.0.0.1/elsewhere"}
        report(redis_client, "n1", T0, cpu=99.0)
        make("--for", "0", ALERT_WEBHOOK_URL=webhook.url).run_once(T0)
    assert "redis://:***@127.0.0.1" in caplog.text and "Redirection to url" in caplog.text
    assert f"webhook http://127.0.0.1:{webhook.server_address[1]}/..." in caplog.text
    assert "hunter2" not in caplog.text and "SECRET-TOKEN" not in caplog.text


def test_each_rule_is_one_row_and_every_notification_names_its_alertname_and_severity(make, redis_client,
                                                                                      webhook):
    assert {r.name: (r.alertname, r.severity) for r in monitor_rules.RULES} == {
        "down": ("ScrapyNodeDown", "critical"), "cpu": ("ScrapyHostCpuHigh", "warning"),
        "memory": ("ScrapyHostMemoryHigh", "warning"), "stalled": ("ScrapyCrawlStalled", "warning"),
        "errors": ("ScrapyErrorsHigh", "warning"), "rss": ("ScrapyProcessRssHigh", "warning"),
        "run": ("ScrapyRunFailed", "warning"),
        "coverage": ("ScrapyItemFieldCoverageLow", "warning"), "latency": ("ScrapyDownloadLatencyHigh", "warning"),
        "queue": ("ScrapyQueueGrowing", "warning"), "finished": ("ScrapyCrawlFinished", "info"),
        "domain_refusing": ("ScrapyDomainRefusing", "warning"),
        "redis_memory": ("ScrapyRedisMemoryHigh", "warning"), "redis_evictions": ("ScrapyRedisEvicting", "critical")}
    report(redis_client, "a", T0, cpu=99.0, memory=99.0, errors_per_min=99.0, rss=9000 * MB)
    report(redis_client, "b", T0 - 100)
    make("--for", "0", ALERT_WEBHOOK_URL=webhook.url).run_once(T0)
    [body] = webhook.bodies
    assert sorted((a["rule"], a["alertname"], a["severity"]) for a in body["alerts"]) == [
        ("cpu", "ScrapyHostCpuHigh", "warning"), ("down", "ScrapyNodeDown", "critical"),
        ("errors", "ScrapyErrorsHigh", "warning"), ("memory", "ScrapyHostMemoryHigh", "warning"),
        ("rss", "ScrapyProcessRssHigh", "warning")]


# ---------------------------------------------------------------------------- the command line

def script_env(redis_url, smtp, **env):
    base = {"REDIS_URL": redis_url, "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp.port), "ALERT_TO": TO,
            "ALERT_FOR": "0"}
    base.update(env)
    return base


def test_once_from_cron_and_two_processes_at_once_send_one_message(redis_url, redis_client, smtp):
    import time
    now = time.time()
    report(redis_client, "n1", now, cpu=99.0)
    env = script_env(redis_url, smtp)
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "alert.py"), "--once"], env=clean_env(env),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    assert smtp.subjects() == ["[scrapy] FIRING 1: cpu on n1"]
    again = run_script("--once", env=env)  # the next cron run: no duplicate
    assert again.returncode == 0, again.stderr
    assert len(smtp.envelopes) == 1
    down = run_script("--once", env={**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})  # cron: one line
    [line] = [x for x in down.stderr.splitlines() if "ERROR" in x]
    assert down.returncode == 1 and "cannot reach Redis" in line and line.endswith("; exiting (--once)")
    assert redis_client.hexists("scrapy:alert:state", "cpu:n1")


def test_dry_run_prints_and_sends_and_stores_nothing(redis_url, redis_client, smtp, webhook):
    import time
    report(redis_client, "n1", time.time(), cpu=99.0)
    env = script_env(redis_url, smtp, ALERT_WEBHOOK_URL=webhook.url)
    result = run_script("--once", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert "would send to mail to ops@example.com" in result.stdout
    assert "[scrapy] FIRING 1: cpu on n1" in result.stdout
    assert "SECRET-TOKEN" not in result.stdout + result.stderr
    assert smtp.envelopes == [] and webhook.bodies == []
    assert not redis_client.exists("scrapy:alert:state", "scrapy:alert:outbox")
    nothing = run_script("--once", "--dry-run", env={"REDIS_URL": redis_url, "ALERT_FOR": "0", "ALERT_CPU": "1"})
    assert nothing.returncode == 0 and "set ALERT_TO, ALERT_WEBHOOK_URL or ALERT_NOTIFY_URLS" in nothing.stdout
    assert "Alert: ALERT_CPU is not a setting and is ignored (did you mean ALERT_CPU_PERCENT?)" in nothing.stderr
    real = run_script("--once", env=env)  # the dry runs took nothing away
    assert real.returncode == 0 and len(smtp.envelopes) == 1 and len(webhook.bodies) == 1


def test_no_channel_prints_each_notification_and_keeps_running(redis_url, redis_client):
    import time
    report(redis_client, "n1", time.time(), cpu=99.0)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "alert.py")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=clean_env({"REDIS_URL": redis_url, "ALERT_FOR": "0", "ALERT_INTERVAL": "0.5"}))
    try:
        wait_for(lambda: redis_client.hexists("scrapy:alert:state", "cpu:n1")
                 and not redis_client.exists("scrapy:alert:outbox"), 20, what="the alert to be printed")
        beats = set()  # the heartbeat's "at" of each evaluation seen from now on

        def evaluations():
            raw = redis_client.get("scrapy:alert:heartbeat")
            beats.update([json.loads(raw)["at"]] if raw else [])
            return len(beats) >= 3

        wait_for(evaluations, 20, what="two more evaluations")  # polled ten times an interval: none is missed
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    assert out.count("[scrapy] FIRING 1: cpu on n1") == 1 and "host CPU 99% (limit 80%)" in out
    assert err.count("no channel configured") == 1 and "Traceback" not in err


@pytest.mark.parametrize("env, message", [
    ({"REDIS_URL": "redis://:hunter2@localhost:port/0"},
     "REDIS_URL: redis://:***@localhost:port/0 is not a usable Redis URL"),
    ({"REDIS_URL": "localhost:6379"}, "REDIS_URL: localhost:6379 is not a usable Redis URL"),
    ({"REDIS_URL": "redis://localhost/0?password=hunter2&bogus=1"}, "unknown option 'bogus'"),
    ({"ALERT_WEBHOOK_URL": "https://hooks.example.com:99999/hunter2"}, "ALERT_WEBHOOK_URL must be an http://"),
    ({"ALERT_WEBHOOK_URL": "https://hooks.example.com:x/hunter2"}, "ALERT_WEBHOOK_URL must be an http://"),
    ({"ALERT_WEBHOOK_URL": "https://hooks.example.com/hunter2 x"}, "ALERT_WEBHOOK_URL must be an http://"),
    ({"ALERT_WEBHOOK_URL": "ftp://hooks.example.com/hunter2"}, "ALERT_WEBHOOK_URL must be an http://"),
    ({"ALERT_INTERVAL": "1e308"}, "ALERT_INTERVAL must be a number of seconds, more than 0 and at most"),
    ({"ALERT_INTERVAL": "0"}, "ALERT_INTERVAL must be a number of seconds, more than 0"),
    ({"ALERT_FOR": "nan"}, "ALERT_FOR must be a number of seconds"),
    ({"ALERT_REPEAT": "-1"}, "ALERT_REPEAT must be a number of seconds, 0 or more"),
    ({"ALERT_GIVE_UP": "inf"}, "ALERT_GIVE_UP must be a number of seconds"),
    ({"ALERT_STALL_SECONDS": "1e308"}, "ALERT_STALL_SECONDS must be a number of seconds"),
    ({"ALERT_CPU_PERCENT": "nan"}, "ALERT_CPU_PERCENT must be a number 0 or more"),
    ({"SMTP_PORT": "70000"}, "SMTP_PORT must be a port number"),
])
def test_absurd_settings_are_one_line_and_exit_2(monkeypatch, capsys, env, message):
    for name, *_ in alert.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALERT_TO", TO)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert alert.main(["--once"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("alert.py: error: ")
    assert message in err and "hunter2" not in err


@pytest.mark.parametrize("env, args, message", [
    ({"ALERT_TO": TO, "ALERT_CPU_PERCENT": "lots"}, [], "ALERT_CPU_PERCENT must be a number 0 or more, not 'lots'"),
    ({"ALERT_TO": TO}, ["--for", "-5"], "ALERT_FOR must be a number of seconds, 0 or more"),
    ({"SMTP_HOST": "mail.example.com"}, [], "ALERT_TO is not set"),
    ({"ALERT_TO": TO, "SMTP_SECURITY": "tls"}, [], "SMTP_SECURITY must be one of none, starttls, ssl"),
    ({"ALERT_TO": TO, "ALERT_RULES": "cpu,disk"}, [], "unknown rule 'disk'"),
    ({"ALERT_TO": TO}, ["--bogus"], "unrecognized arguments: --bogus"),
    ({"ALERT_TO": TO, "ALERT_INTERVAL": "1e308"}, [], "ALERT_INTERVAL must be a number of seconds"),
])
def test_bad_configuration_exits_2_with_one_line(redis_url, env, args, message):
    result = run_script(*args, "--once", env={"REDIS_URL": redis_url, **env})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("alert.py: error: ")
    assert message in result.stderr
    assert result.stdout == ""


def test_help_lists_every_setting_and_test_mail_sends_one(redis_url, smtp):
    result = run_script("--help", env={})
    assert result.returncode == 0
    for name, *_ in alert.SETTINGS:
        assert name in result.stdout
    sent = run_script("--test-mail", env=script_env(redis_url, smtp))
    assert sent.returncode == 0, sent.stderr
    assert smtp.subjects() == ["[scrapy] test message from alert.py"]
    refused = run_script("--test-mail", env=script_env(redis_url, smtp, SMTP_PORT=str(free_port())))
    assert refused.returncode == 1 and refused.stderr.count("failed") == 1


def test_test_mail_with_a_webhook_only(redis_url, webhook):
    result = run_script("--test-mail", env={"REDIS_URL": redis_url, "ALERT_WEBHOOK_URL": webhook.url})
    assert result.returncode == 0, result.stderr
    [body] = webhook.bodies
    assert "test message" in body["text"]


# ---------------------------------------------------------------------------- a real crawler node

def test_killed_crawler_gives_one_down_and_one_resolved_message(make, redis_client, redis_url, smtp, site,
                                                                 crawlers):
    import time
    redis_client.lpush("distributed:start_urls", json.dumps({"url": site.url}))
    env = {"REDIS_URL": redis_url, "MONITOR_INTERVAL": "1", "MONITOR_NODE_ID": "main_spider:box:1"}
    node = crawlers(env=env, settings={"MAX_IDLE_TIME_BEFORE_CLOSE": 0})
    alerter = make("--for", "0", ALERT_RULES="down")

    def snapshot():
        return testbed.get_node(redis_client, "main_spider:box:1", "scrapy")

    wait_for(lambda: (snapshot() or {}).get("state") == "live", 60, what="the crawler's first report")
    alerter.run_once(time.time())
    assert smtp.envelopes == []
    node.send_signal(signal.SIGKILL)
    node.wait(10)
    wait_for(lambda: snapshot()["state"] == "stale", 10, what="the killed node to go stale")
    for _ in range(3):
        alerter.run_once(time.time())
    assert smtp.subjects() == ["[scrapy] FIRING 1: down on main_spider:box:1"]
    assert "no report for" in smtp.messages()[0].get_body(("plain",)).get_content()
    back = crawlers(env=env, settings={"MAX_IDLE_TIME_BEFORE_CLOSE": 0})
    wait_for(lambda: snapshot()["state"] == "live", 60, what="the node to report again")
    for _ in range(3):
        alerter.run_once(time.time())
    assert smtp.subjects() == ["[scrapy] FIRING 1: down on main_spider:box:1",
                               "[scrapy] RESOLVED 1: down on main_spider:box:1"]
    assert "reporting again" in smtp.messages()[1].get_body(("plain",)).get_content()
    assert back.poll() is None


def test_the_store_decodes_again_only_records_that_changed_and_hands_out_copies(redis_client):
    import monitor_alert_state

    store = monitor_alert_state.Store(redis_client, "scrapy")
    key = store.key["state"]
    record = {"state": "firing", "since": T0, "fired": T0, "sent": T0, "value": 91.0}
    redis_client.hset(key, mapping={"cpu:a": json.dumps(record), "cpu:b": json.dumps(record)})
    first = store.read(T0).state
    first["cpu:a"]["value"] = -1  # a caller's change stays its own
    redis_client.hset(key, "cpu:b", json.dumps(dict(record, value=95.0)))
    redis_client.hset(key, "cpu:c", "{not json")
    second = store.read(T0).state
    assert second == {"cpu:a": record, "cpu:b": dict(record, value=95.0)}
    assert second["cpu:a"] is not first["cpu:a"]
    redis_client.hset(key, "cpu:a", json.dumps({"state": "gone"}))  # a kept record that turns malformed
    assert set(store.read(T0).state) == {"cpu:b"}
