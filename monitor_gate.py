"""Who may read the API and who may change data: tokens and roles, the Host check, CORS, frames and the acting guard.

One ``Gate`` decides for the cached fast path (``monitor_cache.CachedFastPath``) and for Flask alike: it finds who
a request is (a named token's name and role, or ``anonymous`` with how it was let in), refuses what that role
may not do, and adds the headers every response carries. Every route that changes data (control, silences) is
decorated with ``acting``; the reads that show who did what (the control log, silences, the audit log) with
``needs(OPERATOR)``.
"""

import functools
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections import deque
from typing import NamedTuple
from urllib.parse import parse_qsl

from flask import Response, current_app, g, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_host

from monitor_contract import dumps
from monitor_settings import ConfigError

logger = logging.getLogger("monitor_api")

# Roles, from least to most: a tokenless request the API does not trust gets NONE when tokens are set.
NONE, VIEWER, OPERATOR, ADMIN = "none", "viewer", "operator", "admin"
RANK = {NONE: 0, VIEWER: 1, OPERATOR: 2, ADMIN: 3}
# A request body over this is refused (413) before anything reads it; a seed (up to 10,000 URLs) may be larger.
MAX_BODY = 64 * 1024
SEED_BODY = 8 * 1024 * 1024
# Sent with every response: no page may frame the dashboard (or any answer), so no click is borrowed.
FRAME_HEADERS = [("X-Frame-Options", "DENY"), ("Content-Security-Policy", "frame-ancestors 'none'")]
# An address that offers this many refused tokens within THROTTLE_WINDOW seconds gets 429 for THROTTLE_WINDOW.
THROTTLE_REFUSALS = 20
THROTTLE_WINDOW = 60.0
# Addresses remembered by the throttle at most (a flood of addresses cannot grow it past this).
THROTTLE_ADDRESSES = 10000
# The tokens file is checked for a change at most this often (rotation takes effect within 5 s).
TOKENS_CHECK = 1.0
# An /events ticket lasts this long (seconds); at most TICKETS_MAX are remembered at once.
TICKET_SECONDS = 60.0
TICKETS_MAX = 10000
# A token's name: what the audit and control logs show.
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}\Z")
SHA256 = re.compile(r"sha256:([0-9a-fA-F]{64})\Z")
# A line of a tokens file.
TOKEN_LINE_HELP = "each line is 'name role secret', role viewer, operator or admin, secret 'sha256:<hex>' or the token"
HOW_TO_ACT = "set MONITOR_API_TOKEN (or MONITOR_API_TOKENS_FILE) and send it as 'Authorization: Bearer <token>'"


class Refusal(NamedTuple):
    """Why a request is refused: its status, the JSON error message and any extra headers."""

    status: int
    message: str
    headers: tuple = ()

    def response(self):
        return Response(dumps({"error": self.message}), self.status, list(self.headers),
                        mimetype="application/json")


class Identity(NamedTuple):
    """Who a request is: a token's name and role, or ``anonymous`` with the role a tokenless request gets;
    ``via`` says how it was let in (``token``, or ``no token: ...``); ``why`` why an anonymous request may
    not act (empty when it may)."""

    name: str
    role: str
    via: str
    why: str = ""


UNAUTHORIZED = Refusal(401, "a valid token is required: 'Authorization: Bearer <token>' (or ?token= on a GET)",
                       (("WWW-Authenticate", "Bearer"),))
IDENTITY = "monitor.identity"  # the environ key a request's Identity is kept under
DECIDED = "monitor.refusal"  # and the gate's decision (a Refusal or None)


def digest(secret):
    """The sha256 hex digest of a token: what a tokens file may hold instead of the token, and the lookup key."""
    return hashlib.sha256(secret.encode()).hexdigest()


