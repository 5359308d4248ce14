"""The whole system on a demo crawl: Redis, a local site, the API, three crawler nodes and the alerter.

    python demo.py        (or: make demo)

One node is killed partway, so the dashboard shows a stale node and the alerter a "node down" alert.
Ctrl-C stops everything this script started.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import redis

from testbed import RedisServer, Site, free_port, stop_process, wait_for

ROOT = os.path.dirname(os.path.abspath(__file__))


def port_free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def existing_redis():
    """REDIS_URL when it is set and answers, else None."""
    url = os.environ.get("REDIS_URL")
    if not url:
        return None
    try:
        redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping()
    except redis.RedisError:
        print("REDIS_URL does not answer; starting a private redis-server instead", flush=True)
        return None
    print("Using REDIS_URL: the demo adds its start URL, main_spider queue and nodes there, and leaves them.",
          flush=True)
    return url


class Demo:
    def __init__(self, args):
        self.args = args
        self.procs = []
        self.logs = tempfile.mkdtemp(prefix="scm-demo-")
        self.server = None
        self.site = None

    def spawn(self, name, cmd, env, log=True):
        out = open(os.path.join(self.logs, f"{name}.log"), "w") if log else None
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if log else None,
                                start_new_session=True)  # Ctrl-C reaches only this script, which stops them
        proc.name = name
        self.procs.append(proc)
        return proc

    def run(self):
        a = self.args
        url = existing_redis()
        if url is None:
            self.server = RedisServer().start()
            url = self.server.url
        print(f"Redis: {url if self.server else 'REDIS_URL'}", flush=True)
        env = {**os.environ, "REDIS_URL": url, "MONITOR_INTERVAL": str(a.interval), "PYTHONUNBUFFERED": "1"}

        self.site = Site(pages=a.pages, mix=True).start()
        redis.Redis.from_url(url).lpush("distributed:start_urls", json.dumps({"url": self.site.url}))
        print(f"Demo site: {a.pages} pages at {self.site.url} (some 404, 500 and slow pages)", flush=True)

        port = a.port if port_free(a.port) else free_port()
        self.spawn("api", [sys.executable, "monitor_api.py", "--port", str(port)], env)
        crawl = [sys.executable, "-m", "scrapy", "crawl", "main_spider", "-s", "CONCURRENT_REQUESTS=4",
                 "-s", f"DOWNLOAD_DELAY={a.delay}", "-s", "MAX_IDLE_TIME_BEFORE_CLOSE=20"]
        nodes = [self.spawn(f"node{i + 1}", crawl, env) for i in range(a.nodes)]
        alert_env = {"ALERT_INTERVAL": "5", "ALERT_FOR": "10", **env}  # quick alerts, unless set
        self.spawn("alert", [sys.executable, "alert.py", "--dry-run"], alert_env, log=False)

        wait_for(lambda: not port_free(port), 30, what="the API")
        api = f"http://127.0.0.1:{port}"
        print(f"\nDashboard: {api}/   (or open dashboard.html?api={api})", flush=True)
        print(f"API:       curl {api}/metrics   curl {api}/metrics/main_spider", flush=True)
        print(f"Logs:      {self.logs}", flush=True)
        print(f"Node 3 will be killed after {a.kill_after} s to show a stale node and a down alert.", flush=True)
        print("Alerts (dry run) appear below. Ctrl-C stops everything.\n", flush=True)

        killed = False
        started = time.monotonic()
        while True:
            time.sleep(0.5)
            if not killed and len(nodes) >= 3 and time.monotonic() - started > a.kill_after:
                nodes[2].send_signal(signal.SIGKILL)
                print(f"Killed node 3 (pid {nodes[2].pid}); it turns stale in {3 * a.interval} s.", flush=True)
                killed = True
            for proc in self.procs:
                if proc.name in ("api", "alert") and proc.poll() is not None:
                    raise SystemExit(f"demo: {proc.name} exited with status {proc.returncode}; see {self.logs}")

    def stop(self):
        for proc in self.procs:  # all at once, so the nodes close (and report "closed") in parallel
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop_process(proc, 0)
        if self.site:
            self.site.stop()
        if self.server:
            self.server.cleanup()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=3000, help="pages on the demo site (default 3000)")
    parser.add_argument("--nodes", type=int, default=3, help="crawler nodes (default 3)")
    parser.add_argument("--port", type=int, default=5000, help="API port, if free (default 5000)")
    parser.add_argument("--interval", type=float, default=2, help="MONITOR_INTERVAL of the nodes (default 2)")
    parser.add_argument("--delay", type=float, default=0.1, help="DOWNLOAD_DELAY of the nodes (default 0.1)")
    parser.add_argument("--kill-after", type=float, default=45, help="seconds before node 3 is killed")
    args = parser.parse_args()
    demo = Demo(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even if started with SIGINT ignored
    try:
        demo.run()
    except KeyboardInterrupt:
        print("\nStopping...", flush=True)
    finally:
        demo.stop()
        print("Stopped everything the demo started.", flush=True)


if __name__ == "__main__":
    main()
