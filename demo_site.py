"""A local website of linked pages for demos, tests and benchmarks: ``python demo_site.py --pages 3000``.

Every page is reachable from ``/``. With ``mix`` on, some pages answer 404 or 500 and some are slow, as a
real site does; ``hits`` counts the requests each path received.
"""

import argparse
import collections
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Site:
    """A threaded HTTP server on 127.0.0.1 serving ``pages`` linked pages."""

    def __init__(self, pages=50, mix=False, delay=0.0, port=0):
        self.pages = pages
        self.mix = mix
        self.delay = delay
        self.hits = collections.Counter()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        self.thread = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def page_paths(self):
        return ["/"] + [f"/page/{i}" for i in range(1, self.pages)]

    def status_of(self, i):
        if not self.mix or i == 0:
            return 200
        if i % 41 == 0:
            return 500
        if i % 23 == 0:
            return 404
        return 200

    def body(self, i):
        links = sorted({n for n in (2 * i + 1, 2 * i + 2, i + 1) if n < self.pages} | {0})
        anchors = "".join(f'<a href="{"/" if n == 0 else f"/page/{n}"}">page {n}</a> ' for n in links)
        if self.mix and i % 29 == 0:
            anchors += f'<a href="/missing/{i}">a dead link</a>'
        return f"<html><head><title>Page {i}</title></head><body><h1>Page {i}</h1>{anchors}</body></html>"

    def _handler(self):
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with site.lock:
                    site.hits[path] += 1
                if path == "/robots.txt":
                    return self.reply(200, "User-agent: *\nAllow: /\n", "text/plain")
                i = 0 if path == "/" else _page_number(path)
                if i is None or i >= site.pages:
                    return self.reply(404, "<html><title>Not found</title></html>")
                if site.delay or (site.mix and i % 17 == 0):
                    time.sleep(site.delay or 1.5)
                status = site.status_of(i)
                self.reply(status, site.body(i) if status == 200 else f"<html><title>Error {status}</title></html>")

            def reply(self, status, text, kind="text/html; charset=utf-8"):
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler

    def start(self):
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def page_hits(self):
        """``{path: count}`` for the site's pages only (not robots.txt or dead links)."""
        with self.lock:
            return {p: n for p, n in self.hits.items() if p == "/" or p.startswith("/page/")}


def _page_number(path):
    if not path.startswith("/page/"):
        return None
    digits = path[len("/page/"):]
    return int(digits) if digits.isdigit() else None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=3000)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--mix", action="store_true", help="some 404, 500 and slow pages")
    args = parser.parse_args()
    site = Site(args.pages, mix=args.mix, port=args.port).start()
    print(f"Serving {args.pages} pages at {site.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        site.stop()
