"""The one gate readers decode a snapshot by: ``decode_snapshot`` keeps a node only when its fields have the
types and ranges of ``monitor_contract.Snapshot`` (crawl insight of the wrong shape dropped, the node kept), and
what readers derive from a snapshot: its state, age, slim list-view form and newest error. The crawler never
decodes snapshots, so this module is not among the three files a crawler machine needs."""

import functools
import itertools
import math
import operator
import time
from itertools import repeat
from typing import Optional, Union

from monitor_contract import (
    DEFAULT_INTERVAL,
    DOMAIN_COUNTS,
    LATENCY_BUCKETS,
    MAX_FIELDS,
    MAX_TOP_DOMAINS,
    NUMBER_LIMIT,
    QUEUE_NAMES,
    SAMPLE_TEXT,
    SAMPLES,
    STALE_INTERVALS,
    START_URL_TYPES,
    Snapshot,
    in_bounds,
    is_name,
    is_number,
    is_text,
    loads,
    number,
    orjson,
    slim_domains,
    surely_in_bounds,
)

# Insight's latency figures: each a number >= 0, or null.
LATENCY_FIGURES = ("latency_p50", "latency_p95", "latency_p99", "latency_sum")
# A report interval beyond a day is not a monitor's interval.
MAX_INTERVAL = 86400


# Snapshot fields that must be text when present: they become labels, keys and page text.
TEXT_FIELDS = ("node", "host", "spider", "status", "finish_reason", "version", "args_hash")


def decode_snapshot(raw: Union[bytes, str, None], slim: bool = False) -> Optional[Snapshot]:
    """A stored snapshot as a dict, or None unless it passes the one gate every reader goes through:
    a strict JSON object with a string ``spider`` and a numeric ``timestamp``; ``node``, ``host``,
    ``spider``, ``status``, ``finish_reason`` text (or absent) that encodes as UTF-8; every number below
    1e18 in size (no NaN or infinity); ``interval`` within (0, 86400]. ``slim``: a slim value (``slim_value``),
    whose domains are columns (``_slim_domains``)."""
    try:
        value = loads(raw, bounded=False)  # then bounds checked: faster than loads' own check
        if value.__class__ is not dict:
            return None
        domains = value.get("domains")
        if domains is not None:  # checked while cleaned (the bulk of a snapshot with insight)
            value["domains"] = None
        if not (surely_in_bounds(raw) or in_bounds(value)):
            return None
        if domains is not None:
            domains = _slim_domains(domains) if slim else _domains(domains) if domains.__class__ is dict else \
                _unbounded(domains)
            if domains is None:
                del value["domains"]
            else:
                value["domains"] = domains
    except (ValueError, TypeError):  # out of bounds in the domains too
        return None
    if not (value.get("spider").__class__ is str and is_number(value.get("timestamp"))):
        return None
    for field in TEXT_FIELDS:
        text = value.get(field)
        if text is not None and not (text.__class__ is str and (text.isascii() or is_text(text))):
            return None
    interval = value.get("interval")
    if interval is not None and not (is_number(interval) and 0 < interval <= MAX_INTERVAL):
        return None
    if "seen" in value and not is_number(value["seen"]):
        return None
    if "queues" in value and not queue_names_ok(value["queues"]):
        del value["queues"]
    return clean_insight(value)  # crawl insight fields of the wrong shape are dropped, the node kept


def queue_names_ok(queues):
    return (isinstance(queues, dict) and all(is_name(queues.get(k)) or queues.get(k) == "" for k in QUEUE_NAMES)
            and queues.get("start_urls_type") in START_URL_TYPES and isinstance(queues.get("apart", False), bool))


def parse_snapshot(raw: Union[bytes, str, None], now: Optional[float] = None, slim: bool = False
                   ) -> Optional[Snapshot]:
    """``decode_snapshot`` plus the node's derived ``state``."""
    snapshot = decode_snapshot(raw, slim)
    if snapshot is not None:
        snapshot.pop("age", None)  # readers derive it
        snapshot["state"] = node_state(snapshot, now)
    return snapshot


# How many stored values ``parse_snapshots`` checks at once: a value that is not usual sends its block value by value.
BLOCK = 256


