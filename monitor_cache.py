"""Responses made once and sent many times: the response cache, prepared bodies and the WSGI fast path.

Prepared bodies carry their gzip copy and ETag (304 on If-None-Match); the fast path answers a cached GET
without going through Flask, through the same gate.
"""

import gzip
import hashlib
import io
import threading
import time

import redis
from werkzeug.http import parse_accept_header

from monitor_contract import dumps

# Distinct URLs cached at once; a client inventing query strings cannot grow the cache past this.
CACHE_ENTRIES = 256
# Seconds a request waits for another's computation of a value nobody has yet (see Cache).
COLD_WAIT = 10.0
# An entry expired this long ago is dropped when another is stored (a big body asked for once, such as
# /prometheus?detail=node, is not kept for ever).
KEEP_EXPIRED = 60.0
# Bodies smaller than this go out uncompressed.
GZIP_MIN = 1024
# The header of a body with ages: when they were computed (see Body).
AGES_AT = "X-Ages-At"


class Cache:
    """Values computed at most once per ``ttl`` seconds per key; while one request recomputes an expired
    value, the others get the old one instead of waiting (or all recomputing it at once); with no old one
    (a cold start), they wait up to COLD_WAIT seconds for it rather than each reading Redis too."""

    def __init__(self, ttl):
        self.ttl = ttl
        self.entries = {}  # key -> (expires, value)
        self.busy = {}  # key -> an Event set when its computation ends
        self.lock = threading.Lock()

    def get(self, key, compute):
        if self.ttl <= 0:
            return compute()
        entry = self.entries.get(key)
        if entry and time.monotonic() < entry[0]:
            return entry[1]
        with self.lock:
            done = self.busy.get(key)
            mine = done is None
            if mine:
                done = self.busy[key] = threading.Event()
        if not mine:
            if entry:
                return entry[1]
            if done.wait(COLD_WAIT) and key in self.entries:
                return self.entries[key][1]
        try:
            value = compute()
            if len(self.entries) >= CACHE_ENTRIES:
                self.entries.clear()
            old = time.monotonic() - KEEP_EXPIRED
            for gone in [k for k, (expires, _) in list(self.entries.items()) if expires < old]:
                self.entries.pop(gone, None)
            self.entries[key] = (time.monotonic() + self.ttl, value)  # before the waiters wake
            return value
        except redis.RedisError:
            self.entries.clear()  # Redis is down: nobody gets old figures as if they were current
            raise
        finally:
            if mine:
                with self.lock:
                    self.busy.pop(key, None)
                done.set()

    def fresh(self, key):
        """The value if it is cached and not expired, else None."""
        entry = self.entries.get(key)
        return entry[1] if entry and time.monotonic() < entry[0] else None


class Body:
    """A prepared response: bytes, a gzipped copy, ETags and headers, ready to send again and again.

    ``tag``: what the ETag is made of when it is not the bytes: a body with ages (seconds since each node
    reported, which change every second) is tagged by its data without them, so an idle cluster gets 304s.
    Such a body says when its ages were computed (``X-Ages-At``, Redis's clock) and every answer says the time
    now (``X-Server-Time``): a 304 carries only the latter, so a client holding the body adds the difference."""

    def __init__(self, data, mimetype="application/json", headers=None, tag=None, now=None):
        tag = hashlib.blake2b(data if tag is None else tag, digest_size=12).hexdigest()
        headers = dict(headers or {})
        if now is not None:
            headers.update({"X-Server-Time": f"{now:.3f}", AGES_AT: f"{now:.3f}"})
        # no-cache: browsers keep the body but revalidate it each time, and get a 304 if it still holds.
        common = [("Content-Type", mimetype), ("Cache-Control", "no-cache"), *headers.items()]
        if len(data) >= GZIP_MIN:
            vary = ("Vary", "Accept-Encoding, Origin")
            self.zipped = [None, tag + "-gz",  # its bytes made when a client first takes gzip, then kept
                           common + [("ETag", f'"{tag}-gz"'), ("Content-Encoding", "gzip"), vary]]
        else:
            vary, self.zipped = ("Vary", "Origin"), None
        self.plain = (data, tag, common + [("ETag", f'"{tag}"'), vary])

    def pick(self, environ):
        """``(status, headers, bytes)`` for this request: gzipped if it takes gzip, 304 if its ETag holds."""
        zipped = self.zipped is not None and takes_gzip(environ)
        data, tag, headers = self.zipped if zipped else self.plain
        match = environ.get("HTTP_IF_NONE_MATCH")
        if match and (f'"{tag}"' in match or match.strip() == "*"):
            return 304, [h for h in headers if h[0] != AGES_AT], b""
        if data is None:
            data = self.zipped[0] = gzip.compress(self.plain[0], 4, mtime=0)
        return 200, headers, data

    def sent(self, environ):
        """``(status, headers, WSGI app_iter)`` for this request: ``pick``'s, with the Content-Length of a 200, its
        bytes sent as ``wrapped`` sends them."""
        status, headers, data = self.pick(environ)
        if status == 200:
            headers = headers + [("Content-Length", str(len(data)))]
        return status, headers, wrapped(environ, data)


def takes_gzip(environ):
    """Whether the request's Accept-Encoding takes gzip (browsers' does)."""
    accept = environ.get("HTTP_ACCEPT_ENCODING", "")
    return "gzip" in accept and (";" not in accept or parse_accept_header(accept)["gzip"] > 0)


# A body of WRAP_FROM bytes or more goes out through the server's file wrapper: waitress sends it from the bytes as
# they are, never copied into its output buffer, nor spilled to a temporary file past its outbuf_overflow. The bytes
# live until sent, and waitress's I/O thread frees them (see monitor_api.steady_memory).
WRAP_FROM = 256 * 1024


def wrapped(environ, data):
    """``data`` as a WSGI app_iter: a large body in the server's ``wsgi.file_wrapper`` when it has one."""
    wrapper = environ.get("wsgi.file_wrapper")
    return wrapper(io.BytesIO(data)) if wrapper is not None and len(data) >= WRAP_FROM else [data]


def json_body(payload, skipped=None, tag=None, now=None):
    """A Body of ``payload`` (a JSON-able value, or JSON bytes already), with its skipped-entries count;
    ``tag`` and ``now`` for a body with ages (see Body)."""
    headers = {} if skipped is None else {"X-Skipped-Entries": str(skipped)}
    return Body(payload if isinstance(payload, bytes) else to_json(payload), headers=headers, tag=tag, now=now)


def to_json(payload):
    return dumps(payload).encode()


def cache_key(environ):
    """Responses are cached per path and query string, any ``token`` left out."""
    query = environ.get("QUERY_STRING", "")
    if "token" in query:
        query = "&".join(part for part in query.split("&") if not part.startswith("token="))
    return environ.get("PATH_INFO", ""), query


class CachedFastPath:
    """WSGI middleware: answers a GET whose response is cached and fresh without going through Flask's
    request handling (a third of the cost of a request), through the same gate; everything else goes on
    to the app (a refused request too: the app answers the refusal)."""

    def __init__(self, app, status_reader, gate):
        self.app = app
        self.reader = status_reader
        self.gate = gate

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] == "GET" and self.gate.authorize(environ) is None:
            body = self.reader.cache.fresh(cache_key(environ))
            if body is not None:
                status, headers, app_iter = body.sent(environ)
                start_response("200 OK" if status == 200 else "304 Not Modified",
                               headers + self.gate.headers(environ))
                return app_iter
        return self.app(environ, start_response)
