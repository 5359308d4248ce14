"""Who may do what, as the dashboard shows it (issue 20): headless Chromium against the real API
(``python monitor_api.py``) and a private redis-server. The name and role from GET /whoami, buttons a role
may not use disabled with the reason, an Idempotency-Key on every change, "outcome unknown" followed through
the audit log, and no page of another port that can frame the dashboard."""

import hashlib
import json
import threading
import time

import requests

import monitor_contract
from testbed import WAIT, publish, report, snapshot, until
from testbed_servers import ApiServer, PageHandler, QuietServer, wait_for

TITLE = "Scrapy cluster monitor"
VIEWER_SECRET, OPERATOR_SECRET = "v1ewer-secret", "0perator-secret"
PAUSE = "details.group[data-spider='main_spider'] button[data-command='pause']"
ROW_SILENCE = '#a-list li[data-alert="cpu:main_spider:w1:1"] button.silence'


def tokens_file(tmp_path):
    """alice, a viewer (her secret kept as its sha256), and bob, an operator."""
    path = tmp_path / "tokens"
    path.write_text(f"alice viewer sha256:{hashlib.sha256(VIEWER_SECRET.encode()).hexdigest()}\n"
                    f"bob operator {OPERATOR_SECRET}\n")
    return str(path)


def firing(make, redis_client):
    """Two nodes of main_spider, w1's CPU alert firing."""
    now = monitor_contract.redis_now(redis_client.time())
    report(redis_client, "main_spider:w1:1", now, cpu=99.0, host="w1")
    report(redis_client, "main_spider:w2:2", now, cpu=10.0, host="w2")
    make("--for", "0").run_once()


def who(page, role):
    until(page, "(role) => document.getElementById('who').getAttribute('data-role') === role", role)
    return page.inner_text("#who")


def changes(page):
    """Every POST and DELETE the page sends: (method, path, its Idempotency-Key or None)."""
    sent = []
    page.on("request", lambda r: r.method in ("POST", "DELETE") and sent.append(
        (r.method, r.url.split("?")[0].rsplit("/", 1)[-1], r.headers.get("idempotency-key"))))
    return sent


def bearer(secret):
    return {"Authorization": f"Bearer {secret}"}


# ---------------------------------------------------------------------------- roles

def test_a_viewer_sees_read_only_buttons_and_an_operators_pause_is_audited_by_name(
        make, redis_client, redis_server, open_page, servers, tmp_path):
    firing(make, redis_client)
    server = servers(ApiServer(redis_server.url, MONITOR_API_TOKENS_FILE=tokens_file(tmp_path), MONITOR_API_CACHE="0"))

    viewer = open_page(f"{server.url}/?token={VIEWER_SECRET}&interval=300")
    asked = []
    viewer.on("request", lambda r: asked.append(r.url))
    assert who(viewer, "viewer") == "alice (viewer)"
    pause = viewer.locator(PAUSE)
    pause.wait_for(timeout=WAIT)
    assert pause.is_disabled() and "alice is a viewer: read only" in pause.get_attribute("title")
    for command in ("resume", "stop", "drain"):
        button = viewer.locator(f"details.group[data-spider='main_spider'] button[data-command='{command}']")
        assert button.is_disabled() and "read only" in button.get_attribute("title")
    silence = viewer.locator(ROW_SILENCE)
    silence.wait_for(timeout=WAIT)
    assert silence.is_disabled() and "alice is a viewer: read only" in silence.get_attribute("title")
    viewer.locator('[data-node="main_spider:w1:1"]').click()  # the detail view's buttons too
    until(viewer, "() => document.querySelector('#d-ctl button[data-command=pause]').title.includes('read only')")
    assert viewer.locator("#d-ctl button[data-command='pause']").is_disabled()
    viewer.keyboard.press("Escape")
    viewer.click("#ctl-open")  # the control log needs operator rights: a note, not an error
    until(viewer, "() => document.querySelector('#ctl-entries').innerText.includes('Needs operator rights')")
    assert "Cannot read" not in viewer.inner_text("#ctl-entries")
    time.sleep(1)
    assert not [u for u in asked if "/control/log" in u], "a viewer's page does not ask for what it may not read"
    assert viewer.is_hidden("#banner")

    operator = open_page(f"{server.url}/?token={OPERATOR_SECRET}&interval=300")
    assert who(operator, "operator") == "bob (operator)"
    pause = operator.locator(PAUSE)
    until(operator, "(sel) => !document.querySelector(sel).disabled", PAUSE)
    assert operator.locator(ROW_SILENCE).is_enabled()
    pause.click()
    until(operator, "() => document.getElementById('ctl-msg').textContent.includes('sent to 2 nodes')")
    audit = requests.get(f"{server.url}/audit", headers=bearer(OPERATOR_SECRET), timeout=5).json()["entries"]
    assert [(e["who"], e["action"], e["target"], e["outcome"]) for e in audit] == [
        ("bob", "control.pause", "spider:main_spider", "applied")]
    operator.click("#ctl-open")
    until(operator, "() => document.querySelector('#ctl-entries > li[data-id]')?.innerText.includes('by bob')")
    # The viewer is refused the audit log; the page never showed it a command it could not send.
    assert requests.get(f"{server.url}/audit", headers=bearer(VIEWER_SECRET), timeout=5).status_code == 403