def read_tokens_file(path):
    """``({sha256 hex: (name, role)}, [problem per malformed line])`` from a tokens file (OSError if unreadable).
    Blank lines and lines starting with ``#`` are skipped; a malformed line is named, never quoted (it may hold
    a secret)."""
    tokens, problems, names = {}, [], set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            problem = None
            if len(parts) != 3:
                problem = f"has {len(parts)} fields, not 3"
            elif not TOKEN_NAME.match(parts[0]):
                problem = "the name must be 1-64 letters, digits or _.@+- characters"
            elif parts[1] not in (VIEWER, OPERATOR, ADMIN):
                problem = "the role must be viewer, operator or admin"
            elif parts[0] in names:
                problem = f"the name {parts[0]!r} is used by an earlier line"
            else:
                hashed = SHA256.match(parts[2])
                key = hashed.group(1).lower() if hashed else digest(parts[2])
                if parts[2].startswith("sha256:") and not hashed:
                    problem = "a sha256: secret must be 64 hex digits"
                elif not parts[2].isascii() or not parts[2].isprintable():
                    problem = "the secret must be printable ASCII"
                elif key in tokens:
                    problem = "its secret is an earlier line's"
            if problem:
                problems.append(f"line {number}: {problem} ({TOKEN_LINE_HELP}); skipped")
                continue
            names.add(parts[0])
            tokens[key] = (parts[0], parts[1])
    return tokens, problems


class Tokens:
    """The tokens a request may offer, looked up by their sha256 (one dict lookup, whatever their number):
    MONITOR_API_TOKEN as one admin named ``token``, and MONITOR_API_TOKENS_FILE's lines, re-read when the file
    changes. ``reloaded`` (if set) is called with ``(names, problems)`` after each re-read."""

    def __init__(self, token=None, path=None):
        self.path = path
        self.fixed = {digest(token): ("token", ADMIN)} if token else {}
        self.from_file = {}
        self.stamp = None
        self.checked = 0.0
        self.lock = threading.Lock()
        self.reloaded = None
        if path:
            self.stamp = self._stamp()
            self.from_file = self._load(first=True)

    def __bool__(self):
        return bool(self.fixed or self.from_file or self.path)

    def _stamp(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self, first=False):
        """The file's tokens; a ConfigError at start when it is unreadable or has no valid line, else the
        previous tokens kept (and the problem logged)."""
        try:
            tokens, problems = read_tokens_file(self.path)
        except OSError as exc:
            if first:
                raise ConfigError(f"MONITOR_API_TOKENS_FILE: cannot read it: {exc.strerror or exc}") from None
            logger.error("MONITOR_API_TOKENS_FILE cannot be read (%s): the previous tokens stay", exc.strerror or exc)
            return self.from_file
        for problem in problems:
            logger.warning("MONITOR_API_TOKENS_FILE %s", problem)
        if not tokens:
            if first:
                raise ConfigError(f"MONITOR_API_TOKENS_FILE has no valid line ({TOKEN_LINE_HELP})")
            logger.error("MONITOR_API_TOKENS_FILE has no valid line now: the previous tokens stay")
            return self.from_file
        if not first:
            logger.info("MONITOR_API_TOKENS_FILE re-read: %d token(s)", len(tokens))
            if self.reloaded is not None:
                self.reloaded(sorted(name for name, _ in tokens.values()), problems)
        return tokens

    def refresh(self):
        """Re-read the file if it changed since the last look (looked at most every TOKENS_CHECK seconds)."""
        if not self.path or time.monotonic() - self.checked < TOKENS_CHECK:
            return
        with self.lock:
            if time.monotonic() - self.checked < TOKENS_CHECK:
                return
            self.checked = time.monotonic()
            stamp = self._stamp()
            if stamp != self.stamp:
                self.stamp = stamp
                self.from_file = self._load()

    def find(self, offered):
        """``(name, role)`` of an offered token, or None."""
        key = digest(offered)
        return self.fixed.get(key) or self.from_file.get(key)

    def count(self):
        return len(self.fixed) + len(self.from_file)


