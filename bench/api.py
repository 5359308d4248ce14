"""Benchmark GET /metrics with 1,000 nodes: monitor_api.py (waitress) against the seed's naive Flask app.

    python bench/api.py [--nodes 1000] [--clients 16] [--seconds 8] [--insight]

Starts its own redis-server and both servers on loopback, fills Redis the way the node monitor does, and
drives each server with the same closed-loop keep-alive clients (each sends its next request when the
last answer has arrived), while every node reports again every 10 s (100 writes a second). The seed's
app: HGETALL, json.loads of every value, jsonify, Flask's development server. Clients send
``Accept-Encoding: gzip`` as browsers, curl --compressed and requests do; the uncompressed figure is
printed too. Prints requests per second, latency percentiles and the ratio (goal: at least 10 times the
seed's figure, p99 of 25 ms or less with 16 clients). Takes about 50 seconds.

    python bench/api.py --tokens-file 100 [--nodes 1000]

measures instead what named tokens cost: the same /metrics with a token, against an API holding one token
(MONITOR_API_TOKEN) and against one reading a 100-line MONITOR_API_TOKENS_FILE (sha256 secrets, the token
used on its last line), in the same run, alternately (three times each; medians compared). Tokens are
looked up by their sha256, not tried one by one, so the two should not differ beyond noise.
"""

import argparse
import asyncio
import gzip
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import requests  # noqa: E402

import testbed  # noqa: E402
from testbed_servers import RedisServer, clean_env, free_port, wait_for  # noqa: E402

NAIVE_APP = """
import json, sys
from flask import Flask, jsonify
from redis import Redis

app = Flask(__name__)
redis_client = Redis.from_url(sys.argv[1])

@app.route("/metrics", methods=["GET"])
def get_metrics():
    raw_data = redis_client.hgetall("scrapy:node:status")
    parsed_data = {}
    for spider_name, metrics_json in raw_data.items():
        spider_name = spider_name.decode("utf-8")
        parsed_data[spider_name] = json.loads(metrics_json.decode("utf-8"))
    return jsonify(parsed_data)

app.run(host="127.0.0.1", port=int(sys.argv[2]), debug=False)
"""


# With --insight, every snapshot also carries crawl insight at its budget (20 domains, 30 fields, 5 samples).
INSIGHT = {}


def snapshot(i, now):
    """Node i's snapshot, every field the extension writes, numbers varying per node; eight nodes a host."""
    host = f"crawler-{i // 8:03d}.example.internal"
    return testbed.snapshot(
        f"main_spider:{host}:{10000 + i}", now=now, host=host, pid=10000 + i, cpu=10 + i % 80 + 0.5,
        memory=30 + i % 60 + 0.25, bytes_sent=123456789 + i * 1000, bytes_recv=987654321 + i * 3000,
        rss=150_000_000 + i * 4096, process_cpu=20.5 + i % 30, pages=5000 + i, items=4800 + i, requests=5100 + i,
        errors=i % 7, warnings=i % 11, retries=i % 13, exceptions=i % 5, status_2xx=4900 + i,
        queue_requests=123456, queue_dupefilter=987654, **INSIGHT)


def fill(client, nodes):
    now = int(time.time())
    testbed.publish(client, *(snapshot(i, now) for i in range(nodes)))


def keep_reporting(client, nodes, interval, stop, pause):
    """Every node reports again every ``interval`` seconds, spread evenly, as a live cluster does."""
    i, batch = 0, max(1, nodes // int(interval * 10))
    while not stop.wait(0.1):
        if pause.is_set():
            continue
        now = int(time.time())
        snaps = [snapshot((i + k) % nodes, now) for k in range(batch)]
        i += batch
        for snap in snaps:
            snap["pages"] += now % 1000  # new figures each time
        testbed.publish(client, *snaps)


async def drive(port, path, headers, clients, seconds):
    """Closed-loop keep-alive clients for ``seconds``: (latencies in seconds, errors, bytes per response)."""
    latencies, errors, sizes = [], [0], []
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode()
    deadline = time.perf_counter() + seconds

    async def client():
        reader = writer = None
        while time.perf_counter() < deadline:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2 ** 20)
            start = time.perf_counter()
            try:
                writer.write(request)
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                length = 0
                for line in head.split("\r\n"):
                    if line.startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                errors[0] += 1
                writer.close()
                writer = None
                continue
            latencies.append(time.perf_counter() - start)
            sizes.append(len(body))
            if head[9:12] not in ("200", "304"):
                errors[0] += 1
            if "connection: close" in head:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, errors[0], (statistics.mean(sizes) if sizes else 0)


