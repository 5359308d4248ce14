"""Benchmark dashboard.html with 1,000 nodes: render time, and memory over 200 refreshes.

    python bench/dashboard.py [--nodes 1000] [--refreshes 200] [--interval 250] [--churn 10] [--page FILE]
    python bench/dashboard.py --nodes 10000 --refreshes 50 --churn 0 --interval 1000 --share 0.1   # issue 22
    git show main:dashboard.html > /tmp/before.html    # then the same with --page /tmp/before.html

Starts its own redis-server and ``monitor_api.py``, fills Redis the way nodes do, and opens the page in
headless Chromium (Debian's package) polling every ``--interval`` ms, with the detail view of one node open.
While it runs, a writer reports every node again each round with new figures, and replaces ``--churn`` nodes
with new ones, so every refresh updates the cards and creates and removes some. The JS heap (after a forced
garbage collection) and the DOM node count are read through the DevTools protocol after a warm-up and every
50 refreshes. Prints the first render time (goal: 1 s or less; 500 ms at 10,000 nodes), the DOM node count
(goal at 10,000 nodes: 60,000 or less), each update's script time (goal: 50 ms or less), the heap growth (goal: flat)
and, at the end, the frame times while the grid scrolls from top to bottom (goal: 60 fps). ``--page`` opens another
dashboard.html as a file (``?api=``), to compare versions on the same machine in the same way.
"""

import argparse
import os
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import monitor_contract
from testbed import CHROMIUM, CHROMIUM_ARGS, publish, snapshot  # noqa: E402
from testbed_servers import ApiServer, RedisServer  # noqa: E402