class Tickets:
    """Short-lived tickets for GET /events (EventSource cannot send a header): ``POST /events/ticket`` with the
    token gets one, good for TICKET_SECONDS (for reconnects too), standing for the token's identity. A URL with a
    ticket in an access log leaks nothing lasting, unlike one with the token."""

    def __init__(self):
        self.issued = {}  # ticket -> (Identity, expiry on time.monotonic())
        self.lock = threading.Lock()

    def issue(self, who):
        ticket, now = secrets.token_urlsafe(24), time.monotonic()
        with self.lock:
            if len(self.issued) >= TICKETS_MAX:
                self.issued = {t: v for t, v in self.issued.items() if v[1] > now}
                if len(self.issued) >= TICKETS_MAX:
                    self.issued.clear()
            self.issued[ticket] = (who, now + TICKET_SECONDS)
        return ticket

    def find(self, ticket):
        """The Identity a ticket stands for, or None when unknown or expired."""
        found = self.issued.get(ticket)
        return found[0] if found is not None and found[1] > time.monotonic() else None


class Throttle:
    """Addresses that offered THROTTLE_REFUSALS refused tokens within THROTTLE_WINDOW seconds: refused with 429
    for THROTTLE_WINDOW seconds, logged once."""

    def __init__(self):
        self.refused = {}  # address -> deque of monotonic times
        self.blocked = {}  # address -> until (monotonic)
        self.lock = threading.Lock()

    def retry_after(self, address):
        """Seconds left for a blocked address, else 0."""
        until = self.blocked.get(address)
        if until is None:
            return 0
        left = until - time.monotonic()
        if left <= 0:
            with self.lock:
                self.blocked.pop(address, None)
            return 0
        return left

    def refuse(self, address):
        now = time.monotonic()
        with self.lock:
            if len(self.refused) >= THROTTLE_ADDRESSES and address not in self.refused:
                self.refused = {a: t for a, t in self.refused.items() if t and now - t[-1] < THROTTLE_WINDOW}
                if len(self.refused) >= THROTTLE_ADDRESSES:
                    self.refused.clear()
            times = self.refused.setdefault(address, deque(maxlen=THROTTLE_REFUSALS))
            times.append(now)
            if len(times) == THROTTLE_REFUSALS and now - times[0] <= THROTTLE_WINDOW:
                self.blocked[address] = now + THROTTLE_WINDOW
                times.clear()
                logger.warning("Refusing every request from %s for %d s: %d refused tokens within %d s",
                               shown(address), THROTTLE_WINDOW, THROTTLE_REFUSALS, THROTTLE_WINDOW)


