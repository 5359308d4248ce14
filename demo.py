"""The whole system on a demo crawl: Redis, a local site, the API, three crawler nodes and the alerter.

    python demo.py        (or: make demo)

One node is killed partway, so the dashboard shows a stale node and the alerter a "node down" alert.
Ctrl-C stops everything this script started. It reads the environment every script reads (``--help``
lists it) and passes it on to the API, the nodes and the alerter.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import redis

from monitor_settings import (
    ALERT,
    API,
    CRAWLER,
    DEMO,
    SETTING,
    SETTINGS,
    ConfigError,
    Parser,
    described,
    env,
    exit_config_error,
    value,
)
from testbed import ROOT
from testbed_servers import RedisServer, Site, crawl_command, free_port, stop_process, wait_for

# The demo's nodes report every 2 s unless MONITOR_INTERVAL says otherwise: a demo should move.
DEMO_INTERVAL = 2
# Alerts come quickly in the demo, unless ALERT_INTERVAL and ALERT_FOR say otherwise.
DEMO_ALERT_INTERVAL, DEMO_ALERT_FOR = 5, 10

# The alerter's channels: blank in the demo, which prints each notification instead of sending it.
CHANNELS = ("ALERT_TO", "ALERT_WEBHOOK_URL", "ALERT_NOTIFY_URLS", "ALERT_ALERTMANAGER_URL")
# Every setting the demo reads or passes on to the API, the nodes and the alerter is checked by their rules
# before anything starts (monitor_settings): a value they would refuse ends the demo with one line.
CHECKED = [s for s in SETTINGS if s.env and set(s.readers) & {CRAWLER, API, ALERT, DEMO}]
DEMO_DEFAULTS = (f"In the demo MONITOR_INTERVAL defaults to {DEMO_INTERVAL}, ALERT_INTERVAL to "
                 f"{DEMO_ALERT_INTERVAL} and ALERT_FOR to {DEMO_ALERT_FOR};\nevery other MONITOR_*, ALERT_* and "
                 "SMTP_* setting is passed on as it is, checked first.")


def settings(args):
    """(host, port, interval) from the flags, else the environment as every script reads it, else the demo's
    defaults; every other setting the scripts read is checked as they check it. A port asked for (--port or
    MONITOR_API_PORT) must be free; with none, 5000 if free, else any. ConfigError for a setting the demo
    cannot run with."""
    for s in CHECKED:
        value(s.name)
    host = value("MONITOR_API_HOST", args.host, "--host" if args.host else None)
    interval = value("MONITOR_INTERVAL", args.interval or env("MONITOR_INTERVAL") or DEMO_INTERVAL,
                     "--interval" if args.interval else None)
    asked, raw = ("--port", args.port) if args.port else ("MONITOR_API_PORT", env("MONITOR_API_PORT"))
    default = SETTING["MONITOR_API_PORT"].default
    if raw is None:
        return host, (default if listen_error(host, default) is None else free_port()), interval
    number = value("MONITOR_API_PORT", raw, asked)
    error = listen_error(host, number)
    if error:
        raise ConfigError(f"{asked} {raw}: cannot listen on {host}:{raw} ({error}); "
                          f"stop what uses it or ask for another port")
    return host, number, interval


def listen_error(host, port):
    """Why a server could not listen on host:port now (binding as waitress does), or None if it could."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return exc.strerror
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None


