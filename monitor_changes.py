"""The API's routes that change data: fleet control, silences and the spiders' queues, and what every change
shares: a strict JSON body, its audit entry, its idempotency key, and a write Redis may have applied
(OutcomeUnknown). Registered by monitor_api.create_app; who may call them is monitor_gate's ``acting``."""

import contextlib
import logging
from urllib.parse import quote

import redis
from flask import Blueprint, abort, current_app, g, request
from werkzeug.exceptions import HTTPException

from monitor_acting import (
    FLUSH_LUA,
    REQUEUE_LUA,
    SEED_LUA,
    act_on_queues,
    audit_fields,
    idempotency_key,
    issue,
    write_audit,
)
from monitor_alert_state import remove_silence, silence_from, store_silence
from monitor_contract import CONTROL_COMMANDS, dead_key, dumps, is_text, loads, redis_now
from monitor_gate import SEED_BODY, acting, shown
from monitor_queues import QueueError, parse_flush, parse_requeue, parse_seed, queues_of
from monitor_settings import redact, scrub

logger = logging.getLogger("monitor_api")
changes = Blueprint("changes", __name__)


def reader():
    """The app's StatusReader (monitor_api.StatusReader)."""
    return current_app.extensions["reader"]


@changes.post("/silences")
@acting
def add_silence():
    """``{"matchers": {...}, "duration" | "until", "comment"}`` -> 201 ``{"id", "until"}``; audited, idempotent."""
    body = request_json()
    mon = reader()
    now = redis_now(mon.redis.time())
    try:
        silence = silence_from(body, now, actor_text())
        with writing():
            answer, repeated = store_silence(mon.redis, mon.prefix, silence, audit_entry(
                "silence.add", dumps(silence["matchers"]), silence["comment"]), idempotency())
    except ValueError as exc:
        abort(400, str(exc))
    mon.cache.entries.clear()  # /alerts shows it at once
    g.outcome = (f"{'repeat: ' if repeated else ''}silence {answer['id']} of {shown(dumps(silence['matchers']))} "
                 f"until {answer['until']}")
    return answer, 201


@changes.delete("/silences/<node:name>")
@acting
def delete_silence(name):
    """Delete a silence by id: 200 ``{"id", "deleted": true}``, or 404; audited, idempotent."""
    with writing():
        answer, repeated = remove_silence(reader().redis, reader().prefix, name[:100],
                                          audit_entry("silence.delete", name[:100]), idempotency())
    if answer is None:
        abort(404, "no silence by that id")
    reader().cache.entries.clear()
    g.outcome = f"{'repeat: ' if repeated else ''}silence {shown(name, 100)} deleted"
    return answer


def actor_text():
    """Who acts, as a silence's ``who`` shows it: ``<name> from <address> (<how>)``."""
    return f"{g.actor['who']} from {g.actor['address']} ({g.actor['via']})"


def audit_entry(action, target, comment=""):
    """The audit fields of the change this request makes (Redis adds ``id`` and ``at``, the script ``ref``)."""
    return audit_fields(g.actor["who"], action, target, comment, g.actor["via"], g.actor["address"], g.request_id)


# The audit action of each route that changes data.
ACTIONS = {f"changes.{route}": action for route, action in (
    ("control", "control"), ("add_silence", "silence.add"), ("delete_silence", "silence.delete"),
    ("seed_queue", "queues.seed"), ("flush_queue", "queues.flush"), ("requeue_dead", "queues.requeue"),
    ("delete_dead", "queues.flush"))}


def audit_refusal(refusal):
    """Record a refused change by a known caller (``monitor_gate.refused``); a Redis failure is only logged."""
    entry = {**audit_entry(ACTIONS.get(request.endpoint, str(request.endpoint)), request.path[:200]),
             "outcome": "refused", "status": refusal.status, "error": refusal.message[:300]}
    try:
        write_audit(reader().redis, reader().prefix, entry)
    except redis.RedisError as exc:
        logger.warning("Cannot record a refusal in the audit log: %s", scrub(exc, reader().url))


def audit_reload(status_reader, config, names, problems):
    """Record a re-read of MONITOR_API_TOKENS_FILE (``monitor_gate.Tokens.reloaded``)."""
    skipped = f"; {len(problems)} line(s) skipped" if problems else ""
    entry = audit_fields("tokens file", "tokens.reload", str(config.get("MONITOR_API_TOKENS_FILE")),
                         f"{len(names)} token(s): {', '.join(names)}{skipped}"[:500])
    try:
        write_audit(status_reader.redis, status_reader.prefix, entry)
    except redis.RedisError as exc:
        logger.warning("Cannot record the tokens file's re-read in the audit log: %s", scrub(exc, status_reader.url))