class Gate:
    """Who may read and who may change data. Every response, the cached fast path's included, goes through
    ``authorize`` and ``headers``; every route that changes data also through ``acting``."""

    def __init__(self, config):
        """``config``: the API's parsed settings (``monitor_api.create_app``)."""
        self.tokens = Tokens(config["MONITOR_API_TOKEN"], config.get("MONITOR_API_TOKENS_FILE"))
        self.origins = set(config["MONITOR_CORS_ORIGINS"] or ())
        self.listening = config["MONITOR_API_HOST"]
        # Host names accepted without a token; loopback addresses are accepted too (see host_ok).
        self.hosts = {host_name(self.listening), "localhost"}
        self.hosts |= {host_name(h) for h in config["MONITOR_API_HOSTS"] or ()}
        self.loopback = is_loopback(host_name(self.listening))
        self.trust_loopback = config.get("MONITOR_API_TRUST_LOOPBACK", True)
        self.readonly = config["MONITOR_API_READONLY"]
        self.throttle = Throttle()
        self.tickets = Tickets()

    @property
    def token(self):
        """Whether requests need a token (kept for callers that ask ``gate.token``)."""
        return bool(self.tokens)

    def authorize(self, environ):
        """None if the request may go on (its Identity then in ``environ[IDENTITY]``), else a Refusal.

        With tokens, every request but /health, /whoami and CORS preflights must offer exactly one known token
        (401); a query token only on GET. Without, the Host must be this API's (400), which closes DNS rebinding:
        a foreign page that makes its own name resolve to this address sends its own name. An address that
        offered THROTTLE_REFUSALS refused tokens in a minute gets 429 for a minute. Decided once per request
        (the fast path and Flask ask both)."""
        if DECIDED in environ:
            return environ[DECIDED]
        environ[DECIDED] = refusal = self._authorize(environ)
        return refusal

    def _authorize(self, environ):
        path = environ.get("PATH_INFO")
        if path == "/health":
            return None  # for load balancers and probes: it tells whether Redis answers, and the node count
        address = environ.get("REMOTE_ADDR", "")
        left = self.throttle.retry_after(address)
        if left:
            return Refusal(429, "too many refused tokens from this address: wait a minute",
                           (("Retry-After", str(int(left) + 1)),))
        length, limit = environ.get("CONTENT_LENGTH") or "0", body_limit(path)
        if not length.isdigit() or int(length) > limit:
            return Refusal(413, f"a request body may be at most {limit // 1024} KB")
        offered, problem = offered_tokens(environ)
        if problem:
            return Refusal(400, problem)
        if self.tokens:
            self.tokens.refresh()
            if offered is None and path == "/events" and "ticket=" in environ.get("QUERY_STRING", ""):
                ticket = dict(parse_qsl(environ["QUERY_STRING"])).get("ticket", "")
                who = self.tickets.find(ticket)
                if who is None:
                    return Refusal(401, "that ticket is unknown or expired: POST /events/ticket for a new one",
                                   (("WWW-Authenticate", "Bearer"),))
                environ[IDENTITY] = who
                return None
            if offered is not None:
                found = self.tokens.find(offered)
                if found is None:
                    self.throttle.refuse(address)
                    return UNAUTHORIZED
                environ[IDENTITY] = Identity(found[0], found[1], "token")
                return None
            if environ["REQUEST_METHOD"] == "OPTIONS" or path == "/whoami":
                environ[IDENTITY] = Identity("anonymous", NONE, "no token", "a token is required")
                return None
            return UNAUTHORIZED
        host = environ.get("HTTP_HOST")
        if host is not None and not self.host_ok(host):
            return Refusal(400, f"Host {host[:100]!r} is not accepted without a token: add it to "
                                "MONITOR_API_HOSTS, or set MONITOR_API_TOKEN")
        environ[IDENTITY] = self.anonymous(environ)
        return None

    def anonymous(self, environ):
        """The Identity of a tokenless request when no token is set: an operator from curl or the API's own
        page on a loopback API (unless MONITOR_API_TRUST_LOOPBACK=0), else a viewer, with the reason."""
        origin = environ.get("HTTP_ORIGIN")
        if not self.trust_loopback:
            return Identity("anonymous", VIEWER, "no token", "MONITOR_API_TRUST_LOOPBACK=0: without a token nothing "
                                                             f"changes data or reads who did: {HOW_TO_ACT}")
        if not self.loopback:
            return Identity("anonymous", VIEWER, "no token",
                            f"without a token, changes are accepted only when the API listens on a loopback "
                            f"address, not {self.listening}: {HOW_TO_ACT}")
        if origin is None:
            return Identity("anonymous", OPERATOR, "no token: loopback, no browser origin")
        if origin == own_origin(environ):
            return Identity("anonymous", OPERATOR, "no token: loopback, the API's own page")
        return Identity("anonymous", VIEWER, "no token",
                        f"changes are not accepted from origin {origin[:100]!r} without a token: {HOW_TO_ACT}")

    def host_ok(self, host):
        name = host_name(host)
        return name in self.hosts or is_loopback(name)

    def headers(self, environ):
        """The headers every response gets: no framing, and CORS for an allowed Origin."""
        return FRAME_HEADERS + self.cors_headers(environ)

    def cors_headers(self, environ):
        """CORS headers for an allowed Origin (one of the origins, any with ``*``, or the API's own), else none.
        A preflight is told of POST, DELETE and Content-Type only where a change could be accepted."""
        origin = environ.get("HTTP_ORIGIN")
        if not origin:
            return []
        own = origin == own_origin(environ)
        if not (own or origin in self.origins or "*" in self.origins):
            return []
        headers = [("Access-Control-Allow-Origin", origin),
                   ("Access-Control-Expose-Headers", "ETag, X-Skipped-Entries, X-Server-Time, X-Ages-At")]
        if environ["REQUEST_METHOD"] == "OPTIONS":  # a preflight
            methods, allowed = "GET, HEAD, OPTIONS", "Authorization, If-None-Match"
            if not self.readonly and (self.tokens or (own and self.loopback and self.trust_loopback)):
                methods, allowed = methods + ", POST, DELETE", allowed + ", Content-Type, Idempotency-Key"
            headers += [("Access-Control-Allow-Methods", methods), ("Access-Control-Allow-Headers", allowed),
                        ("Access-Control-Max-Age", "600")]
        return headers

    def may(self, req, role):
        """None if the request's identity has ``role`` (and is not a tokenless cross-site browser request), else a
        Refusal."""
        who = identity(req)
        if req.headers.get("Sec-Fetch-Site") == "cross-site" and who.via != "token":
            # Another site's page (or a file) without a token: it cannot have learnt a token, so it never acts on
            # the strength of being on this machine. With a token (the dashboard opened as a file with ?token=,
            # which sends it as a header) the token is the proof.
            return Refusal(403, "a request from another site's page never changes data nor reads who did "
                                "without a token: open the dashboard from the API itself, or give it ?token=")
        if RANK[who.role] >= RANK[role]:
            return None
        if who.name == "anonymous":
            if self.tokens:
                return UNAUTHORIZED
            return Refusal(403, who.why)
        return Refusal(403, f"token {who.name!r} is a {who.role}: this needs {role}")

    def acting(self, req):
        """``(Refusal or None, how it was accepted)`` for a request to a route that changes data."""
        if self.readonly:
            return Refusal(403, "this API is read-only (MONITOR_API_READONLY=1): control and silences are off"), ""
        if req.method in ("GET", "HEAD"):
            allow = sorted((req.url_rule.methods if req.url_rule else set()) - {"GET", "HEAD", "OPTIONS"})
            return Refusal(405, f"{req.method} does not change data: use {' or '.join(allow) or 'POST'}",
                           (("Allow", ", ".join(allow)),)), ""
        refusal = self.may(req, OPERATOR)
        if refusal is not None:
            return refusal, ""
        has_body = req.method in ("POST", "PUT", "PATCH") or req.content_length or req.headers.get("Transfer-Encoding")
        if has_body and req.mimetype != "application/json":
            return Refusal(415, "send the body as JSON, with 'Content-Type: application/json'"), ""
        return None, identity(req).via


