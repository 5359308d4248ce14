"""Who may do what, and writes made exact (issue 20): bounded bodies, strict JSON, frames and origins, roles
and named tokens, the audit log, atomic and idempotent writes, the alerter's silence flags. Against a private
redis-server, Flask's test client, a real waitress server and real subprocesses."""

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

import monitor_acting
import monitor_api
import monitor_changes
import monitor_contract
import testbed
import testbed_servers
from testbed import ROOT
from testbed_servers import clean_env, free_port, serving, wait_for

# ---------------------------------------------------------------------------- helpers


def make_app(url, **config):
    """An app with every setting given, so the environment of the test run does not leak in."""
    settings = {"REDIS_URL": url, "MONITOR_KEY_PREFIX": "scrapy", "MONITOR_API_TOKEN": None,
                "MONITOR_API_TOKENS_FILE": None, "MONITOR_API_TRUST_LOOPBACK": "1",
                "MONITOR_CORS_ORIGINS": "null", "MONITOR_RETENTION": 86400, "MONITOR_API_CACHE": 0,
                "MONITOR_API_HOST": "127.0.0.1", "MONITOR_API_HOSTS": None, "MONITOR_API_READONLY": "0"}
    settings.update(config)
    return monitor_api.create_app(settings)


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
    monkeypatch.setattr(monitor_changes, "loads", lambda raw: parsed.append(raw) or json.loads(raw))
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
    server = testbed_servers.ApiServer(redis_url).start()
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


def test_a_cross_site_request_without_a_token_never_acts_nor_reads_who_did(redis_url, redis_client):
    store(redis_client, "main_spider:a:1")
    cross = {"Sec-Fetch-Site": "cross-site"}
    c = make_app(redis_url).test_client()
    for method, path, kwargs in (("post", "/control", {"json": PAUSE_ALL}),
                                 ("post", "/silences", {"json": SILENCE}), ("delete", "/silences/abc", {}),
                                 ("get", "/control/log", {}), ("get", "/silences", {})):
        resp = getattr(c, method)(path, headers=cross, **kwargs)
        assert resp.status_code == 403 and "another site" in resp.get_json()["error"], path
    assert c.get("/metrics", headers=cross).status_code == 200  # metrics stay readable
    for site in ("same-origin", "same-site", "none"):
        assert c.get("/control/log", headers={"Sec-Fetch-Site": site}).status_code == 200
    assert not stored_commands(redis_client) and not redis_client.hlen("scrapy:alert:silences")
    # With the token in its header (a dashboard opened as a file with ?token=: Chromium calls that cross-site),
    # the token is the proof: a foreign page cannot have it.
    tokened = make_app(redis_url, MONITOR_API_TOKEN="s3cret").test_client()
    auth = {"Authorization": "Bearer s3cret", **cross}
    assert tokened.get("/control/log", headers=auth).status_code == 200
    assert tokened.post("/control", headers=auth, json=PAUSE_ALL).status_code == 202
    assert len(stored_commands(redis_client)) == 1


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


# ---------------------------------------------------------------------------- 2. atomic writes

@pytest.mark.parametrize("key, kind", [("control:log", "string"), ("control:commands", "string"),
                                       ("control:seq", "hash"), ("audit:log", "string"), ("audit:seq", "list")])
def test_a_wrong_type_key_fails_the_whole_command_before_any_write(redis_url, redis_client, key, kind, caplog):
    store(redis_client, "main_spider:a:1")
    full = f"scrapy:{key}"
    if kind == "string":
        redis_client.set(full, "oops")
    elif kind == "hash":
        redis_client.hset(full, "x", "y")
    else:
        redis_client.rpush(full, "x")
    before = {k: redis_client.dump(k) for k in redis_client.keys("scrapy:*") if not k.startswith(b"scrapy:node:")}
    c = make_app(redis_url).test_client()
    resp = c.post("/control", json=PAUSE_ALL)
    assert resp.status_code == 500 and resp.get_json()["error"].startswith(f"{full} is a {kind}, not a ")
    assert "nothing was written" in resp.get_json()["error"]
    after = {k: redis_client.dump(k) for k in redis_client.keys("scrapy:*") if not k.startswith(b"scrapy:node:")}
    assert after == before  # nothing stored, logged, counted or audited
    if key.startswith("audit"):
        resp = c.post("/silences", json=SILENCE)
        assert resp.status_code == 500 and full in resp.get_json()["error"]
        assert not redis_client.exists("scrapy:alert:silences")