def parse_snapshots(raws: list, now: float, slim: bool = False) -> tuple[list, list]:
    """``([parse_snapshot(raw, now, slim) for raw in raws], flips)``, with each one's ``stale_after`` in ``flips``
    (None when closed or malformed: its state never changes with time alone). Each BLOCK of values that are all usual
    (``_usual``) is checked and judged at C speed, figure by figure over the block; any other block value by value."""
    snapshots, flips = [], []
    for start in range(0, len(raws), BLOCK):
        block = raws[start:start + BLOCK]
        values = _usual(block, slim)
        if values is None:
            values = [parse_snapshot(raw, now, slim) for raw in block]
            after = [None if s is None or s["state"] == "closed" else stale_after(s) for s in values]
        else:  # as node_state and stale_after judge each one: seen (or timestamp) + STALE_INTERVALS * interval
            reports = last_reports(values)  # gated: numbers
            intervals = column(values, "interval", DEFAULT_INTERVAL)
            if None in intervals:
                intervals = [DEFAULT_INTERVAL if i is None else i for i in intervals]
            after = list(map(operator.add, reports, map(operator.mul, repeat(STALE_INTERVALS), intervals)))
            states = ["closed" if status == "closed" else "stale" if now > t else "paused" if status == "paused"
                      else "live" for status, t in zip(map(dict.get, values, repeat("status")), after)]
            list(map(dict.pop, values, repeat("age"), repeat(None)))
            list(map(operator.setitem, values, repeat("state"), states))
            after = [None if state == "closed" else t for state, t in zip(states, after)]
        snapshots += values
        flips += after
    return snapshots, flips


def column(snapshots, key, default=None):
    """Each of ``snapshots``' ``key`` (``default`` where it has none), read at C speed."""
    return list(map(dict.get, snapshots, repeat(key), repeat(default)))


def _present(values, key):
    return list(filter(NOT_NONE, column(values, key)))


def _usual(raws, slim):
    """The decoded values of ``raws`` when each passes ``decode_snapshot`` unchanged (so the gate's answer), else
    None: bytes that orjson decodes (its text is always UTF-8: it refuses surrogates) into objects with the fields'
    usual types and ranges, checked figure by figure over all of them at C speed. Not usual (left to
    ``decode_snapshot``): a wrong or unusual field, names that are not ASCII, an exponent or 19 digits anywhere,
    error samples (cleaned afresh), whole domains (``_domains``)."""
    if orjson is None or not surely_in_bounds(*raws):
        return None
    try:
        values = list(map(orjson.loads, raws))
    except orjson.JSONDecodeError:
        return None
    if set(map(type, values)) != {dict}:
        return None
    texts = list(itertools.chain.from_iterable(column(values, field) for field in TEXT_FIELDS))
    intervals = _present(values, "interval")
    if not (_kinds(column(values, "spider", 0)) == {str} and _kinds(column(values, "timestamp")) <= NUMBER_TYPES
            and _kinds(column(values, "seen", 0)) <= NUMBER_TYPES and _kinds(texts) <= {str, NONE}
            and _kinds(intervals) <= NUMBER_TYPES
            and (not intervals or min(intervals) > 0 and max(intervals) <= MAX_INTERVAL)
            and _kinds(column(values, "error_samples")) <= {NONE}
            and all(_counts_ok(_present(values, q)) for q in LATENCY_FIGURES)):
        return None
    queues = _present(values, "queues")
    if len(queues) != sum(map(operator.contains, values, repeat("queues"))) or not _kinds(queues) <= {dict}:
        return None
    names = list(itertools.chain.from_iterable(column(queues, name, 0) for name in QUEUE_NAMES))
    if not (_kinds(names) <= {str} and max(map(len, names), default=0) <= SAMPLE_TEXT
            and _kinds(types := column(queues, "start_urls_type", "")) <= {str} and set(types) <= set(START_URL_TYPES)
            and _kinds(column(queues, "apart", False)) <= {bool}):
        return None
    buckets, fields, lowest = (_present(values, key) for key in ("latency_buckets", "fields", "fields_lowest"))
    if not (_kinds(buckets) <= {list} and set(map(len, buckets)) <= {len(LATENCY_BUCKETS) + 1}
            and _counts_ok(list(itertools.chain.from_iterable(buckets)))
            and _kinds(fields) <= {dict} and max(map(len, fields), default=0) <= MAX_FIELDS
            and _names_ok(list(itertools.chain.from_iterable(fields)))
            and _counts_ok(list(itertools.chain.from_iterable(map(dict.values, fields))), 1)
            and _kinds(lowest) <= {list} and set(map(len, lowest)) <= {2}):
        return None
    lowest_names = list(map(operator.itemgetter(0), lowest))
    if not (_kinds(lowest_names) <= {str} and _names_ok(lowest_names) and _counts_ok(
            list(map(operator.itemgetter(1), lowest)), 1)):
        return None
    domains = _present(values, "domains")  # slim: [names, pages, refused(, delays)], as _slim_domains keeps them
    if domains and not (slim and _columns_ok(domains, {3, 4}, MAX_TOP_DOMAINS + 1, NUMBER_LIMIT - 1)):
        return None
    return values


