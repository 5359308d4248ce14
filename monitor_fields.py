"""The API's ``?fields=`` projection: which node and view fields a list view sends, checked, and their JSON."""

from typing import Optional, Union

from monitor_contract import Snapshot, dumps, slim
from monitor_read import SPIDER_FIELDS, STATES

# What a node's object in a list view may hold: the snapshot's fields, its status classes, and what readers
# derive (state, age).
NODE_FIELDS = frozenset((*Snapshot.__annotations__, *(f"status_{c}xx" for c in range(1, 6)), "state", "age"))
# What a spider's cluster view holds (/spiders).
VIEW_FIELDS = frozenset(("spider", "timestamp", *SPIDER_FIELDS, *(f"nodes_{state}" for state in STATES), "nodes",
                         "queue_rate", "queue_eta"))
# A projection names at most this many fields (there are fewer than this).
MAX_NAMES = 100

Fields = Union[None, str, tuple]


def parse_fields(raw: Optional[str], known: frozenset) -> Fields:
    """``None`` (the list view's default fields), ``"all"`` (every field, BIG_FIELDS too) or a tuple of names
    from ``?fields=`` (comma-separated); ValueError naming the unknown ones."""
    if raw is None:
        return None
    names = list(dict.fromkeys(name.strip() for name in raw.split(",") if name.strip()))
    if names == ["all"]:
        return "all"
    if not names or len(names) > MAX_NAMES:
        raise ValueError("fields must be 'all' or comma-separated field names, e.g. fields=state,cpu,memory")
    unknown = [name for name in names if name not in known]
    if unknown:
        shown = ", ".join(repr(name[:50]) for name in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise ValueError(f"unknown field{'s' if len(unknown) > 1 else ''} {shown}: fields are 'all' or any of "
                         f"{', '.join(sorted(known))}")
    return tuple(names)


def projected(snapshot: dict, fields: Fields) -> dict:
    """The snapshot as a list view sends it: without BIG_FIELDS (``None``), whole (``"all"``), or only
    ``fields`` it has (``age`` is the caller's to add)."""
    if fields is None:
        return slim(snapshot)
    if fields == "all":
        return snapshot
    return {f: snapshot[f] for f in fields if f in snapshot}


def node_json(node: str, snapshot: dict, fields: Fields) -> bytes:
    """``"<node>":{...`` (the object left open, for ``closed`` to close)."""
    return dumps({node: projected(snapshot, fields)}).encode()[1:-2]


def closed(part: bytes, age: Optional[int]) -> bytes:
    """A ``node_json`` part closed, with ``"age"`` unless it is None."""
    if age is None:
        return part + b"}"
    return part + (b'"age":%d}' if part.endswith(b"{") else b',"age":%d}') % age


def project_view(view: dict, fields: Fields) -> dict:
    """A spider's cluster view with only ``fields`` (None and "all": every field)."""
    return view if fields in (None, "all") else {f: view[f] for f in fields if f in view}