def idempotency():
    """The Redis key of this request's Idempotency-Key (per caller), or ''."""
    return idempotency_key(reader().prefix, g.actor["who"], g.idempotency) if g.idempotency else ""


class OutcomeUnknown(HTTPException):
    """Redis timed out during a write: it may have applied it. 503 with ``outcome: unknown`` and where to look,
    and no Retry-After: a blind retry could apply it twice (repeat with the same Idempotency-Key instead)."""

    code = 503
    outcome = "unknown"


@contextlib.contextmanager
def writing():
    """Around the one script that makes a change: a timeout or lost connection there is OutcomeUnknown."""
    try:
        yield
    except (redis.TimeoutError, redis.ConnectionError) as exc:
        reader().outage.failed("Redis at %s did not answer a write: %s", redact(str(reader().url)),
                               scrub(exc, reader().url))
        unknown = OutcomeUnknown("Redis did not answer during the write: it may or may not be applied. Check the "
                                 "audit log, or repeat the request with the same Idempotency-Key")
        unknown.extra = {"outcome": "unknown", "check": f"/audit?request={quote(g.request_id, safe='')}"}
        raise unknown from None


# The deepest nesting a request body may have (a command or a silence needs three levels).
MAX_DEPTH = 16


def request_json():
    """The request's body as strict JSON (``monitor_contract.loads``): 413 over MAX_BODY (before it is read
    whole), 400 naming the problem for text that is not JSON, numbers out of range, or nesting past MAX_DEPTH."""
    raw = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH, a chunked body included
    try:
        body = loads(raw)
    except ValueError as exc:
        abort(400, f"the body is not usable JSON: {str(exc)[:200]}")
    if depth(body) > MAX_DEPTH:
        abort(400, f"the body nests deeper than {MAX_DEPTH} levels")
    return body