def test_every_change_from_the_page_carries_a_fresh_idempotency_key(
        make, redis_client, redis_server, open_page, servers):
    firing(make, redis_client)
    server = servers(ApiServer(redis_server.url, MONITOR_API_CACHE="0"))  # no token: its own page on loopback acts
    page = open_page(f"{server.url}/?interval=300")
    sent = changes(page)
    assert who(page, "operator") == "anonymous (operator)"
    page.locator(PAUSE).click()
    until(page, "() => document.getElementById('ctl-msg').textContent.includes('sent to 2 nodes')")
    page.locator(PAUSE.replace("pause", "resume")).click()
    until(page, "() => document.getElementById('ctl-msg').textContent.includes('resume (command')")
    page.locator(ROW_SILENCE).click()
    until(page, "() => document.querySelector('#a-list li[data-alert=\"cpu:main_spider:w1:1\"]')"
                "?.hasAttribute('data-silenced')")
    assert [(method, path) for method, path, _ in sent] == [("POST", "control"), ("POST", "control"),
                                                           ("POST", "silences")]
    keys = [key for *_, key in sent]
    assert all(keys) and len(set(keys)) == 3, keys
    audit = requests.get(f"{server.url}/audit", timeout=5).json()["entries"]  # curl on loopback: anonymous operator
    assert sorted(e["request"] for e in audit) == sorted(keys)


# ---------------------------------------------------------------------------- outcome unknown

def test_a_503_outcome_unknown_is_shown_and_followed_to_its_audit_entry(
        redis_client, redis_server, open_page, servers):
    publish(redis_client, snapshot("main_spider:a:1"), stamp=True)
    server = servers(ApiServer(redis_server.url, MONITOR_API_CACHE="0"))
    page = open_page(f"{server.url}/?interval=300")
    held = []

    def stalled(route):
        """Redis 'timed out' during the write: the API answers 503 outcome unknown; the command is not (yet)
        applied. The audit GETs go through to the real API."""
        if route.request.method != "POST":
            return route.continue_()
        key = route.request.headers["idempotency-key"]
        held.append((key, route.request.post_data_json))
        route.fulfill(status=503, content_type="application/json", body=json.dumps(
            {"error": "Redis timed out", "outcome": "unknown", "check": f"/audit?request={key}"}))

    page.route("**/control", stalled)
    audits = []
    page.on("request", lambda r: "/audit?" in r.url and audits.append(r.url))
    who(page, "operator")
    page.locator('[data-node="main_spider:a:1"]').click()
    page.locator("#d-ctl button[data-command='pause']").click()
    until(page, "() => document.getElementById('ctl-msg').textContent.includes('outcome unknown')")
    message = page.inner_text("#ctl-msg")
    assert "Not sent" not in message and "checking the audit log" in message
    wait_for(lambda: audits, 10, what="the page to check the audit log")
    [(key, body)] = held
    assert audits[0].endswith(f"/audit?request={key}")
    # Redis runs the script late, as it may: the same command with the same key reaches the API.
    late = requests.post(f"{server.url}/control", json=body, headers={"Idempotency-Key": key}, timeout=5)
    assert late.status_code == 202
    until(page, "() => document.getElementById('ctl-msg').textContent.includes('the audit log says applied')")
    assert "pause to node main_spider:a:1" in page.inner_text("#ctl-msg")
    assert page.evaluate("() => window.dashboardStats.displayErrors") == 0


# ---------------------------------------------------------------------------- frames

def test_a_page_on_another_port_gets_no_frame_of_the_dashboard_and_no_command_through(
        redis_client, redis_server, open_page, servers):
    publish(redis_client, snapshot("main_spider:a:1"), stamp=True)
    server = servers(ApiServer(redis_server.url, MONITOR_API_CACHE="0"))  # no token, loopback: the open case
    framer_html = f"""<!DOCTYPE html><title>framer</title>
<iframe id="f" src="{server.url}/?interval=300" width="1200" height="800"></iframe>
<script>
  fetch("{server.url}/control", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
    body: JSON.stringify({{command: "pause", all: true}})}}).catch(() => {{}});
</script>"""

    class Framer(PageHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.reply(200, framer_html)

    framer = QuietServer(("127.0.0.1", 0), Framer)
    threading.Thread(target=framer.serve_forever, daemon=True).start()
    try:
        page = open_page(f"http://127.0.0.1:{framer.server_address[1]}/")
        time.sleep(2)
        for x, y in ((100, 100), (400, 150), (700, 200), (1000, 250)):  # where Pause or Stop would be
            page.mouse.click(x, y)
        time.sleep(1)
        framed = [f for f in page.frames if f != page.main_frame]
        assert framed, "the iframe exists"
        for frame in framed:
            assert frame.title() != TITLE
            assert frame.evaluate("() => window.dashboardStats === undefined")
        assert page.title() == "framer"
    finally:
        framer.shutdown()
        framer.server_close()
    assert requests.get(f"{server.url}/control/log", timeout=5).json() == {"log": []}
    assert requests.get(f"{server.url}/audit", timeout=5).json()["entries"] == []
    assert not redis_client.exists(monitor_contract.control_key("scrapy", "commands"))
    # The same dashboard opened directly loads (the frame was refused, not the page).
    assert open_page(f"{server.url}/?interval=300").title() == TITLE
