"""The README's first command: the demo runs the whole system, and Ctrl-C leaves nothing running; the docs'
screenshot is taken from it (into artifacts/; `make screenshot` puts it in docs/dashboard.png), so it shows what the
demo shows today."""

import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import psutil
import pytest
import requests

from testbed import ROOT, until
from testbed_servers import clean_env, free_port, wait_for

SCREENSHOT = f"{ROOT}/docs/dashboard.png" if os.environ.get("UPDATE_SCREENSHOT") == "1" else \
    f"{ROOT}/artifacts/dashboard.png"


def start_demo(*args, **env):
    """``python demo.py *args`` with only the toolkit settings in ``env`` (no REDIS_URL: a private Redis);
    returns the process and ``printed(text)``, whether a line printed so far contains ``text``."""
    demo = subprocess.Popen([sys.executable, "demo.py", *args], cwd=ROOT, env=clean_env(env, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in demo.stdout], daemon=True).start()
    demo.seen = []

    def printed(text):
        while not lines.empty():
            demo.seen.append(lines.get())
        return any(text in line for line in demo.seen)

    return demo, printed


def test_demo_runs_everything_and_stops_cleanly(request):
    port = free_port()
    demo, printed = start_demo("--pages", "400", "--interval", "1", "--kill-after", "8", "--port", str(port),
                               ALERT_INTERVAL="1", ALERT_FOR="1")
    try:
        wait_for(lambda: printed("Dashboard:"), 60, what="the demo to start")
        api = f"http://127.0.0.1:{port}"

        def metrics():
            try:
                return requests.get(f"{api}/metrics", timeout=5).json()
            except (requests.RequestException, ValueError):
                return {}

        nodes = wait_for(lambda: (m := metrics()) and len(m) == 3 and m, 60, what="three nodes")
        assert {n["spider"] for n in nodes.values()} == {"main_spider"}
        assert requests.get(f"{api}/", timeout=5).headers["Content-Type"].startswith("text/html")
        wait_for(lambda: printed("Killed node 3"), 30, what="node 3 killed")
        stale = wait_for(lambda: [n for n, s in metrics().items() if s["state"] == "stale"], 30, what="a stale node")
        wait_for(lambda: printed(f"down on {stale[0]}"), 40, what="the down alert")
        assert any(s["pages"] > 0 for s in metrics().values())
        screenshot(request, api)
        children = psutil.Process(demo.pid).children(recursive=True)
        assert len(children) >= 5  # the API, three nodes (one killed, not yet reaped... or gone), the alerter
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0
    printed("")
    assert any("Stopped everything" in line for line in demo.seen), "".join(demo.seen)
    [logs] = [line.split()[1] for line in demo.seen if line.startswith("Logs:")]
    assert logs.startswith(tempfile.gettempdir()) and not os.path.exists(logs)  # its temporary folder is gone
    psutil.wait_procs(children, timeout=0.5)  # each child's exit; a zombie left to init takes the whole 0.5 s

    def running(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    alive = [p for p in children if running(p)]
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"


def test_demo_serves_the_api_on_monitor_api_port_and_never_on_another():
    port = free_port()
    demo, printed = start_demo("--pages", "50", "--nodes", "0", MONITOR_API_PORT=str(port))
    try:
        wait_for(lambda: printed(f"Dashboard: http://127.0.0.1:{port}/"), 60, what="the demo to start")
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).json() == {}
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0

    with socket.socket() as busy:  # a port asked for and taken: one line, exit 2, nothing started
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "demo.py"], cwd=ROOT, env=clean_env(MONITOR_API_PORT=str(taken)),
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == "", out
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"demo.py: error: MONITOR_API_PORT {taken}: cannot listen on "
                                                   f"127.0.0.1:{taken} ("), out.stderr


def screenshot(request, api):
    """SCREENSHOT: the demo's page once it shows the stale node's down alert (skipped without Chromium)."""
    try:
        browser = request.getfixturevalue("browser")
    except pytest.skip.Exception:
        return
    context = browser.new_context(viewport={"width": 1280, "height": 860}, color_scheme="light")
    try:
        page = context.new_page()
        page.goto(f"{api}/")
        until(page, "() => document.querySelector('[data-state=stale]') && document.querySelector('[data-alert]')")
        page.screenshot(path=SCREENSHOT)
    finally:
        context.close()