def depth(value):
    """How deeply a parsed JSON value nests (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            level += 1
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                stack.extend((v, level) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


# ---------------------------------------------------------------------------- fleet control

# A node id or spider name in a command is at most this long; a comment at most MAX_COMMENT characters.
MAX_NAME = 1000
MAX_COMMENT = 500
TARGET_KINDS = ("node", "spider", "all")


@changes.route("/control", methods=["GET", "POST"])  # GET listed so that @acting refuses it, and logs the refusal
@acting
def control():
    """``{"command", "node"|"spider"|"all", "comment"?}``: stored for the nodes to apply, and logged; 202 with
    the nodes it reaches now (not closed). A spider or ``all`` command also holds for nodes that start later."""
    command, kind, name, comment = parse_command(request_json())
    nodes = reader().nodes()[0]
    if kind == "node":
        if name not in nodes:
            abort(404, "no node by that name")
        if nodes[name]["state"] == "closed":
            abort(409, "that node is closed: there is nothing to control")
        chosen = [name]
    else:
        chosen = [n for n, s in nodes.items() if kind == "all" or s["spider"] == name]
        if kind == "spider" and not chosen:
            abort(404, "no spider by that name")
    reached = sorted(n for n in chosen if nodes[n]["state"] != "closed")
    target = "all" if kind == "all" else f"{kind}:{name}"
    fields = {"comment": comment, "who": g.actor["who"], "from": g.actor["address"], "via": g.actor["via"],
              "reached": len(reached)}
    with writing():
        answer, repeated = issue(reader().redis, reader().prefix, command, target, fields,
                                 audit_entry(f"control.{command}", target, comment), idempotency(),
                                 {"command": command, "target": target, "nodes": reached})
    reader().answered()
    g.outcome = (f"{'repeat: ' if repeated else ''}command {answer['id']}: {command} for {shown(target)}, "
                 f"reaching {len(answer['nodes'])} node(s)")
    return {k: answer[k] for k in ("id", "command", "target", "at", "nodes")}, 202


def parse_command(body):
    """``(command, target kind, name, comment)`` from a POST /control body; 400 naming what is wrong."""
    if not isinstance(body, dict):
        abort(400, "send a JSON object: {\"command\": \"pause\", \"node\"|\"spider\"|\"all\": ...}")
    unknown = sorted(set(body) - {"command", "comment", *TARGET_KINDS})
    if unknown:
        abort(400, f"unknown field {unknown[0][:100]!r}: use command, node, spider, all and comment")
    command = body.get("command")
    if command not in CONTROL_COMMANDS:
        abort(400, f"command must be one of {', '.join(CONTROL_COMMANDS)}")
    kinds = [k for k in TARGET_KINDS if k in body]
    if len(kinds) != 1:
        abort(400, "name exactly one target: \"node\": <node id>, \"spider\": <name> or \"all\": true")
    kind, name = kinds[0], body[kinds[0]]
    if kind == "all" and name is not True:
        abort(400, "\"all\" must be true")
    if kind != "all" and not (isinstance(name, str) and 0 < len(name) <= MAX_NAME and is_text(name)):
        abort(400, f"\"{kind}\" must be a non-empty string of at most {MAX_NAME} characters")
    comment = body.get("comment", "")
    if not (isinstance(comment, str) and len(comment) <= MAX_COMMENT and is_text(comment)):
        abort(400, f"comment must be a string of at most {MAX_COMMENT} characters")
    return command, kind, name if kind != "all" else None, comment


# ---------------------------------------------------------------------------- the spiders' queues

def checked(check, *args):
    """``check(*args)`` (a parser or ``queues_of`` of monitor_queues), its QueueError answered as JSON."""
    try:
        return check(*args)
    except QueueError as exc:
        abort(exc.status, str(exc))


def act_on(name, command, script, keys, args, comment):
    """Run a queue script for spider ``name``, logged as ``command`` in the control log and audited."""
    target = f"spider:{name}"
    entry = {"command": command, "target": target, "comment": comment, "who": g.actor["who"],
             "from": g.actor["address"], "via": g.actor["via"]}
    with writing():
        answer, repeated = act_on_queues(reader().redis, reader().prefix, script, keys, args, entry,
                                         audit_entry(f"queues.{command}", target, comment), idempotency())
    reader().answered()
    reader().cache.entries.clear()  # the spider's sizes and dead letters show the change at once
    return answer, repeated


@changes.post("/queues/<node:name>/seed")
@acting
def seed_queue(name):
    """``{"urls": [...]}`` or ``{"requests": [{"url", "meta"}]}`` (at most 10,000) onto the spider's start URLs:
    ``{"pushed", "id", "at"}``; logged as ``seed`` in the control log, audited, idempotent."""
    request.max_content_length = SEED_BODY
    entries, comment = checked(parse_seed, request_json())
    queues = checked(queues_of, reader().nodes()[0], name)
    answer, repeated = act_on(name, "seed", SEED_LUA, [queues["start_urls"]], [queues["start_urls_type"], *entries],
                              comment)
    g.outcome = f"{'repeat: ' if repeated else ''}seed {answer['id']}: {answer['pushed']} URL(s) for {shown(name)}"
    return answer


@changes.post("/queues/<node:name>/flush")
@acting
def flush_queue(name):
    """``{"what": ["requests", "start_urls", "dupefilter"]}``: deletes those keys; ``{"flushed": {name: entries
    held}, "id", "at"}``; logged as ``flush``, audited, idempotent."""
    what, comment = checked(parse_flush, request_json())
    queues = checked(queues_of, reader().nodes()[0], name)
    keys = [queues[w] or f"{queues['requests']}:none" for w in what]  # a spider without start URLs: nothing there
    answer, repeated = act_on(name, "flush", FLUSH_LUA, keys, what, comment)
    g.outcome = f"{'repeat: ' if repeated else ''}flush {answer['id']} of {shown(name)}: {dumps(answer['flushed'])}"
    return answer


@changes.post("/queues/<node:name>/dead/requeue")
@acting
def requeue_dead(name):
    """``{"ids": [...]}`` or ``{"all": true}``: those dead letters back onto the start URLs, each once however many
    clients race; ``{"requeued", "missing", "id", "at"}``; 404 when none of them is held any more."""
    ids, comment = checked(parse_requeue, request_json())
    queues = checked(queues_of, reader().nodes()[0], name)
    answer, repeated = act_on(name, "requeue", REQUEUE_LUA, [dead_key(reader().prefix, name), queues["start_urls"]],
                              [queues["start_urls_type"], "all" if ids is None else "ids", *(ids or ())], comment)
    if answer is None:
        abort(404, "the spider holds no dead letters" if ids is None else
              "none of those dead letters is held any more (requeued or deleted already)")
    g.outcome = f"{'repeat: ' if repeated else ''}requeue {answer['id']}: {answer['requeued']} of {shown(name)}"
    return answer


@changes.delete("/queues/<node:name>/dead")
@acting
def delete_dead(name):
    """Empties the spider's dead letters: ``{"flushed": {"dead": n}, "id", "at"}``; logged as ``flush``."""
    if name not in reader().spider_names() and not reader().redis.exists(dead_key(reader().prefix, name)):
        abort(404, "no spider by that name has nodes or dead letters")
    answer, repeated = act_on(name, "flush", FLUSH_LUA, [dead_key(reader().prefix, name)], ["dead"], "")
    g.outcome = f"{'repeat: ' if repeated else ''}flush {answer['id']} of {shown(name)}: {dumps(answer['flushed'])}"
    return answer