def test_command_ids_never_go_backwards_when_the_sequence_is_lost(redis_url, redis_client):
    store(redis_client, "main_spider:a:1")
    c = make_app(redis_url).test_client()
    ids = [c.post("/control", json=PAUSE_ALL).get_json()["id"] for _ in range(3)]
    assert ids == [1, 2, 3]
    redis_client.delete(monitor_contract.control_key("scrapy", "seq"))
    assert c.post("/control", json={"command": "resume", "all": True}).get_json()["id"] == 4
    # The log gone too: the commands still stored hold the highest id.
    redis_client.delete(monitor_contract.control_key("scrapy", "seq"), monitor_contract.control_key("scrapy", "log"))
    resumed = c.post("/control", json={"command": "resume", "spider": "main_spider"}).get_json()["id"]
    assert resumed == 5
    raws = redis_client.hmget(monitor_contract.control_key("scrapy", "commands"),
                              monitor_contract.control_targets("main_spider:a:1", "main_spider"))
    assert monitor_contract.newest_command(raws)["id"] == 5  # the node obeys the newest, as the API answered


def test_the_silence_cap_holds_under_concurrency(redis_url, redis_client):
    now = monitor_contract.redis_now(redis_client.time())
    silence = monitor_contract.dumps({"matchers": {"node": "x"}, "until": now + 3600, "comment": "", "who": "t",
                                      "created": now})
    redis_client.hset("scrapy:alert:silences", mapping={f"s{i}": silence for i in range(999)})
    with serving(make_app(redis_url)) as base:
        barrier = threading.Barrier(40)

        def post(_):
            barrier.wait()
            return requests.post(base + "/silences", json=SILENCE, timeout=10).status_code

        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(40) as pool:
            codes = list(pool.map(post, range(40)))
    assert sorted(codes) == [201] + [400] * 39, codes
    assert redis_client.hlen("scrapy:alert:silences") == 1000


# ---------------------------------------------------------------------------- 3. named tokens and roles

SECRETS = {"ada": "ada-secret-1", "otto": "otto-secret-2", "vic": "vic-secret-3"}


def tokens_file(tmp_path, lines=None, name="tokens"):
    path = tmp_path / name
    path.write_text(lines if lines is not None else (
        "# name role secret\n"
        f"ada admin sha256:{monitor_gate_digest(SECRETS['ada'])}\n"
        f"otto operator {SECRETS['otto']}\n"
        f"vic viewer sha256:{monitor_gate_digest(SECRETS['vic']).upper()}\n"))
    return path


def monitor_gate_digest(secret):
    import hashlib
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer(name):
    return {"Authorization": f"Bearer {SECRETS[name]}"}


