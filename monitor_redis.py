"""Redis's own health for GET /redis: INFO per master, the spiders' scrapy-redis key sizes with growth and a
"full in ~N h" forecast, and the monitor's own footprint.

The API calls ``RedisWatch.read`` through its one-second response cache, so INFO is read at most once a second
however many clients ask. Sizes are cheap size commands (LLEN, ZCARD or SCARD, by the key's type) and bytes are
``MEMORY USAGE ... SAMPLES 5``: never a scan of a big key. The growth and forecast arithmetic is pure.
"""

import collections
import threading
import time

from monitor_contract import as_text, history_key, is_text, number, status_key, trend_key

# The INFO fields /redis serves, per master node.
INFO_FIELDS = ("used_memory", "maxmemory", "maxmemory_policy", "evicted_keys", "instantaneous_ops_per_sec",
               "connected_clients", "role", "connected_slaves", "uptime_in_seconds")
# A spider's scrapy-redis keys, by queue, unless its snapshot names them (``queues``).
QUEUES = {"requests": "{spider}:requests", "start_urls": "{spider}:start_urls", "dupefilter": "{spider}:dupefilter"}
# Growth is measured over at least this many seconds of readings, once there are 5 s of them; a reading is kept
# every GROWTH_STEP seconds at most, for GROWTH_KEEP seconds.
GROWTH_WINDOW = 60
GROWTH_STEP = 5
GROWTH_KEEP = 600
# Keys of the monitor sampled for its footprint and TTL check (per kind), and the MEMORY USAGE samples.
FOOTPRINT_SAMPLE = 20
MEMORY_SAMPLES = 5
BYTES_EVERY = 60
# The size command of each container type scrapy-redis uses.
SIZE_COMMANDS = {"list": "LLEN", "zset": "ZCARD", "set": "SCARD"}


def growth_per_min(readings, now):
    """Entries per minute from ``[(time, size), ...]`` (oldest first): against the newest reading at least
    GROWTH_WINDOW old, else the oldest if it is 5 s old; None with nothing to compare."""
    if not readings:
        return None
    t1, size = readings[-1]
    for t0, size0 in reversed(readings):  # noqa: B007 - the newest reading a window older, else the oldest
        if t1 - t0 >= GROWTH_WINDOW:
            break
    if t1 - t0 < 5:
        return None
    return round((size - size0) / ((t1 - t0) / 60), 1)


def full_in_hours(used, limit, bytes_per_min):
    """Hours until ``used`` reaches ``limit`` at ``bytes_per_min``; None if it is not growing or has no limit."""
    if not limit or not bytes_per_min or bytes_per_min <= 0 or used is None:
        return None
    return round(max(limit - used, 0) / (bytes_per_min * 60), 1)


def node_figures(info):
    """INFO's fields /redis serves, with ``limit``: maxmemory, or the machine's memory when maxmemory is 0."""
    figures = {f: info.get(f) for f in INFO_FIELDS}
    figures["limit"] = info.get("maxmemory") or info.get("total_system_memory") or None
    return figures


def spider_keys(spider, snapshot):
    """``{queue: key}`` of a spider: the key names its snapshot reports (``queues``), else scrapy-redis's
    defaults."""
    named = snapshot.get("queues") if snapshot else None
    keys = {q: pattern.format(spider=spider) for q, pattern in QUEUES.items()}
    if isinstance(named, dict):
        keys.update({q: k for q, k in named.items() if q in QUEUES and is_text(k) and 0 < len(k) <= 300})
    return keys