def local_host(host):
    """The address that reaches a server listening on ``host`` from this machine (a wildcard: loopback)."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def listening(host, port):
    try:
        with socket.create_connection((local_host(host), port), timeout=1):
            return True
    except OSError:
        return False


def existing_redis():
    """REDIS_URL when it is set and answers, else None."""
    url = env("REDIS_URL")
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
    def __init__(self, args, host, port, interval):
        self.args = args
        self.host, self.port, self.interval = host, port, interval
        self.procs = []
        self.logs = tempfile.mkdtemp(prefix="scm-demo-")  # removed on exit, unless the demo ends on a failure
        self.failed = False
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
        a, host, port, interval = self.args, self.host, self.port, self.interval
        url = existing_redis()
        if url is None:
            self.server = RedisServer().start()
            url = self.server.url
        print(f"Redis: {url if self.server else 'REDIS_URL'}, key prefix {value('MONITOR_KEY_PREFIX')!r}", flush=True)
        child_env = {**os.environ, "REDIS_URL": url, "MONITOR_INTERVAL": f"{interval:g}", "PYTHONUNBUFFERED": "1"}

        self.site = Site(pages=a.pages, mix=True).start()
        redis.Redis.from_url(url).lpush("distributed:start_urls", json.dumps({"url": self.site.url}))
        print(f"Demo site: {a.pages} pages at {self.site.url} (some 404, 500 and slow pages)", flush=True)

        server = self.spawn("api", [sys.executable, "monitor_api.py", "--host", host, "--port", str(port)], child_env)
        crawl = crawl_command("main_spider", CONCURRENT_REQUESTS=4, DOWNLOAD_DELAY=a.delay,
                              MAX_IDLE_TIME_BEFORE_CLOSE=20)
        nodes = [self.spawn(f"node{i + 1}", crawl, child_env) for i in range(a.nodes)]
        # The alerter keeps its state in Redis (so the page shows its alerts) but sends nothing: with no
        # channel it prints each notification here.
        alert_env = {**child_env, "ALERT_INTERVAL": env("ALERT_INTERVAL") or str(DEMO_ALERT_INTERVAL),
                     "ALERT_FOR": env("ALERT_FOR") or str(DEMO_ALERT_FOR),
                     **dict.fromkeys(CHANNELS, "")}
        self.spawn("alert", [sys.executable, "alert.py"], alert_env, log=False)

        wait_for(lambda: server.poll() is not None or listening(host, port), 30, what="the API")
        self.check_running()
        reach = local_host(host)
        api = f"http://[{reach}]:{port}" if ":" in reach else f"http://{reach}:{port}"
        print(f"\nDashboard: {api}/   (or open dashboard.html?api={api})", flush=True)
        print(f"API:       curl {api}/metrics   curl {api}/metrics/main_spider", flush=True)
        if env("MONITOR_API_TOKEN"):
            print("           (MONITOR_API_TOKEN is set: add ?token=<token> to these URLs)", flush=True)
        print(f"Logs:      {self.logs} (removed when the demo stops)", flush=True)
        if len(nodes) >= 3:
            print(f"Node 3 will be killed after {a.kill_after} s to show a stale node and a down alert.", flush=True)
        print("Alerts appear below (and on the page); none is sent anywhere. Ctrl-C stops everything.\n", flush=True)

        killed = False
        started = time.monotonic()
        while True:
            time.sleep(0.5)
            if not killed and len(nodes) >= 3 and time.monotonic() - started > a.kill_after:
                nodes[2].send_signal(signal.SIGKILL)
                print(f"Killed node 3 (pid {nodes[2].pid}); it turns stale in {3 * interval:g} s.", flush=True)
                killed = True
            self.check_running()

    def check_running(self):
        """The API and the alerter must keep running: the demo ends when either exits."""
        for proc in self.procs:
            if proc.name in ("api", "alert") and proc.poll() is not None:
                self.failed = True  # its log says why: kept
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
        if not self.failed:
            shutil.rmtree(self.logs, ignore_errors=True)


def main():
    parser = Parser(prog="demo.py", description=__doc__.splitlines()[0],
                    epilog=described(DEMO) + "\n" + DEMO_DEFAULTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=2000,
                        help="pages on the demo site, every one linked (default 2000)")
    parser.add_argument("--nodes", type=int, default=3, help="crawler nodes (default 3)")
    parser.add_argument("--host", help="API address (default: $MONITOR_API_HOST or 127.0.0.1)")
    parser.add_argument("--port", help="API port, which must be free (default: $MONITOR_API_PORT, "
                                       "else 5000 if free, else any free port)")
    parser.add_argument("--interval", help=f"MONITOR_INTERVAL of the nodes (default: $MONITOR_INTERVAL "
                                           f"or {DEMO_INTERVAL})")
    parser.add_argument("--delay", type=float, default=0.1, help="DOWNLOAD_DELAY of the nodes (default 0.1)")
    parser.add_argument("--kill-after", type=float, default=45, help="seconds before node 3 is killed (default: 45)")
    try:
        args = parser.parse_args()
        demo = Demo(args, *settings(args))  # a bad setting or a busy port ends the demo before it starts anything
    except ConfigError as exc:
        sys.exit(exit_config_error(parser.prog, exc))
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