def test_a_viewer_reads_what_it_may_and_is_refused_every_change_and_the_audit(redis_url, redis_client, tmp_path):
    store(redis_client, "main_spider:a:1")
    c = make_app(redis_url, MONITOR_API_TOKENS_FILE=str(tokens_file(tmp_path))).test_client()
    for path in ("/metrics", "/metrics/main_spider", "/spiders", "/alerts", "/prometheus", "/runs", "/openapi.json",
                 "/metrics/main_spider:a:1/history"):
        assert c.get(path, headers=bearer("vic")).status_code == 200, path
    assert c.get("/whoami", headers=bearer("vic")).get_json() == {"name": "vic", "role": "viewer",
                                                                  "readonly": False, "why": ""}
    for method, path, kwargs in (("get", "/control/log", {}), ("get", "/silences", {}), ("get", "/audit", {}),
                                 ("post", "/control", {"json": PAUSE_ALL}), ("post", "/silences", {"json": SILENCE}),
                                 ("delete", "/silences/abc", {})):
        resp = getattr(c, method)(path, headers=bearer("vic"), **kwargs)
        assert resp.status_code == 403 and "'vic' is a viewer" in resp.get_json()["error"], path
    assert not stored_commands(redis_client) and not redis_client.exists("scrapy:alert:silences")
    for name, role in (("otto", "operator"), ("ada", "admin")):
        assert c.get("/whoami", headers=bearer(name)).get_json()["role"] == role
        assert c.get("/control/log", headers=bearer(name)).status_code == 200
    anonymous = c.get("/whoami").get_json()
    assert anonymous["name"] == "anonymous" and anonymous["role"] == "none"
    assert c.get("/metrics").status_code == 401
    assert make_app(redis_url).test_client().get("/whoami").get_json()["role"] == "operator"  # loopback, curl


def test_an_operator_acts_and_its_name_is_in_the_control_log_and_the_audit(redis_url, redis_client, tmp_path):
    store(redis_client, "main_spider:a:1")
    c = make_app(redis_url, MONITOR_API_TOKENS_FILE=str(tokens_file(tmp_path))).test_client()
    sent = c.post("/control", json={**PAUSE_ALL, "comment": "429s"}, headers=bearer("otto"))
    assert sent.status_code == 202
    [entry] = c.get("/control/log", headers=bearer("otto")).get_json()["log"]
    assert (entry["who"], entry["from"], entry["via"]) == ("otto", "127.0.0.1", "token")
    sid = c.post("/silences", json=SILENCE, headers=bearer("otto")).get_json()["id"]
    assert c.delete(f"/silences/{sid}", headers=bearer("otto")).status_code == 200
    assert c.post("/control", json=PAUSE_ALL, headers=bearer("vic")).status_code == 403
    assert c.post("/control", json={"command": "x", "all": True}, headers=bearer("ada")).status_code == 400
    log = c.get("/audit", headers=bearer("ada")).get_json()["entries"]
    assert [(e["who"], e["action"], e["outcome"]) for e in log] == [
        ("ada", "control", "refused"), ("vic", "control", "refused"), ("otto", "silence.delete", "applied"),
        ("otto", "silence.add", "applied"), ("otto", "control.pause", "applied")]
    control = log[-1]
    assert (control["from"], control["target"], control["comment"], control["ref"]) == (
        "127.0.0.1", "all", "429s", sent.get_json()["id"])
    assert log[0]["status"] == 400 and log[1]["status"] == 403
    assert log[2]["target"] == sid and log[3]["ref"] == sid
    assert [e["id"] for e in log] == [5, 4, 3, 2, 1] and all(e["at"] > 1e9 for e in log)
    mine = c.get("/audit", headers=bearer("otto")).get_json()["entries"]
    assert {e["who"] for e in mine} == {"otto"} and len(mine) == 3
    assert c.get("/audit?who=ada", headers=bearer("otto")).status_code == 403
    assert [e["who"] for e in c.get("/audit?who=vic", headers=bearer("ada")).get_json()["entries"]] == ["vic"]
    assert len(c.get("/audit?action=control", headers=bearer("ada")).get_json()["entries"]) == 3
    page = c.get("/audit?limit=2", headers=bearer("ada")).get_json()
    assert [e["id"] for e in page["entries"]] == [5, 4] and page["next"] == 4
    rest = c.get(f"/audit?limit=2&before={page['next']}", headers=bearer("ada")).get_json()
    assert [e["id"] for e in rest["entries"]] == [3, 2]


def test_the_audit_log_is_capped_never_expired(redis_url, redis_client):
    for i in range(monitor_acting.AUDIT_KEEP + 5):
        monitor_acting.write_audit(redis_client, "scrapy", {"who": "t", "action": "x", "n": i})
    assert redis_client.llen("scrapy:audit:log") == monitor_acting.AUDIT_KEEP
    assert redis_client.ttl("scrapy:audit:log") == -1
    newest = json.loads(redis_client.lindex("scrapy:audit:log", 0))
    assert newest["id"] == monitor_acting.AUDIT_KEEP + 5 and newest["n"] == monitor_acting.AUDIT_KEEP + 4