def body_limit(path):
    """The largest body a request to ``path`` may send: SEED_BODY for a seed, else MAX_BODY."""
    return SEED_BODY if path and path.startswith("/queues/") and path.endswith("/seed") else MAX_BODY


def identity(req):
    """The request's Identity (set by Gate.authorize)."""
    return req.environ.get(IDENTITY) or Identity("anonymous", NONE, "no token", "a token is required")


def acting(view):
    """Guards a route that changes data (control, silences): put it under the route decorator.

        @bp.post("/control")
        @acting
        def control(): ...   # g.actor = {"who": name, "role", "address": client address, "via": how}

    Refused with JSON: 403 in read-only mode, for a role below operator, for a request from another site's page,
    or without a token from anywhere but curl or the API's own page on a loopback API; 401 without a token when
    tokens are set; 405 for GET; 415 for a body that is not JSON. Every request is logged once, after the route
    answered, with its outcome (method, path, client address, status, the route's ``g.outcome``; never a token;
    every value from the request escaped).
    """
    @functools.wraps(view)
    def guarded(*args, **kwargs):
        refusal, how = gate().acting(request)
        key = request.headers.get("Idempotency-Key")
        if refusal is None and key is not None and not (0 < len(key) <= 200 and key.isascii() and key.isprintable()):
            refusal = Refusal(400, "Idempotency-Key must be 1 to 200 printable ASCII characters")
        who = identity(request)
        g.actor = {"who": who.name, "role": who.role, "address": request.remote_addr, "via": how or who.via}
        g.idempotency = key or ""
        g.request_id = key or uuid.uuid4().hex[:16]
        if refusal is not None:
            refused(refusal, who)
            return refusal.response()
        try:
            response = current_app.make_response(view(*args, **kwargs))
        except HTTPException as exc:
            if getattr(exc, "outcome", None) == "unknown":
                logger.warning("Unknown outcome of %s %s from %s (503): %s", request.method, shown(request.path),
                               shown(request.remote_addr), shown(exc.description, 300))
            else:
                refused(Refusal(exc.code or 500, str(exc.description)), who)
            raise
        except Exception as exc:  # Redis refused or failed: its error handler answers
            log_acting(Refusal(500, f"{type(exc).__name__}: {exc}"))
            raise
        if response.status_code >= 400:
            refused(Refusal(response.status_code, str((response.get_json(silent=True) or {}).get("error", ""))), who)
        else:
            detail = g.get("outcome")
            logger.info("Accepted %s %s from %s%s: %d%s (%s)", request.method, shown(request.path),
                        shown(request.remote_addr), f" by {who.name}" if who.name != "anonymous" else "",
                        response.status_code, f" {detail}" if detail else "", shown(how))
        return response

    guarded.changes_data = True
    return guarded