def measure(label, port, path, headers, clients, seconds):
    asyncio.run(drive(port, path, headers, clients, 1.0))  # warm up: caches, connections, imports
    latencies, errors, size = asyncio.run(drive(port, path, headers, clients, seconds))
    latencies.sort()
    rate = len(latencies) / seconds
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else float("nan")
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")
    print(f"{label:42} {rate:8.1f} req/s   p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   "
          f"{size / 1024:7.1f} KB/response   {errors} errors", flush=True)
    return rate, p99, errors


def start(cmd, port, env=None, headers=None):
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up():
        try:
            return requests.get(f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=5).status_code == 200
        except requests.RequestException:
            return proc.poll() is not None and sys.exit(f"server exited: {' '.join(cmd)}")

    wait_for(up, 30, what=f"server on port {port}")
    return proc


def check(port, nodes, headers=None):
    """Both servers must return the same thing: every node."""
    got = requests.get(f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=10).json()
    assert len(got) == nodes, f"expected {nodes} nodes, got {len(got)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per case")
    parser.add_argument("--insight", action="store_true",
                        help="snapshots carry crawl insight; also measure /metrics?fields=all")
    parser.add_argument("--tokens-file", type=int, metavar="N", default=0,
                        help="measure /metrics with a token: a tokens file of N lines against one token")
    args = parser.parse_args()
    if args.tokens_file:
        return compare_tokens(args)
    if args.insight:
        import bench.insight_hooks

        INSIGHT.update(bench.insight_hooks.full_insight())

    server = RedisServer().start()
    procs, stop, pause = [], threading.Event(), threading.Event()
    try:
        fill(server.client(), args.nodes)
        raw = server.client().hgetall("scrapy:node:status")
        print(f"{args.nodes} nodes in Redis, {sum(map(len, raw.values())) / 1024:.0f} KB of snapshots; "
              f"{args.clients} concurrent clients, {args.seconds:g} s per case, {os.cpu_count()} CPUs")

        naive_port, api_port = free_port(), free_port()
        env = clean_env()
        procs.append(start([sys.executable, "-c", NAIVE_APP, server.url, str(naive_port)], naive_port, env))
        procs.append(start([sys.executable, "monitor_api.py", "--port", str(api_port)], api_port,
                           dict(env, REDIS_URL=server.url)))
        writer = threading.Thread(target=keep_reporting, args=(server.client(), args.nodes, 10, stop, pause),
                                  daemon=True)
        writer.start()
        check(naive_port, args.nodes)
        check(api_port, args.nodes)
        gz = requests.get(f"http://127.0.0.1:{api_port}/metrics", headers={"Accept-Encoding": "gzip"}, stream=True,
                          timeout=10)
        assert len(json.loads(gzip.decompress(gz.raw.read()))) == args.nodes

        gzip_header = "Accept-Encoding: gzip\r\n"  # what browsers, requests and curl --compressed send
        naive, _, _ = measure("seed app (Flask dev server)", naive_port, "/metrics", gzip_header,
                              args.clients, args.seconds)
        ours, ours_p99, errors = measure("monitor_api.py, gzip", api_port, "/metrics", gzip_header,
                                         args.clients, args.seconds)
        if args.insight:
            measure("monitor_api.py, gzip, ?fields=all", api_port, "/metrics?fields=all", gzip_header,
                    args.clients, args.seconds)
        plain, plain_p99, _ = measure("monitor_api.py, no compression", api_port, "/metrics",
                                                 "Accept-Encoding: identity\r\n", args.clients, args.seconds)
        pause.set()  # an idle cluster: nothing changes, so pollers that send their ETag get 304s
        time.sleep(2)
        etag = requests.get(f"http://127.0.0.1:{api_port}/metrics", headers={"Accept-Encoding": "gzip"},
                            timeout=10).headers["ETag"]
        measure("monitor_api.py, idle cluster, If-None-Match", api_port, "/metrics",
                f"Accept-Encoding: gzip\r\nIf-None-Match: {etag}\r\n", args.clients, args.seconds)

        ok = ours >= 10 * naive and ours_p99 <= 25 and errors == 0
        print(f"ratio: {ours / naive:.1f}x with gzip, {plain / naive:.1f}x without (goal >= 10x); "
              f"p99 {ours_p99:.1f} ms with gzip, {plain_p99:.1f} ms without (goal <= 25 ms): "
              f"{'met' if ok else 'NOT met'}")
    finally:
        stop_all(stop, procs, server)


