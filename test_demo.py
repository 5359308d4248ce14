"""The README's first command: the demo runs the whole system, and Ctrl-C leaves nothing running."""

import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import requests

from conftest import ROOT, clean_env, free_port, wait_for


def test_demo_runs_everything_and_stops_cleanly():
    port = free_port()
    env = clean_env(ALERT_INTERVAL="1", ALERT_FOR="1", PYTHONUNBUFFERED="1")  # no REDIS_URL: a private Redis
    demo = subprocess.Popen(
        [sys.executable, "demo.py", "--pages", "400", "--interval", "1", "--kill-after", "8", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in demo.stdout], daemon=True).start()
    seen = []

    def printed(text):
        while not lines.empty():
            seen.append(lines.get())
        return any(text in line for line in seen)

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
        children = psutil.Process(demo.pid).children(recursive=True)
        assert len(children) >= 5  # the API, three nodes (one killed, not yet reaped... or gone), the alerter
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0
    printed("")
    assert any("Stopped everything" in line for line in seen), "".join(seen)
    time.sleep(0.5)
    alive = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