def _kinds(values):
    return set(map(type, values))


# The keys of an insight value (``monitor_contract.insight_value``), and ``_columns_ok``'s shape of each key's columns.
INSIGHT_COLUMNS = {"domains": ({1 + len(DOMAIN_COUNTS)}, MAX_TOP_DOMAINS + 1, NUMBER_LIMIT - 1, True, True),
                   "fields": ({2}, MAX_FIELDS, 1, False, True)}
INSIGHT_KEYS = frozenset(("seen", "latency_buckets", *INSIGHT_COLUMNS))


def parse_insights(raws: list, seens: list) -> list:
    """For each of ``raws`` (``insight_key``'s values, None where missing) and the ``seen`` stamp of the snapshot it
    goes with: ``(latency_buckets, domains, fields)`` (each None when absent) when the value is usual and stamped
    alike, so the same as that snapshot's own, cleaned by the gate; else None: an older extension's node, a value
    written by hand or not yet in step, which the caller reads from the whole snapshot. Usual: every name ASCII
    text and distinct, every figure a number within the gate's bounds (a domain's may be null: the gate's None for
    a figure the node did not give); checked BLOCK values at a time at C speed, a block that is not usual value by
    value."""
    out = []
    for start in range(0, len(raws), BLOCK):
        block = raws[start:start + BLOCK]
        values = _usual_insights(block)
        if values is None:
            values = [(_usual_insights([raw]) or (None,))[0] for raw in block]
        out += [None if v is None or v.get("seen") != seen else
                (v.get("latency_buckets"), v.get("domains"), v.get("fields"))
                for v, seen in zip(values, seens[start:start + BLOCK])]
    return out


def _usual_insights(raws):
    """The decoded ``raws`` when each is a usual insight value (``parse_insights``), else None."""
    if orjson is None or None in raws or not surely_in_bounds(*raws):
        return None
    try:
        values = list(map(orjson.loads, raws))
    except orjson.JSONDecodeError:
        return None
    if not (_kinds(values) == {dict} and set(itertools.chain.from_iterable(values)) <= INSIGHT_KEYS
            and _kinds(column(values, "seen", 0)) <= NUMBER_TYPES):
        return None
    buckets = _present(values, "latency_buckets")
    if not (_kinds(buckets) <= {list} and set(map(len, buckets)) <= {len(LATENCY_BUCKETS) + 1}
            and _counts_ok(list(itertools.chain.from_iterable(buckets)))):
        return None
    if all(_columns_ok(_present(values, key), *shape) for key, shape in INSIGHT_COLUMNS.items()):
        return values
    return None


def _columns_ok(tables, widths, most, high, nulls=False, distinct=False):
    """Whether each of ``tables`` is names, then columns of figures (as many lists in all as one of ``widths``), each
    column as long as its names, at most ``most``: ``_names_ok`` names (``distinct`` ones), numbers within [0,
    ``high``] (or null, with ``nulls``); checked over all at C speed."""
    if not (_kinds(tables) <= {list} and set(map(len, tables)) <= widths
            and _kinds(itertools.chain.from_iterable(tables)) <= {list}):
        return False
    names = list(map(operator.itemgetter(0), tables))
    lengths = list(map(len, names))
    flat = list(itertools.chain.from_iterable(names))
    if not (max(lengths, default=0) <= most and _kinds(flat) <= {str} and _names_ok(flat)
            and (not distinct or lengths == list(map(len, map(set, names))))):
        return False
    for i in range(1, max(widths)):
        having = tables if i < min(widths) else [t for t in tables if len(t) > i]  # a column not every table has
        if list(map(len, map(operator.itemgetter(i), having))) != (
                lengths if having is tables else list(map(len, map(operator.itemgetter(0), having)))):
            return False
    figures = list(itertools.chain.from_iterable(itertools.chain.from_iterable(
        map(operator.itemgetter(slice(1, None)), tables))))
    kinds = _kinds(figures)  # (a type set, not ``None in``: comparing each number to None is slow)
    if nulls and NONE in kinds:
        figures, kinds = list(filter(NOT_NONE, figures)), kinds - {NONE}
    return kinds <= NUMBER_TYPES and (not figures or min(figures) >= 0 and max(figures) <= high)