WARM_UP = 20  # refreshes before the first reading: caches, JIT and the sparklines on screen settle


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--refreshes", type=int, default=200)
    parser.add_argument("--interval", type=int, default=250, help="the page's poll period in ms")
    parser.add_argument("--churn", type=int, default=10, help="nodes replaced by new ones each round")
    parser.add_argument("--share", type=float, default=1.0,
                        help="the share of nodes that report each round (0.1: a tenth, as 10 s reports seen every 1 s)")
    parser.add_argument("--page", help="a dashboard.html to open as a file instead of the API's own")
    parser.add_argument("--stream", action="store_true",
                        help="let the page take pushed changes too (GET /events); by default it polls only (?live=0), "
                             "as a page before push did: the writer rewrites every node each round")
    args = parser.parse_args()
    if not CHROMIUM:
        sys.exit("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    redis_server = RedisServer().start()
    client = redis_server.client()
    # No response cache: every refresh brings new figures.
    api = ApiServer(redis_server.url, MONITOR_API_CACHE="0").start()
    serial = [args.nodes]

    def node(i):
        return f"spider_{i % 4}:crawler-{i:05d}:{10000 + i}"

    alive = list(range(args.nodes))
    publish(client, *[snapshot(node(i), spider=f"spider_{i % 4}", cpu=float(i % 100)) for i in alive], history=20)
    stop = threading.Event()

    def writer():
        turn = 0
        while not stop.is_set():
            turn += 1
            gone, alive[:args.churn] = alive[:args.churn], []
            if gone:  # --churn 0: none
                client.hdel(monitor_contract.status_key("scrapy"), *[node(i) for i in gone])
            alive.extend(range(serial[0], serial[0] + args.churn))
            serial[0] += args.churn
            share = max(1, round(len(alive) * args.share))  # the nodes reporting this round, in turn
            start = (turn * share) % len(alive)
            chosen = (alive + alive)[start:start + share]
            publish(client, *[snapshot(node(i), spider=f"spider_{i % 4}", cpu=float((i + turn) % 100),
                                       pages=1000 * turn + i, rss=(100 + (i + turn) % 50) * 2 ** 20) for i in chosen])
            stop.wait(args.interval / 1000)

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            cdp = page.context.new_cdp_session(page)
            cdp.send("Performance.enable")
            query = f"interval={args.interval}" + ("" if args.stream else "&live=0")
            if args.page:
                page.goto(f"file://{os.path.abspath(args.page)}?api={api.url}&{query}")
            else:
                page.goto(f"{api.url}/?{query}")
            page.wait_for_function("() => window.dashboardStats.firstPaintMs !== null", timeout=60000)
            first, script = page.evaluate(
                "() => [window.dashboardStats.firstPaintMs, window.dashboardStats.firstRenderMs]")
            dom = int({m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}["Nodes"])
            print(f"{args.nodes} nodes ({args.page or 'this dashboard.html'}): first render {first:.0f} ms from data "
                  f"arrival to painted cards ({script:.0f} ms of it script; goal <= 1000 ms, 500 at 10,000 nodes); "
                  f"{dom} DOM nodes")
            if not args.refreshes:  # --refreshes 0: the first render and scrolling only
                print(scrolling(page))
                browser.close()
                return
            threading.Thread(target=writer, daemon=True).start()
            page.locator("[data-node]").nth(5).click()  # keep a detail view open throughout

            def reading():
                cdp.send("HeapProfiler.collectGarbage")
                heap = cdp.send("Runtime.getHeapUsage")["usedSize"]
                metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
                s = page.evaluate("() => window.dashboardStats")
                return s["okPolls"], heap, int(metrics["Nodes"]), int(metrics["JSEventListeners"]), s

            def wait_polls(n):
                page.wait_for_function("(n) => window.dashboardStats.okPolls >= n", arg=n, timeout=600000)

            start_polls = page.evaluate("() => window.dashboardStats.okPolls")
            wait_polls(start_polls + WARM_UP)
            base = reading()
            print(f"{'refreshes':>9} {'JS heap':>10} {'DOM nodes':>9} {'listeners':>9} {'cards':>5} {'render ms':>9}")
            rows = [base]

            def show(r, n):
                print(f"{n:9d} {r[1] / 2 ** 20:8.2f}MB {r[2]:9d} {r[3]:9d} {r[4]['nodes']:5d} {r[4]['renderMs']:9.1f}")

            show(base, 0)
            for done in range(50, args.refreshes + 1, 50):
                wait_polls(base[0] + done)
                rows.append(reading())
                show(rows[-1], rows[-1][0] - base[0])
            stop.set()
            end = rows[-1]
            growth = (end[1] - base[1]) / 2 ** 20
            print(f"JS heap after {end[0] - base[0]} refreshes: "
                  f"{base[1] / 2 ** 20:.2f} MB -> {end[1] / 2 ** 20:.2f} MB "
                  f"({growth:+.2f} MB, {100 * growth * 2 ** 20 / base[1]:+.1f}%); DOM nodes {base[2]} -> {end[2]}; "
                  f"{end[4]['failedPolls']} failed polls; {end[4]['historyRequests']} history requests in all")
            print(scrolling(page))
            browser.close()
    finally:
        stop.set()
        api.stop()
        redis_server.cleanup()


# Scrolls the page down SCROLL_STEP pixels a frame (a fast fling: 3,600 px/s at 60 fps) for at most 600 frames,
# and times the frames (requestAnimationFrame).
SCROLL_JS = """async () => {
    window.scrollTo(0, 0);
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    const frames = [];
    let last = performance.now();
    const end = document.documentElement.scrollHeight - innerHeight;
    await new Promise((done) => {
        function step(t) {
            frames.push(t - last);
            last = t;
            if (window.scrollY >= end || frames.length >= 600) return done();
            window.scrollBy(0, 60);
            requestAnimationFrame(step);
        }
        requestAnimationFrame(step);
    });
    frames.shift();
    frames.sort((a, b) => a - b);
    const mean = frames.reduce((a, b) => a + b, 0) / frames.length;
    return [frames.length, 1000 / mean, frames[Math.floor(frames.length * 0.95)], frames.filter((f) => f > 25).length];
}"""


# The same frames without scrolling: what this machine's Chromium manages at all, right now.
IDLE_JS = """async () => {
    const frames = [];
    let last = performance.now();
    await new Promise((done) => {
        function step(t) {
            frames.push(t - last);
            last = t;
            if (frames.length > 120) done(); else requestAnimationFrame(step);
        }
        requestAnimationFrame(step);
    });
    frames.shift();
    return 1000 * frames.length / frames.reduce((a, b) => a + b, 0);
}"""


def scrolling(page):
    idle = page.evaluate(IDLE_JS)
    count, fps, p95, long = page.evaluate(SCROLL_JS)
    return (f"scrolling the grid 60 px a frame: {count} frames, {fps:.0f} fps on average, p95 frame {p95:.1f} ms, "
            f"{long} frame(s) over 25 ms (goal: 60 fps; the same page not scrolling: {idle:.0f} fps)")


if __name__ == "__main__":
    main()