def stop_all(stop, procs, server):
    """End the reporting thread, the API processes and the Redis a measurement started."""
    stop.set()
    for proc in procs:
        proc.terminate()
        proc.wait(10)
    server.cleanup()


def compare_tokens(args):
    """/metrics with a token: MONITOR_API_TOKEN (one token) against a tokens file of ``args.tokens_file`` lines,
    the same cluster and clients, measured alternately three times; prints the median p99 and req/s of each and
    their difference."""
    server = RedisServer().start()
    procs, stop, pause = [], threading.Event(), threading.Event()
    folder = tempfile.mkdtemp(prefix="scm-bench-tokens-")
    try:
        fill(server.client(), args.nodes)
        secret = "bench-token-" + os.urandom(8).hex()
        path = os.path.join(folder, "tokens")
        with open(path, "w") as f:
            for i in range(args.tokens_file - 1):
                f.write(f"user{i} viewer sha256:{hashlib.sha256(os.urandom(16)).hexdigest()}\n")
            f.write(f"bench viewer sha256:{hashlib.sha256(secret.encode()).hexdigest()}\n")
        auth = {"Authorization": f"Bearer {secret}"}
        env = dict(clean_env(), REDIS_URL=server.url)
        one_port, file_port = free_port(), free_port()
        procs.append(start([sys.executable, "monitor_api.py", "--port", str(one_port)], one_port,
                           dict(env, MONITOR_API_TOKEN=secret), auth))
        procs.append(start([sys.executable, "monitor_api.py", "--port", str(file_port)], file_port,
                           dict(env, MONITOR_API_TOKENS_FILE=path), auth))
        for port in (one_port, file_port):
            check(port, args.nodes, auth)
        # The gate's own cost per request, in this process: finding the token (and the file's change check).
        import timeit

        import monitor_gate
        for label, tokens in (("one token", monitor_gate.Tokens(secret)),
                              ("tokens file", monitor_gate.Tokens(None, path))):
            n = 200_000
            took = timeit.timeit(lambda t=tokens: (t.refresh(), t.find(secret)), number=n)
            print(f"token lookup, {label} ({tokens.count()} token(s)): {took / n * 1e6:.2f} us per request")
        print(f"{args.nodes} nodes; {args.clients} concurrent clients, {args.seconds:g} s per case, "
              f"{os.cpu_count()} CPUs; GET /metrics with 'Authorization: Bearer', gzip")
        threading.Thread(target=keep_reporting, args=(server.client(), args.nodes, 10, stop, pause),
                         daemon=True).start()
        headers = f"Accept-Encoding: gzip\r\nAuthorization: Bearer {secret}\r\n"
        cases = {"one token (MONITOR_API_TOKEN)": one_port,
                 f"{args.tokens_file}-line MONITOR_API_TOKENS_FILE": file_port}
        results = {label: [] for label in cases}
        for _ in range(3):
            for label, port in cases.items():
                results[label].append(measure(label, port, "/metrics", headers, args.clients, args.seconds))
        best = {label: (statistics.median(r for r, _, _ in runs), statistics.median(p for _, p, _ in runs),
                        sum(e for *_, e in runs)) for label, runs in results.items()}
        (one_label, (one_rate, one_p99, one_err)), (file_label, (file_rate, file_p99, file_err)) = best.items()
        print(f"median of 3: {one_label}: {one_rate:.1f} req/s, p99 {one_p99:.1f} ms; "
              f"{file_label}: {file_rate:.1f} req/s, p99 {file_p99:.1f} ms; "
              f"req/s {100 * (file_rate / one_rate - 1):+.1f}%, p99 {file_p99 - one_p99:+.1f} ms; "
              f"{one_err + file_err} errors")
    finally:
        stop_all(stop, procs, server)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
