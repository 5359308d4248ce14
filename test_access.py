"""Who may do what, and writes made exact (issue 20): bounded bodies, strict JSON, frames and origins, roles
and named tokens, the audit log, atomic and idempotent writes, the alerter's silence flags. Against a private
redis-server, Flask's test client, a real waitress server and real subprocesses."""

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import waitress
from waitress import wasyncore

import monitor_api
import monitor_contract
import testbed
from testbed import ROOT, clean_env, free_port, wait_for

# ---------------------------------------------------------------------------- helpers


def make_app(url, **config):
    """An app with every setting given, so the environment of the test run does not leak in."""
    settings = {"REDIS_URL": url, "MONITOR_KEY_PREFIX": "scrapy", "MONITOR_API_TOKEN": None,
                "MONITOR_API_TOKENS_FILE": None, "MONITOR_API_TRUST_LOOPBACK": "1",
                "MONITOR_CORS_ORIGINS": "null", "MONITOR_RETENTION": 86400, "MONITOR_API_CACHE": 0,
                "MONITOR_API_HOST": "127.0.0.1", "MONITOR_API_HOSTS": None, "MONITOR_API_READONLY": "0"}
    settings.update(config)
    return monitor_api.create_app(settings)


@contextlib.contextmanager
def serving(app):
    """The app on a real waitress server on loopback, in a thread: yields its base URL."""
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        server.task_dispatcher.shutdown(timeout=5)
        wasyncore.close_all(server._map)
        thread.join(5)


def store(client, *names):
    testbed.publish(client, *(testbed.snapshot(n) for n in names), history_len=10)


def run_alert(*args, env, timeout=20):
    return subprocess.run([sys.executable, os.path.join(ROOT, "alert.py"), *args], env=clean_env(env),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


PAUSE_ALL = {"command": "pause", "all": True}
SILENCE = {"matchers": {"spider": "main_spider"}, "duration": 3600}


def stored_commands(r):
    return r.hgetall(monitor_contract.control_key("scrapy", "commands"))


# ---------------------------------------------------------------------------- 1. bounded input

def test_a_body_over_64_kb_is_413_before_it_is_parsed(redis_url, redis_client, monkeypatch):
    store(redis_client, "main_spider:a:1")
    c = make_app(redis_url).test_client()
    parsed = []
    monkeypatch.setattr(monitor_api, "loads", lambda raw: parsed.append(raw) or json.loads(raw))
    big = json.dumps({**PAUSE_ALL, "comment": "x" * 70_000})
    for path in ("/control", "/silences"):
        resp = c.post(path, data=big, content_type="application/json")
        assert resp.status_code == 413 and "64 KB" in resp.get_json()["error"], path
    # A chunked body (no Content-Length) is cut at 64 KB too.
    with serving(c.application) as base:
        pieces = (big[i:i + 8192].encode() for i in range(0, len(big), 8192))
        chunked = requests.post(base + "/control", data=pieces, headers={"Content-Type": "application/json"},
                                timeout=10)
        assert chunked.status_code == 413 and chunked.json()["error"]
    assert not parsed and not stored_commands(redis_client)
    assert c.post("/control", json=PAUSE_ALL).status_code == 202


def test_the_server_refuses_a_huge_body_without_reading_it(redis_url):
    server = testbed.ApiServer(redis_url).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"POST /control HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 60000000\r\n\r\n{")  # 60 MB announced, none of it sent
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
        resp = requests.post(server.url + "/silences", data=b"[" * 70_000, timeout=10,
                             headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]
    finally:
        server.stop()


@pytest.mark.parametrize("body", [
    '{"command": "pause", "all": true, "comment": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"command": "pause", "all": true, "comment": ' + '{"a":' * 3000 + "1" + "}" * 3000 + "}",
    '{"command": "pause", "all": true, "x": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]}',
    '{"command": "pause", "all": true, "comment": 1e999}',
    '{"command": "pause", "all": true, "comment": NaN}',
    '{"command": "pause", "all": true', "\xff\xfe", "",
])
def test_json_that_fails_nests_too_deep_or_overflows_is_400(redis_url, redis_client, body):
    store(redis_client, "main_spider:a:1")
    c = make_app(redis_url).test_client()
    for path in ("/control", "/silences"):
        data = body.encode("latin-1") if body.startswith("\xff") else body
        resp = c.post(path, data=data, content_type="application/json")
        assert resp.status_code == 400 and resp.is_json and resp.get_json()["error"], (path, resp.data[:200])
    assert not stored_commands(redis_client)