def test_a_rotated_tokens_file_takes_effect_without_a_restart(redis_url, redis_client, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = tokens_file(tmp_path)
    c = make_app(redis_url, MONITOR_API_TOKENS_FILE=str(path)).test_client()
    assert c.get("/metrics", headers=bearer("otto")).status_code == 200
    new = "otto-secret-rotated"
    path.write_text(f"ada admin {SECRETS['ada']}\notto operator sha256:{monitor_gate_digest(new)}\n"
                    "broken line\nvic superuser x\n")
    # At most 16 tries, each a refused token until the file is re-read (20 would hold the address up).
    wait_for(lambda: c.get("/metrics", headers={"Authorization": f"Bearer {new}"}).status_code == 200, 5,
             step=0.3, what="the rotated token accepted")
    assert c.get("/metrics", headers=bearer("otto")).status_code == 401
    assert c.get("/metrics", headers=bearer("vic")).status_code == 401  # its line is malformed now: skipped
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2 and "line 3" in skipped[0] and "line 4" in skipped[1] and "role" in skipped[1]
    assert not any("superuser x" in r.getMessage() for r in caplog.records)  # a line is named, not quoted
    [reload] = c.get("/audit?action=tokens", headers=bearer("ada")).get_json()["entries"]
    assert reload["action"] == "tokens.reload" and "ada, otto" in reload["comment"] and "2 line(s)" in reload["comment"]


def test_a_tokens_file_with_no_valid_line_refuses_to_start(redis_url, tmp_path):
    for text in ("", "# only a comment\n", "ada admin\n", "ada root secret\n"):
        path = tokens_file(tmp_path, text)
        done = subprocess.run([sys.executable, os.path.join(ROOT, "monitor_api.py"), "--port", str(free_port())],
                              env=clean_env({"REDIS_URL": redis_url, "MONITOR_API_TOKENS_FILE": str(path)}),
                              capture_output=True, text=True, timeout=20, cwd=ROOT)
        assert done.returncode == 2 and "MONITOR_API_TOKENS_FILE" in done.stderr, (text, done.stderr)
        assert done.stderr.strip().count("\n") <= len(text.splitlines()), done.stderr  # the skipped lines, then one


def test_monitor_api_token_is_one_admin_named_token(redis_url, redis_client, tmp_path):
    path = tokens_file(tmp_path)
    c = make_app(redis_url, MONITOR_API_TOKEN="s3cret", MONITOR_API_TOKENS_FILE=str(path)).test_client()
    assert c.get("/whoami", headers={"Authorization": "Bearer s3cret"}).get_json()["name"] == "token"
    assert c.get("/audit", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/whoami", headers=bearer("otto")).get_json()["role"] == "operator"


def test_exactly_one_token_per_request_and_a_query_token_only_on_get(redis_url, redis_client, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    store(redis_client, "main_spider:a:1")
    c = make_app(redis_url, MONITOR_API_TOKENS_FILE=str(tokens_file(tmp_path))).test_client()
    assert c.get(f"/metrics?token={SECRETS['vic']}").status_code == 200
    for path, headers in ((f"/metrics?token={SECRETS['vic']}", bearer("vic")),
                          (f"/metrics?token={SECRETS['vic']}&token={SECRETS['ada']}", {}),
                          ("/metrics?" + "&".join(f"token=guess{i}" for i in range(6000)), {})):
        resp = c.get(path, headers=headers)
        assert resp.status_code == 400 and "exactly one token" in resp.get_json()["error"]
    resp = c.post(f"/control?token={SECRETS['otto']}", json=PAUSE_ALL)
    assert resp.status_code == 400 and "Authorization" in resp.get_json()["error"]
    assert not stored_commands(redis_client)
    assert not any(s in r.getMessage() for r in caplog.records for s in SECRETS.values())


def test_21_refused_tokens_from_one_address_give_429_for_a_minute_logged_once(redis_url, redis_client, tmp_path,
                                                                              caplog):
    caplog.set_level(logging.INFO)
    c = make_app(redis_url, MONITOR_API_TOKENS_FILE=str(tokens_file(tmp_path))).test_client()
    codes = [c.get("/metrics", headers={"Authorization": f"Bearer guess{i}"}).status_code for i in range(21)]
    assert codes == [401] * 20 + [429]
    blocked = c.get("/metrics", headers=bearer("ada"))  # the right token too, for the minute
    assert blocked.status_code == 429 and 50 <= int(blocked.headers["Retry-After"]) <= 61
    assert c.get("/health").status_code == 200
    other = c.get("/metrics", headers=bearer("ada"), environ_base={"REMOTE_ADDR": "10.0.0.9"})
    assert other.status_code == 200  # another address is not held up
    logged = [r.getMessage() for r in caplog.records if "Refusing every request" in r.getMessage()]
    assert len(logged) == 1 and "127.0.0.1" in logged[0]


def test_many_tokens_are_looked_up_not_tried_one_by_one(redis_url, tmp_path, monkeypatch):
    import hmac

    lines = "".join(f"user{i} viewer sha256:{monitor_gate_digest(f'secret-{i}')}\n" for i in range(5000))
    c = make_app(redis_url, MONITOR_API_TOKENS_FILE=str(tokens_file(tmp_path, lines))).test_client()
    compared = []
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or a == b)
    assert c.get("/whoami", headers={"Authorization": "Bearer secret-4999"}).get_json()["name"] == "user4999"
    assert c.get("/whoami", headers={"Authorization": "Bearer secret-x"}).status_code == 401
    assert len(compared) <= 2


# ---------------------------------------------------------------------------- 5. idempotency, unknown outcomes

def test_a_repeat_with_the_same_idempotency_key_returns_the_first_answer_and_changes_nothing(redis_url, redis_client):
    store(redis_client, "main_spider:a:1")
    c = make_app(redis_url).test_client()
    first = c.post("/control", json=PAUSE_ALL, headers={"Idempotency-Key": "k1"})
    again = c.post("/control", json=PAUSE_ALL, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202 and first.get_json() == again.get_json()
    other = c.post("/control", json=PAUSE_ALL, headers={"Idempotency-Key": "k2"})
    assert other.get_json()["id"] == first.get_json()["id"] + 1
    assert len(c.get("/control/log").get_json()["log"]) == 2
    added = c.post("/silences", json=SILENCE, headers={"Idempotency-Key": "s1"})
    assert c.post("/silences", json=SILENCE, headers={"Idempotency-Key": "s1"}).get_json() == added.get_json()
    assert redis_client.hlen("scrapy:alert:silences") == 1
    sid = added.get_json()["id"]
    gone = c.delete(f"/silences/{sid}", headers={"Idempotency-Key": "d1"})
    assert gone.status_code == 200
    assert c.delete(f"/silences/{sid}", headers={"Idempotency-Key": "d1"}).get_json() == gone.get_json()
    assert c.delete(f"/silences/{sid}", headers={"Idempotency-Key": "d2"}).status_code == 404
    entries = c.get("/audit").get_json()["entries"]
    assert [(e["action"], e["outcome"]) for e in entries] == [
        ("silence.delete", "refused"), ("silence.delete", "applied"), ("silence.add", "applied"),
        ("control.pause", "applied"), ("control.pause", "applied")]
    assert 0 < redis_client.ttl(monitor_acting.idempotency_key("scrapy", "anonymous", "k1")) <= 86400
    for bad in ("", "x" * 201, "caf\u00e9"):
        resp = c.post("/control", json=PAUSE_ALL, headers={"Idempotency-Key": bad.encode().decode("latin-1")})
        assert resp.status_code == 400 and "Idempotency-Key" in resp.get_json()["error"]


class HoldingProxy:
    """A TCP proxy in front of Redis that holds the bytes of a write script (those carrying ``marker``) for
    ``hold`` seconds before passing them on, whether or not the client has given up meanwhile: a Redis that
    stalls after the API sent its write, then runs it."""

    def __init__(self, port, marker=b"next_id"):
        self.upstream = ("127.0.0.1", port)
        self.marker, self.hold = marker, 0.0
        self.passed = threading.Event()  # held bytes were passed on and Redis answered them
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        up = socket.create_connection(self.upstream)
        answered = threading.Event()
        threading.Thread(target=self._back, args=(up, client, answered), daemon=True).start()
        held = False
        with client, up:
            while True:
                try:
                    data = client.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                if self.hold and self.marker in data:
                    held, hold = True, self.hold
                    answered.clear()
                    threading.Event().wait(hold)  # the stall: the client times out meanwhile
                up.sendall(data)
            if held and answered.wait(5):
                self.passed.set()

    @staticmethod
    def _back(up, client, answered):
        while True:
            try:
                data = up.recv(65536)
            except OSError:
                return
            if not data:
                return
            answered.set()
            try:
                client.sendall(data)
            except OSError:
                pass  # the client gave up: Redis's answer goes nowhere

    def close(self):
        self.listener.close()


def test_a_redis_stall_during_the_write_is_503_outcome_unknown_and_a_repeat_is_exact(redis_server, redis_url,
                                                                                     redis_client, caplog):
    caplog.set_level(logging.INFO)
    store(redis_client, "main_spider:a:1")
    proxy = HoldingProxy(redis_server.port)
    try:
        c = make_app(proxy.url).test_client()
        assert c.get("/metrics").status_code == 200
        proxy.hold = 1.5  # beyond the API's 0.5 s timeout
        stalled = c.post("/control", json={"command": "stop", "all": True}, headers={"Idempotency-Key": "stop-1"})
        assert stalled.status_code == 503 and "Retry-After" not in stalled.headers
        body = stalled.get_json()
        assert body["outcome"] == "unknown" and body["check"] == "/audit?request=stop-1" and body["error"]
        assert proxy.passed.wait(10)  # Redis ran the script after all: the command is applied
        proxy.hold = 0
        assert stored_commands(redis_client)
        repeat = c.post("/control", json={"command": "stop", "all": True}, headers={"Idempotency-Key": "stop-1"})
        assert repeat.status_code == 202
        [entry] = c.get("/control/log").get_json()["log"]
        assert repeat.get_json()["id"] == entry["id"]  # the first answer, and no second command
        [audited] = c.get(body["check"]).get_json()["entries"]
        assert audited["outcome"] == "applied" and audited["ref"] == entry["id"]
        lines = [r.getMessage() for r in caplog.records if "POST /control" in r.getMessage()]
        assert lines[0].startswith("Unknown outcome") and lines[1].startswith("Accepted") and "repeat" in lines[1]
        # A silence likewise.
        proxy.passed.clear()
        proxy.hold = 1.5
        resp = c.post("/silences", json=SILENCE, headers={"Idempotency-Key": "s-1"})
        assert resp.status_code == 503 and resp.get_json()["outcome"] == "unknown"
        assert proxy.passed.wait(10)
        proxy.hold = 0
        assert redis_client.hlen("scrapy:alert:silences") == 1
        assert c.post("/silences", json=SILENCE, headers={"Idempotency-Key": "s-1"}).status_code == 201
        assert redis_client.hlen("scrapy:alert:silences") == 1
    finally:
        proxy.close()


def test_a_refused_read_is_logged_once_without_the_token(redis_url, caplog):
    c = make_app(redis_url, MONITOR_API_TOKEN="s3cret").test_client()
    with caplog.at_level(logging.WARNING, logger="monitor_api"):
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong-guess"}).status_code == 401
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Refused GET /metrics")]
    assert "(401)" in line and "wrong-guess" not in caplog.text and "s3cret" not in caplog.text