class RedisWatch:
    """Reads Redis's health for /redis; remembers the spiders' key sizes for their growth."""

    def __init__(self, r, prefix, cluster=False):
        self.r, self.prefix, self.cluster = r, prefix, cluster
        self.readings = collections.defaultdict(lambda: collections.deque(maxlen=GROWTH_KEEP // GROWTH_STEP))
        self.bytes = {}  # key -> (when read, MEMORY USAGE)
        self.lock = threading.RLock()  # one reading at a time (the API holds it across its cache check)

    def infos(self, reply=None):
        """``{node address: INFO}`` of every master (one, unless on a cluster); ``reply``: the one server's INFO,
        read already (with other commands)."""
        if self.cluster:
            replies = self.r.info(target_nodes=self.r.PRIMARIES)
            return dict(sorted(replies.items())) if isinstance(replies, dict) and "role" not in replies else \
                {"cluster": replies}
        pool = self.r.connection_pool
        if hasattr(pool, "get_master_address"):  # Sentinel: the master it names now
            host, port = pool.get_master_address()
        else:
            host, port = pool.connection_kwargs.get("host", "redis"), pool.connection_kwargs.get("port", "")
        return {f"{host}:{port}".rstrip(":"): self.r.info() if reply is None else reply}

    def read(self, nodes, now=None):
        """The /redis payload over ``nodes`` (``{node: snapshot}``, for the spiders and the monitor's keys)."""
        now = time.time() if now is None else now
        masters = {name: node_figures(info) for name, info in self.infos().items()}
        used = sum(number(m["used_memory"], 0) for m in masters.values())
        limit = sum(number(m["limit"], 0) for m in masters.values()) or None
        first = next(iter(masters.values()))
        out = {**{f: first[f] for f in INFO_FIELDS}, "used_memory": used, "limit": limit,
               "evicted_keys": sum(number(m["evicted_keys"], 0) for m in masters.values()),
               "connected_clients": sum(number(m["connected_clients"], 0) for m in masters.values()),
               "instantaneous_ops_per_sec": sum(number(m["instantaneous_ops_per_sec"], 0) for m in masters.values()),
               "nodes": masters}
        out["spiders"] = self.spiders(nodes, now, used, limit)
        out["monitor"] = self.footprint(nodes)
        return out

    def spiders(self, nodes, now, used, limit):
        """``{spider: {queue: {key, size, bytes, growth_per_min}, full_in_hours}}`` in one round trip."""
        newest = {}
        for snapshot in nodes.values():
            newest.setdefault(snapshot["spider"], snapshot)
        keys = {(spider, q): key for spider in sorted(newest) for q, key in spider_keys(spider, newest[spider]).items()}
        sizes, size_bytes = self.sizes(list(keys.values()), now)
        out = {}
        with self.lock:
            for (spider, queue), key in keys.items():
                size = sizes.get(key)
                readings = self.readings[(spider, queue)]
                if size is not None and (not readings or now - readings[-1][0] >= GROWTH_STEP):
                    readings.append((now, size))
                growth = growth_per_min([*readings, (now, size)] if size is not None else [], now)
                out.setdefault(spider, {})[queue] = {"key": key, "size": size, "bytes": size_bytes.get(key),
                                                     "growth_per_min": growth}
        for queues in out.values():
            per_min = 0.0
            for q in queues.values():
                if q["growth_per_min"] and q["size"] and q["bytes"]:
                    per_min += q["growth_per_min"] * q["bytes"] / q["size"]
            queues["full_in_hours"] = full_in_hours(used, limit, per_min)
        return out

    def sizes(self, keys, now):
        """``({key: entries}, {key: bytes})`` in two round trips, TYPE then the size command of each key's type
        (not a script: a cluster pipeline asks the server for a script's keys, one round trip each); a key's
        bytes (MEMORY USAGE, sampled) are read again only every BYTES_EVERY seconds."""
        with self.r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.type(key)
            kinds = [as_text(kind) if isinstance(kind, (bytes, str)) else None
                     for kind in pipe.execute(raise_on_error=False)]
        asked = []
        with self.r.pipeline(transaction=False) as pipe:
            for key, kind in zip(keys, kinds):
                if kind in SIZE_COMMANDS:
                    pipe.execute_command(SIZE_COMMANDS[kind], key)
                    asked.append((key, "size"))
                    if now - self.bytes.get(key, (-BYTES_EVERY, None))[0] >= BYTES_EVERY:
                        pipe.execute_command("MEMORY USAGE", key, "SAMPLES", MEMORY_SAMPLES)
                        asked.append((key, "bytes"))
            replies = pipe.execute(raise_on_error=False) if asked else []
        sizes = {key: 0 for key, kind in zip(keys, kinds) if kind == "none"}
        for (key, what), reply in zip(asked, replies):
            if what == "size" and isinstance(reply, int):
                sizes[key] = reply
            elif what == "bytes" and isinstance(reply, int):
                self.bytes[key] = (now, reply)
        for key in [k for k, (at, _) in self.bytes.items() if now - at > GROWTH_KEEP]:
            del self.bytes[key]  # keys no spider reports any more
        return sizes, {key: self.bytes[key][1] for key in keys if key in self.bytes and sizes.get(key)}

    def footprint(self, nodes):
        """The monitor's keys: bytes (the status hash, and history/trend keys sampled then scaled to every node)
        and the sampled keys that should expire and do not (``no_ttl``)."""
        sample = sorted(nodes)[:FOOTPRINT_SAMPLE]
        keys = [status_key(self.prefix)] + [k for n in sample for k in (history_key(self.prefix, n),
                                                                        trend_key(self.prefix, n))]
        with self.r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.execute_command("MEMORY USAGE", key, "SAMPLES", MEMORY_SAMPLES)
                pipe.ttl(key)
            replies = pipe.execute(raise_on_error=False)
        sizes = [r if isinstance(r, int) else 0 for r in replies[0::2]]
        ttls = replies[1::2]
        per_node = sum(sizes[1:]) / len(sample) if sample else 0
        no_ttl = [key for key, ttl in zip(keys[1:], ttls[1:]) if ttl == -1]
        return {"bytes": int(sizes[0] + per_node * len(nodes)), "sampled_keys": len(keys), "no_ttl": no_ttl}