def test_silences_refuse_unknown_fields_and_numbers_out_of_range(redis_url, redis_client):
    c = make_app(redis_url).test_client()
    for body, words in (({**SILENCE, "colour": "red"}, "unknown field 'colour'"),
                        ({**SILENCE, "Duration": 5}, "unknown field"),
                        ({"matchers": {"node": "x"}, "duration": 10 ** 309}, "out of range"),
                        ({"matchers": {"node": "x"}, "until": 10 ** 400}, "out of range")):
        resp = c.post("/silences", data=json.dumps(body), content_type="application/json")
        assert resp.status_code == 400 and words in resp.get_json()["error"], (body, resp.get_json())
    assert not redis_client.hlen("scrapy:alert:silences")


def test_durations_are_plain_decimal_seconds_or_the_documented_units(redis_url, redis_client):
    c = make_app(redis_url).test_client()
    for duration in ("1e-9", "1_000", "1e3", "-60", "+60", "0x10", "1.5h2", "inf", "nan", "2 h", "1w", "", 1e-9,
                     0.5, 0, -5, True):
        resp = c.post("/silences", json={"matchers": {"node": "x"}, "duration": duration})
        assert resp.status_code == 400 and "duration" in resp.get_json()["error"], duration
    for duration, seconds in (("90m", 5400), ("2h", 7200), ("1d", 86400), ("3600", 3600), (3600, 3600),
                              ("45s", 45), ("1.5h", 5400), (90.5, 90.5)):
        resp = c.post("/silences", json={"matchers": {"node": "x"}, "duration": duration})
        assert resp.status_code == 201, (duration, resp.get_json())
        [silence] = [s for s in c.get("/silences").get_json()["silences"] if s["id"] == resp.get_json()["id"]]
        assert abs(silence["until"] - silence["created"] - seconds) < 0.01, duration


# ---------------------------------------------------------------------------- 1. frames and origins

def test_every_response_forbids_framing(redis_url, redis_client, tmp_path):
    store(redis_client, "main_spider:a:1")
    page = tmp_path / "dashboard.html"
    page.write_text("<!DOCTYPE html>")
    c = make_app(redis_url, MONITOR_API_CACHE=60, DASHBOARD_PATH=str(page)).test_client()
    t = make_app(redis_url, MONITOR_API_TOKEN="s3cret").test_client()
    answers = [c.get("/"), c.get("/metrics"), c.get("/metrics"), c.get("/nobody"), c.get("/health"),
               c.post("/control", json={"command": "x"}), c.get("/metrics", headers={"Host": "evil.test"}),
               c.post("/control", data="x" * 70_000, content_type="application/json"), t.get("/metrics"),
               c.options("/metrics", headers={"Origin": "null", "Access-Control-Request-Method": "GET"})]
    for resp in answers:
        assert resp.headers["X-Frame-Options"] == "DENY", resp.request.path
        assert resp.headers["Content-Security-Policy"] == "frame-ancestors 'none'", resp.request.path


def test_a_cross_site_request_never_acts_nor_reads_who_did(redis_url, redis_client):
    store(redis_client, "main_spider:a:1")
    cross = {"Sec-Fetch-Site": "cross-site"}
    tokened = make_app(redis_url, MONITOR_API_TOKEN="s3cret").test_client()
    for c, auth in ((make_app(redis_url).test_client(), {}), (tokened, {"Authorization": "Bearer s3cret"})):
        for method, path, kwargs in (("post", "/control", {"json": PAUSE_ALL}),
                                     ("post", "/silences", {"json": SILENCE}), ("delete", "/silences/abc", {}),
                                     ("get", "/control/log", {}), ("get", "/silences", {})):
            resp = getattr(c, method)(path, headers={**cross, **auth}, **kwargs)
            assert resp.status_code == 403 and "another site" in resp.get_json()["error"], (path, auth)
        assert c.get("/metrics", headers={**cross, **auth}).status_code == 200  # metrics stay readable
        for site in ("same-origin", "same-site", "none"):
            assert c.get("/control/log", headers={"Sec-Fetch-Site": site, **auth}).status_code == 200
    assert not stored_commands(redis_client) and not redis_client.hlen("scrapy:alert:silences")


def test_reading_the_control_log_and_silences_needs_the_rights_of_acting(redis_url, redis_client):
    c = make_app(redis_url).test_client()  # the default CORS origin: null (a page opened as a file)
    for path in ("/control/log", "/silences"):
        for origin in ("null", "http://evil.test"):
            resp = c.get(path, headers={"Origin": origin})
            assert resp.status_code == 403 and "without a token" in resp.get_json()["error"], (path, origin)
        assert c.get(path).status_code == 200  # curl on the machine itself
        assert c.get(path, headers={"Origin": "http://localhost"}).status_code == 200  # the API's own page
        wide = make_app(redis_url, MONITOR_API_HOST="0.0.0.0").test_client()
        assert wide.get(path).status_code == 403
        assert wide.get("/metrics").status_code == 200