def node_state(snapshot: Snapshot, now: Optional[float] = None) -> str:
    """``closed``, ``stale`` (silent for more than three intervals), ``paused`` or ``live``; derived, never
    stored. ``now`` is on Redis's clock, as is the report time (see ``last_report``)."""
    if snapshot.get("status") == "closed":
        return "closed"
    if (time.time() if now is None else now) > stale_after(snapshot):
        return "stale"
    return "paused" if snapshot.get("status") == "paused" else "live"


def stale_after(snapshot: Snapshot) -> float:
    """When a node not closed turns stale, on Redis's clock: three of its intervals after its last report."""
    return last_report(snapshot) + STALE_INTERVALS * (number(snapshot.get("interval"), DEFAULT_INTERVAL)
                                                      or DEFAULT_INTERVAL)


def last_report(snapshot):
    """When the node last reported, on Redis's clock: ``seen``, which Redis stamps on every write (so a node
    whose own clock is wrong is judged fairly), else the node's own ``timestamp``."""
    seen = number(snapshot.get("seen"))
    return seen if seen is not None else number(snapshot.get("timestamp"), 0)


def age(snapshot, now):
    """Whole seconds since the node last reported, at ``now`` on Redis's clock."""
    return max(int(now - last_report(snapshot)), 0)


def last_reports(snapshots):
    """Each of ``snapshots``' ``seen``, else its ``timestamp``, as stored, found at C speed: ``last_report`` of each
    when they are all numbers (the caller checks)."""
    return list(map(dict.get, snapshots, repeat("seen"), column(snapshots, "timestamp")))


def ages(times, now):
    """``age`` of a node that last reported at each of ``times`` (numbers, as ``last_report`` gives), at C speed."""
    return list(map(max, map(int, map(operator.sub, itertools.repeat(now), times)), itertools.repeat(0)))


def _num(value, low=0.0, high=math.inf):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _names_ok(names):
    """Whether every one of ``names`` (an object's keys: text) is an ``is_name`` in ASCII, checked at C speed."""
    return "".join(names).isascii() and "" not in names and (not names or max(map(len, names)) <= SAMPLE_TEXT)


def _counts_ok(values, high=math.inf):
    """Whether every one of ``values`` is a number (not a bool) within [0, ``high``], checked at C speed."""
    return set(map(type, values)) <= NUMBER_TYPES and (not values or min(values) >= 0 and max(values) <= high)


NUMBER_TYPES = frozenset((int, float))
# A domain's figures after the gate: each known one a number >= 0, else None.
NO_FIGURES = dict.fromkeys(DOMAIN_COUNTS + ("latency_p95", "delay"))
FIGURES = frozenset(NO_FIGURES)
NONE = type(None)
FIGURE_TYPES = frozenset((int, float, NONE))
NOT_NONE = functools.partial(operator.is_not, None)


def _domains(domains, slim=False):
    """The first MAX_TOP_DOMAINS + 1 of a snapshot's domains named by text of at most SAMPLE_TEXT characters,
    each an object: its known figures (NO_FIGURES) that are numbers >= 0, the others None; with ``slim`` the others
    are absent (a slim value leaves zeros out: its readers ``get`` figures). Raises ValueError for any number out
    of bounds in ``domains`` (``in_bounds``), kept or not. The usual domains are checked at C speed; the others
    figure by figure."""
    figures = domains.values()
    if (len(domains) <= MAX_TOP_DOMAINS + 1 and set(map(type, figures)) <= {dict} and _names_ok(domains)
            and set(itertools.chain.from_iterable(figures)) <= FIGURES):  # the usual case, checked at C speed
        values = list(itertools.chain.from_iterable(map(dict.values, figures)))
        kinds = set(map(type, values))
        if kinds <= FIGURE_TYPES:
            numbers = list(filter(NOT_NONE, values)) if NONE in kinds else values
            if not numbers or min(numbers) >= 0 and max(numbers) < NUMBER_LIMIT:
                if slim or all(map(len(FIGURES).__eq__, map(len, figures))):
                    return domains
                return {name: NO_FIGURES | v for name, v in domains.items()}
    out = {}
    for i, (name, v) in enumerate(domains.items()):
        if v.__class__ is not dict or i > MAX_TOP_DOMAINS or not is_name(name):
            if not in_bounds([v]):
                raise ValueError("a number is out of range")
            continue
        figures = {} if slim else NO_FIGURES.copy()
        for k, x in v.items():
            kind = x.__class__
            if kind is int or kind is float:
                if not -NUMBER_LIMIT < x < NUMBER_LIMIT:
                    raise ValueError("a number is out of range")
                if x >= 0 and k in FIGURES:
                    figures[k] = x
            elif (kind is dict or kind is list) and not in_bounds(x):
                raise ValueError("a number is out of range")
        out[name] = figures
    return out