def needs(role):
    """Guards a read that shows who did what (the control log, silences, the audit log): the same rights as
    acting (see ``Gate.may``); a refusal is logged."""
    def decorate(view):
        @functools.wraps(view)
        def guarded(*args, **kwargs):
            refusal = gate().may(request, role)
            if refusal is not None:
                log_acting(refusal)
                return refusal.response()
            return view(*args, **kwargs)

        guarded.changes_data = True  # its refusals are logged as acting ones are
        return guarded
    return decorate


def refused(refusal, who):
    """Log a refused change; record it in the audit log too when the caller is known (a token, or an anonymous
    request with the rights to act): refusals of unknown callers would only flood it."""
    log_acting(refusal)
    record = current_app.extensions.get("audit_refusal")
    if record is not None and refusal.status not in (401, 429) and (who.name != "anonymous"
                                                                   or RANK[who.role] >= RANK[OPERATOR]):
        record(refusal)


def log_acting(refusal):
    logger.warning("Refused %s %s from %s (%d): %s", request.method, shown(request.path),
                   shown(request.remote_addr), refusal.status, shown(refusal.message, 300))


def shown(value, limit=200):
    """A value from a request, fit for one log line: at most ``limit`` characters, every control character,
    backslash and non-ASCII character escaped (no raw CR or LF can forge a line)."""
    return str(value)[:limit].encode("ascii", "backslashreplace").decode("ascii").translate(CONTROL_ESCAPES)


# Control characters (ASCII ones survive backslashreplace) as their \xNN escapes; a backslash doubled.
CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(32), 127]}


def offered_tokens(environ):
    """``(the one offered token or None, problem or None)``: a Bearer header, or ``?token=`` on GET/HEAD only;
    more than one token offered is a problem (400)."""
    header = environ.get("HTTP_AUTHORIZATION", "")
    offered = [header[7:].strip()] if header[:7].lower() == "bearer " else []
    query = environ.get("QUERY_STRING", "")
    if "token" in query:
        found = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "token"]
        if found and environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            return None, "send the token as 'Authorization: Bearer <token>': ?token= is for GET only"
        offered += found
    if len(offered) > 1:
        return None, "offer exactly one token: an Authorization header or one ?token=, not both"
    return (offered[0] if offered else None), None


def own_origin(environ):
    return f"{environ['wsgi.url_scheme']}://{get_host(environ)}"


def host_name(host):
    """The name in a Host header or a setting, lower case, without its port or brackets or final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_loopback(name):
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def gate():
    """The app's Gate."""
    return current_app.extensions["gate"]