def test_trust_loopback_off_makes_a_tokenless_request_a_viewer(redis_url, redis_client):
    store(redis_client, "main_spider:a:1")
    c = make_app(redis_url, MONITOR_API_TRUST_LOOPBACK="0").test_client()
    for method, path, kwargs in (("post", "/control", {"json": PAUSE_ALL}), ("post", "/silences", {"json": SILENCE}),
                                 ("get", "/control/log", {}), ("get", "/silences", {})):
        resp = getattr(c, method)(path, **kwargs)
        assert resp.status_code == 403 and "MONITOR_API_TRUST_LOOPBACK=0" in resp.get_json()["error"], path
    assert c.get("/metrics").status_code == 200
    assert c.get("/whoami").get_json()["role"] == "viewer"
    assert not stored_commands(redis_client)
    pre = c.options("/control", headers={"Origin": "http://localhost", "Access-Control-Request-Method": "POST"})
    assert "POST" not in pre.headers["Access-Control-Allow-Methods"]


# ---------------------------------------------------------------------------- 1. log lines

def test_log_lines_come_after_validation_with_the_outcome_and_escape_request_values(redis_url, redis_client, caplog):
    caplog.set_level(logging.INFO)
    store(redis_client, "main_spider:a:1", "evil\r\nnode")
    c = make_app(redis_url).test_client()
    assert c.post("/control", json={"command": "explode", "all": True}).status_code == 400
    assert c.post("/control", json={"command": "pause", "node": "nobody\r\nAccepted POST"}).status_code == 404
    assert c.post("/control", json={"command": "pause", "node": "evil\r\nnode", "comment": "a\nb"}).status_code == 202
    assert c.post("/control%0d%0aAccepted%20POST%20/control", json=PAUSE_ALL).status_code == 404
    assert c.post("/control", json=PAUSE_ALL, headers={"Origin": "http://x\x1b[2Ky"}).status_code == 403
    assert c.delete("/silences/%1b%5b2Kfake%0d").status_code == 404
    lines = [r.getMessage() for r in caplog.records]
    assert not any("\r" in line or "\n" in line for line in lines), lines
    acting = [line for line in lines if line.startswith(("Accepted", "Refused"))]
    assert [line.split()[0] for line in acting] == ["Refused", "Refused", "Accepted", "Refused", "Refused"], acting
    assert "(400)" in acting[0] and "command must be one of" in acting[0]
    assert "(404)" in acting[1] and "nobody" not in acting[1]  # the body's values are not logged raw
    assert ": 202 command " in acting[2] and "node:evil\\x0d\\x0anode" in acting[2] and "reaching 1 node" in acting[2]
    assert "\\x1b[2K" in acting[3] and "\x1b" not in acting[3]
    assert "/silences/\\x1b[2Kfake" in acting[4] and "(404)" in acting[4]


# ---------------------------------------------------------------------------- 1. alert.py's silence flags

@pytest.mark.parametrize("args, words", [
    (["--silence", ""], "LABEL=VALUE"),
    (["--silence", ",,,", "--for", "1h"], "LABEL=VALUE"),
    (["--silence", "spider=", "--for", "1h"], "LABEL=VALUE"),
    (["--silence", "=x", "--for", "1h"], "LABEL=VALUE"),
    (["--silence", "colour=red", "--for", "1h"], "unknown matcher 'colour'"),
    (["--silence", "spider=a,spider=b", "--for", "1h"], "spider is given twice"),
    (["--silence", "spider=a", "--silence", "spider=b", "--for", "1h"], "spider is given twice"),
    (["--silence", "spider=a", "--for", "1e-9"], "--for must be a duration"),
    (["--silence", "spider=a", "--for", "1_000"], "--for must be a duration"),
    (["--silence", "spider=a", "--for", "soon"], "--for must be a duration"),
    (["--silence", "spider=a", "--for", "1h", "--unsilence", "abc"], "separate commands"),
    (["--silences", "--unsilence", "abc"], "separate commands"),
    (["--silences", "--once"], "does not go with --once"),
    (["--silence", "spider=a", "--for", "1h", "--dry-run"], "does not go with --dry-run"),
    (["--unsilence", ""], "needs a silence id"),
    (["--unsilence", " "], "needs a silence id"),
    (["--comment", "why"], "--comment goes with --silence"),
])
def test_silence_flags_are_checked_before_connecting(args, words):
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: connecting would fail otherwise (exit 1)
    done = run_alert(*args, env={"REDIS_URL": nowhere}, timeout=15)
    assert done.returncode == 2, (args, done.returncode, done.stderr)
    assert done.stderr.count("\n") == 1 and words in done.stderr and not done.stdout, (args, done.stderr)


def test_unsilence_of_a_missing_id_exits_2(redis_url):
    done = run_alert("--unsilence", "nosuchid", env={"REDIS_URL": redis_url})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no silence 'nosuchid'" in done.stderr


def wait_until(predicate, what):
    return wait_for(predicate, 10, what=what)


def elapsed_since(start):
    return time.monotonic() - start