def _unbounded(value):
    """None for a value of the wrong shape, once its numbers are found in bounds (else ValueError, as ``in_bounds``)."""
    if not in_bounds(value):
        raise ValueError("a number is out of range")
    return None


def _slim_domains(domains):
    """A slim value's ``domains`` (``monitor_contract.slim_domains``: ``[names, pages, refused(, delays)]``), or None
    when of the wrong shape; an older extension's (``{name: figures}``, as ``_domains`` cleans them) made columns.
    ValueError for a number out of bounds, as ``_domains``. Checked at C speed."""
    if domains.__class__ is dict:
        return slim_domains(_domains(domains, slim=True))
    if not (domains.__class__ is list and len(domains) in (3, 4) and set(map(type, domains)) == {list}):
        return _unbounded(domains)
    names, *columns = domains
    if not all(map(_counts_ok, columns, itertools.repeat(NUMBER_LIMIT - 1))):
        return _unbounded(columns)
    if (len(names) <= MAX_TOP_DOMAINS + 1 and set(map(len, columns)) == {len(names)} and set(map(type, names)) <= {str}
            and (_names_ok(names) or all(map(is_name, names)))):
        return domains
    return None


def clean_insight(snapshot):
    """Drop from a decoded snapshot every insight field, or part of one, of the wrong shape (in place).

    Kept: ``latency_*`` numbers >= 0; ``latency_buckets`` a list of len(LATENCY_BUCKETS) + 1 counts;
    (``domains`` are cleaned in ``decode_snapshot``: ``_domains``, ``_slim_domains``); ``fields`` up to
    MAX_FIELDS names -> shares 0..1; ``error_samples`` up to SAMPLES objects with text ``message`` and
    ``logger``, a number ``time`` and a text or null ``url``;
    ``fields_lowest`` (slim values) a ``[name, share]``."""
    for q in LATENCY_FIGURES:
        if q in snapshot and not (snapshot[q] is None or _num(snapshot[q])):
            del snapshot[q]
    buckets = snapshot.get("latency_buckets")
    if buckets is not None and not (buckets.__class__ is list and len(buckets) == len(LATENCY_BUCKETS) + 1
                                    and _counts_ok(buckets)):
        del snapshot["latency_buckets"]
    fields = snapshot.get("fields")
    if fields is not None:
        if fields.__class__ is dict:
            if not (len(fields) <= MAX_FIELDS and _names_ok(fields) and _counts_ok(fields.values(), 1)):
                snapshot["fields"] = {name: share for name, share in list(fields.items())[:MAX_FIELDS]
                                      if is_name(name) and _num(share, 0, 1)}
        else:
            del snapshot["fields"]
    lowest = snapshot.get("fields_lowest")
    if lowest is not None and not (isinstance(lowest, list) and len(lowest) == 2 and is_name(lowest[0])
                                   and _num(lowest[1], 0, 1)):
        del snapshot["fields_lowest"]
    samples = snapshot.get("error_samples")
    if samples is not None:
        if isinstance(samples, list):
            snapshot["error_samples"] = [
                {"time": s["time"], "logger": s["logger"][:SAMPLE_TEXT], "message": s["message"][:SAMPLE_TEXT],
                 "url": s["url"][:SAMPLE_TEXT] if is_text(s.get("url")) else None}
                for s in samples[:SAMPLES]
                if isinstance(s, dict) and _num(s.get("time")) and is_text(s.get("logger"))
                and is_text(s.get("message"))]
        else:
            del snapshot["error_samples"]
    return snapshot


def newest_error(snapshot):
    """``"<logger>: <message> (<url>)"`` of the node's newest error sample, or None."""
    samples = snapshot.get("error_samples") or []
    if not samples:
        return None
    s = samples[0]
    return f"{s['logger']}: {s['message']}" + (f" ({s['url']})" if s.get("url") else "")
