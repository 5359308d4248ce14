"""Who may read the API and who may change data: the token, the Host check, CORS and the acting guard.

One ``Gate`` decides for the cached fast path (``monitor_cache.CachedFastPath``) and for Flask alike; every route
that changes data (control, silences) is decorated with ``acting``.
"""

import functools
import hmac
import ipaddress
import logging
from typing import NamedTuple
from urllib.parse import parse_qs

from flask import Response, current_app, g, request
from werkzeug.wsgi import get_host

from monitor_contract import dumps

logger = logging.getLogger("monitor_api")

class Refusal(NamedTuple):
    """Why a request is refused: its status, the JSON error message and any extra headers."""

    status: int
    message: str
    headers: tuple = ()

    def response(self):
        return Response(dumps({"error": self.message}), self.status, list(self.headers),
                        mimetype="application/json")


UNAUTHORIZED = Refusal(401, "a valid token is required: 'Authorization: Bearer <token>' or ?token=",
                       (("WWW-Authenticate", "Bearer"),))
HOW_TO_ACT = "set MONITOR_API_TOKEN and send it as 'Authorization: Bearer <token>'"


class Gate:
    """Who may read and who may change data. Every response, the cached fast path's included, goes through
    ``authorize`` and ``cors_headers``; every route that changes data also through ``acting``."""

    def __init__(self, config):
        """``config``: the API's parsed settings (``monitor_api.create_app``)."""
        self.token = config["MONITOR_API_TOKEN"]
        self.origins = set(config["MONITOR_CORS_ORIGINS"] or ())
        self.listening = config["MONITOR_API_HOST"]
        # Host names accepted without a token; loopback addresses are accepted too (see host_ok).
        self.hosts = {host_name(self.listening), "localhost"}
        self.hosts |= {host_name(h) for h in config["MONITOR_API_HOSTS"] or ()}
        self.loopback = is_loopback(host_name(self.listening))
        self.readonly = config["MONITOR_API_READONLY"]

    def authorize(self, environ):
        """None if the request may go on, else a Refusal. With a token, every request but /health and
        CORS preflights must offer it (401); without one, the Host must be this API's (400), which closes
        DNS rebinding: a foreign page that makes its own name resolve to this address sends its own name."""
        if environ.get("PATH_INFO") == "/health":
            return None  # for load balancers and probes: it tells whether Redis answers, and the node count
        if self.token is None:
            host = environ.get("HTTP_HOST")
            if host is None or self.host_ok(host):
                return None
            return Refusal(400, f"Host {host[:100]!r} is not accepted without a token: add it to "
                                "MONITOR_API_HOSTS, or set MONITOR_API_TOKEN")
        if environ["REQUEST_METHOD"] == "OPTIONS" or offers_token(environ, self.token):
            return None
        return UNAUTHORIZED

    def host_ok(self, host):
        name = host_name(host)
        return name in self.hosts or is_loopback(name)

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
                   ("Access-Control-Expose-Headers", "ETag, X-Skipped-Entries")]
        if environ["REQUEST_METHOD"] == "OPTIONS":  # a preflight
            methods, allowed = "GET, HEAD, OPTIONS", "Authorization, If-None-Match"
            if not self.readonly and (self.token is not None or (own and self.loopback)):
                methods, allowed = methods + ", POST, DELETE", allowed + ", Content-Type"
            headers += [("Access-Control-Allow-Methods", methods), ("Access-Control-Allow-Headers", allowed),
                        ("Access-Control-Max-Age", "600")]
        return headers

    def acting(self, req):
        """``(Refusal or None, how it was accepted)`` for a request to a route that changes data."""
        if self.readonly:
            return Refusal(403, "this API is read-only (MONITOR_API_READONLY=1): control and silences are off"), ""
        if req.method in ("GET", "HEAD"):
            allow = sorted((req.url_rule.methods if req.url_rule else set()) - {"GET", "HEAD", "OPTIONS"})
            return Refusal(405, f"{req.method} does not change data: use {' or '.join(allow) or 'POST'}",
                           (("Allow", ", ".join(allow)),)), ""
        origin = req.headers.get("Origin")
        if self.token is not None:
            if not offers_token(req.environ, self.token):
                return UNAUTHORIZED, ""
            how = "token"
        elif not self.loopback:
            return Refusal(403, f"without a token, changes are accepted only when the API listens on a loopback "
                                f"address, not {self.listening}: {HOW_TO_ACT}"), ""
        elif origin is None:
            how = "no token: loopback, no browser origin"
        elif origin == own_origin(req.environ):
            how = "no token: loopback, the API's own page"
        else:
            return Refusal(403, f"changes are not accepted from origin {origin[:100]!r} without a token: "
                                f"{HOW_TO_ACT}"), ""
        has_body = req.method in ("POST", "PUT", "PATCH") or req.content_length or req.headers.get("Transfer-Encoding")
        if has_body and req.mimetype != "application/json":
            return Refusal(415, "send the body as JSON, with 'Content-Type: application/json'"), ""
        return None, how


def acting(view):
    """Guards a route that changes data (control, silences): put it under the route decorator.

        @bp.post("/control")
        @acting
        def control(): ...   # g.actor = {"address": client address, "via": how it was let in}

    Refused with JSON: 403 in read-only mode, or without a token from anywhere but curl or the API's own
    page on a loopback API; 401 without the token when one is set; 405 for GET; 415 for a body that is not
    JSON. Every accepted and refused request is logged (method, path, client address, reason; never the token).
    """
    @functools.wraps(view)
    def guarded(*args, **kwargs):
        refusal, how = gate().acting(request)
        if refusal is not None:
            log_acting(refusal)
            return refusal.response()
        logger.info("Accepted %s %s from %s (%s)", request.method, request.path[:200], request.remote_addr, how)
        g.actor = {"address": request.remote_addr, "via": how}
        return view(*args, **kwargs)

    guarded.changes_data = True
    return guarded


def log_acting(refusal):
    logger.warning("Refused %s %s from %s (%d): %s", request.method, request.path[:200], request.remote_addr,
                   refusal.status, refusal.message)


def offers_token(environ, token):
    """Whether the request offers the token, as a Bearer header or ``?token=``; compared in constant time."""
    header = environ.get("HTTP_AUTHORIZATION", "")
    offered = [header[7:].strip()] if header[:7].lower() == "bearer " else []
    query = environ.get("QUERY_STRING", "")
    if "token" in query:
        offered += parse_qs(query).get("token", [])
    expected = token.encode()
    return any(hmac.compare_digest(o.encode(), expected) for o in offered)


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
