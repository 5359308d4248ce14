"""Acting writes: a control command, a silence, a change to a spider's queues (seed, flush, requeue) or an audit
entry is stored with its audit entry and its idempotency answer in one Lua script, so a change is never recorded
without its audit or twice. (On a Redis Cluster, a change to a spider's scrapy-redis keys, in other slots than the
monitor's, is made key by key and then recorded: see ``act_apart``.)"""

import hashlib
import logging

from monitor_contract import CONTROL_COMMANDS, as_text, control_key, dumps, loads, notify

logger = logging.getLogger(__name__)

# The control log keeps the newest this many commands; what it holds besides the fleet commands: the changes to a
# spider's queues.
CONTROL_LOG_KEEP = 1000
LOGGED_COMMANDS = CONTROL_COMMANDS + ("seed", "flush", "requeue", "slow")
# The audit log keeps the newest this many entries (never by TTL); an idempotency key's first answer is kept a day.
AUDIT_KEEP = 10000
IDEMPOTENCY_TTL = 86400


def audit_key(prefix, name):
    """The audit log's keys: ``log`` (a LIST of JSON entries, newest first, capped at AUDIT_KEEP) and ``seq``."""
    return f"{prefix}:audit:{name}"


def idempotency_key(prefix, who, key):
    """The first answer to a change sent by ``who`` with ``Idempotency-Key: key``, kept IDEMPOTENCY_TTL."""
    return f"{prefix}:idem:{hashlib.sha256(f'{who}{chr(0)}{key}'.encode()).hexdigest()[:32]}"


def audit_keys(prefix):
    return audit_key(prefix, "log"), audit_key(prefix, "seq")


# Lua shared by the write scripts: every key's type is checked before anything is written (a key of the wrong
# type fails the whole script, naming the key: "WRONGKEY <key> is a <type>, not a <type>"); ids are one above
# the highest stored, so a lost sequence key never makes them go backwards; the audit entry is pushed in the
# same script as the change it records; an idempotency key returns the first answer.
LUA_COMMON = """
local function wrong_key(keys, kinds)
  for i, kind in ipairs(kinds) do
    local t = redis.call('TYPE', keys[i])['ok']
    if t ~= 'none' and t ~= kind then return 'WRONGKEY ' .. keys[i] .. ' is a ' .. t .. ', not a ' .. kind end
  end
  return nil
end
local function stamp()
  local t = redis.call('TIME')
  return string.format('%d.%03d', t[1], math.floor(t[2] / 1000))
end
local function id_of(raw)
  if not raw then return 0 end
  return tonumber(string.match(raw, '^{"id":(%d+),')) or 0
end
local function next_id(seq, log)
  local top = math.max(tonumber(redis.call('GET', seq) or '') or 0, id_of(redis.call('LINDEX', log, 0)))
  redis.call('SET', seq, top + 1)
  return top + 1
end
-- The first answer to a request with this idempotency key ('' for none), or nil.
local function first_answer(key, idem)
  if idem ~= '' then return redis.call('GET', key) end
  return nil
end
-- Keep the answer for repeats of the request with this idempotency key, for ttl seconds.
local function remember(key, idem, ttl, answer)
  if idem ~= '' then redis.call('SET', key, answer, 'EX', tonumber(ttl)) end
end
local function audit(log, seq, entry, keep, at)
  local id = next_id(seq, log)
  redis.call('LPUSH', log, '{"id":' .. id .. ',"at":' .. at .. ',' .. string.sub(entry, 2))
  redis.call('LTRIM', log, 0, keep - 1)
  return id
end
"""
# Issues one command, logs it, counts it and audits it, in one step or not at all, so ids are ordered and unique
# across API processes and the newest id is always the one stored. KEYS: seq, commands, log, audit log, audit
# seq, idempotency. ARGV: target, the entry (a JSON object without id and at), log keep, the audit entry, audit
# keep, idempotency ('' for none), its TTL, the answer (a JSON object without id and at). Replies
# ``{'new' | 'repeat', answer with id and at}``.
ISSUE_LUA = LUA_COMMON + """
local bad = wrong_key(KEYS, {'string', 'hash', 'list', 'list', 'string', 'string'})
if bad then return redis.error_reply(bad) end
local first = first_answer(KEYS[6], ARGV[6])
if first then return {'repeat', first} end
local top = math.max(tonumber(redis.call('GET', KEYS[1]) or '') or 0, id_of(redis.call('LINDEX', KEYS[3], 0)))
for _, raw in ipairs(redis.call('HVALS', KEYS[2])) do top = math.max(top, id_of(raw)) end
local id = top + 1
redis.call('SET', KEYS[1], id)
local at = stamp()
local head = '{"id":' .. id .. ',"at":' .. at .. ','
local entry = head .. string.sub(ARGV[2], 2)
redis.call('HSET', KEYS[2], ARGV[1], entry)
redis.call('LPUSH', KEYS[3], entry)
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
audit(KEYS[4], KEYS[5], '{"ref":' .. id .. ',' .. string.sub(ARGV[4], 2), tonumber(ARGV[5]), at)
local answer = head .. string.sub(ARGV[8], 2)
remember(KEYS[6], ARGV[6], ARGV[7], answer)
return {'new', answer}
"""
# Adds a silence under the cap, audited, in one step (the cap holds whatever the concurrency). KEYS: silences,
# audit log, audit seq, idempotency. ARGV: id, silence JSON, cap, now, audit entry, audit keep, idempotency, TTL,
# answer. Expired silences are dropped when the cap is reached. Replies ``{'new' | 'repeat' | 'full', answer}``.
ADD_SILENCE_LUA = LUA_COMMON + """
local bad = wrong_key(KEYS, {'hash', 'list', 'string', 'string'})
if bad then return redis.error_reply(bad) end
local first = first_answer(KEYS[4], ARGV[7])
if first then return {'repeat', first} end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local ok, s = pcall(cjson.decode, all[i + 1])
    if ok and type(s) == 'table' and type(s['until']) == 'number' and s['until'] <= tonumber(ARGV[4]) then
      redis.call('HDEL', KEYS[1], all[i])
    end
  end
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return {'full', ''} end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
audit(KEYS[2], KEYS[3], '{"ref":"' .. ARGV[1] .. '",' .. string.sub(ARGV[5], 2), tonumber(ARGV[6]), stamp())
remember(KEYS[4], ARGV[7], ARGV[8], ARGV[9])
return {'new', ARGV[9]}
"""
# Deletes a silence, audited. KEYS: silences, audit log, audit seq, idempotency. ARGV: id, audit entry, audit
# keep, idempotency, TTL, answer. Replies ``{'new' | 'repeat' | 'missing', answer}``.
DELETE_SILENCE_LUA = LUA_COMMON + """
local bad = wrong_key(KEYS, {'hash', 'list', 'string', 'string'})
if bad then return redis.error_reply(bad) end
local first = first_answer(KEYS[4], ARGV[4])
if first then return {'repeat', first} end
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return {'missing', ''} end
audit(KEYS[2], KEYS[3], ARGV[2], tonumber(ARGV[3]), stamp())
remember(KEYS[4], ARGV[4], ARGV[5], ARGV[6])
return {'new', ARGV[6]}
"""
# One audit entry on its own (a refusal, a tokens file re-read). KEYS: audit log, audit seq. ARGV: entry, keep.
AUDIT_LUA = LUA_COMMON + """
local bad = wrong_key(KEYS, {'list', 'string'})
if bad then return redis.error_reply(bad) end
return audit(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), stamp())
"""


def issue(r, prefix, command, target, fields, audit, idempotency="", answer=None):
    """Store ``command`` for ``target`` (``node:<id>``, ``spider:<name>`` or ``all``), log it with ``fields``
    (comment, who...), count it and record ``audit`` (a dict), in one script. ``idempotency``: the key of
    ``idempotency_key``, or ''. Returns ``(answer with id and at, repeated)``: ``answer`` (default: the entry)
    as first given for this idempotency key when ``repeated``."""
    entry = {"command": command, "target": target, **fields}
    keys = (control_key(prefix, "seq"), control_key(prefix, "commands"), control_key(prefix, "log"),
            *audit_keys(prefix), idempotency or control_key(prefix, "seq"))
    kind, raw = r.eval(ISSUE_LUA, len(keys), *keys, target, dumps(entry), CONTROL_LOG_KEEP, dumps(audit), AUDIT_KEEP,
                       idempotency, IDEMPOTENCY_TTL, dumps(answer or entry))
    answer, repeated = loads(raw, bounded=False), as_text(kind) == "repeat"
    if not repeated:  # /events streams tell of it: what the command is, not who sent it or why
        notify(r, prefix, "control", dumps({k: answer.get(k) for k in ("id", "command", "target", "at")}))
    return answer, repeated


def audit_fields(who, action, target, comment="", via="", address="", request="", outcome="applied"):
    """An audit entry's fields, every one the audit log has (Redis adds ``id`` and ``at``): ``via`` how the actor
    acted (a token's way in, ``command line``, an alert rule), ``address`` the client's (API requests only)."""
    return {"who": who, "via": via, "from": address, "action": action, "target": target, "outcome": outcome,
            "comment": comment, "request": request}


def issue_command(r, prefix, command, target, **fields):
    """``issue`` audited as done by ``fields["who"]`` (default ``unknown``); returns the stored entry."""
    audit = audit_fields(fields.get("who", "unknown"), f"control.{command}", target, fields.get("comment", ""),
                         fields.get("via", ""), fields.get("from", ""))
    return issue(r, prefix, command, target, fields, audit)[0]


def write_audit(r, prefix, entry):
    """Push one audit entry (``who, from, action, target, outcome, ...``; Redis adds ``id`` and ``at``)."""
    return r.eval(AUDIT_LUA, 2, *audit_keys(prefix), dumps(entry), AUDIT_KEEP)


# ---------------------------------------------------------------------------- acting on the queues

# Lua for a spider's scrapy-redis keys: push entries onto a key of any of scrapy-redis's types, and a key's size.
LUA_KEYS = LUA_COMMON + """
local function push(key, kind, values, first, last)
  local added = 0
  for i = first, last, 1000 do
    local stop = math.min(i + 999, last)
    if kind == 'list' then
      redis.call('RPUSH', key, unpack(values, i, stop))
      added = added + stop - i + 1
    elseif kind == 'set' then added = added + redis.call('SADD', key, unpack(values, i, stop))
    else
      local args = {}
      for j = i, stop do args[#args + 1] = 0; args[#args + 1] = values[j] end
      added = added + redis.call('ZADD', key, unpack(args))
    end
  end
  return added
end
local function size(key)
  local kind = redis.call('TYPE', key).ok
  if kind == 'list' then return redis.call('LLEN', key)
  elseif kind == 'zset' then return redis.call('ZCARD', key)
  elseif kind == 'set' then return redis.call('SCARD', key)
  elseif kind == 'hash' then return redis.call('HLEN', key)
  elseif kind == 'none' then return 0 end
  return 1
end
"""
# Shared by the queue scripts: KEYS 1-5 are the control seq, the control log, the audit log, its seq and the
# idempotency key; ARGV 1-6 the log entry (a JSON object without id and at), log keep, the audit entry, audit keep,
# the idempotency key ('' for none) and its TTL. ``logged`` writes the control log entry (with ``extra``, a text
# ',"name":value...' of what the change did), audits it and keeps the answer ``{"id", "at", ...extra}``. ``claim``
# takes dead letters out of KEYS[6] (``mode`` 'all', or 'ids' with the ids in ARGV from ``first``): ``(their
# start URL entries, each ``{"url", "meta"}`` with ``requeued`` (the dead letter's id) in its meta, how many
# ids were not held, the members taken)``, so each is claimed once whoever races.
LUA_QUEUES = LUA_KEYS + """
local function logged(extra)
  local id = next_id(KEYS[1], KEYS[2])
  local at = stamp()
  local head = '{"id":' .. id .. ',"at":' .. at
  redis.call('LPUSH', KEYS[2], head .. ',' .. string.sub(ARGV[1], 2, -2) .. extra .. '}')
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
  audit(KEYS[3], KEYS[4], '{"ref":' .. id .. ',' .. string.sub(ARGV[3], 2), tonumber(ARGV[4]), at)
  local answer = head .. extra .. '}'
  remember(KEYS[5], ARGV[5], ARGV[6], answer)
  return answer
end
local function claim(mode, first)
  local members, missing = {}, 0
  if mode == 'all' then
    members = redis.call('ZRANGE', KEYS[6], 0, -1)
  else
    for i = first, #ARGV do
      local found = redis.call('ZRANGEBYLEX', KEYS[6], '[' .. ARGV[i] .. ' ', '(' .. ARGV[i] .. '!', 'LIMIT', 0, 1)
      if found[1] then members[#members + 1] = found[1] else missing = missing + 1 end
    end
  end
  local entries = {}
  for _, m in ipairs(members) do
    local space = string.find(m, ' ', 1, true)
    local ok, rec = pcall(cjson.decode, string.sub(m, space + 1))
    if ok and type(rec) == 'table' and type(rec.url) == 'string' then
      local meta = type(rec.meta) == 'table' and rec.meta or {}
      meta.requeued = string.sub(m, 1, space - 1)
      entries[#entries + 1] = cjson.encode({url = rec.url, meta = meta})
    end
    redis.call('ZREM', KEYS[6], m)
  end
  return entries, missing, members
end
local bad = wrong_key(KEYS, {'string', 'list', 'list', 'string', 'string'})
if bad then return redis.error_reply(bad) end
local first = first_answer(KEYS[5], ARGV[5])
if first then return {'repeat', first} end
"""
# Pushes start URL entries. KEYS 6: the start URL key. ARGV 7: its type (list, set, zset), then the entries.
# Replies ``{'new' | 'repeat', answer}``, the answer's ``pushed`` counting the entries added.
SEED_LUA = LUA_QUEUES + """
bad = wrong_key({KEYS[6]}, {ARGV[7]})
if bad then return redis.error_reply(bad) end
return {'new', logged(',"pushed":' .. push(KEYS[6], ARGV[7], ARGV, 8, #ARGV))}
"""
# Deletes keys, saying how many entries each held. KEYS 6...: the keys; ARGV 7...: their names in the answer.
FLUSH_LUA = LUA_QUEUES + """
local parts = {}
for i = 6, #KEYS do
  parts[#parts + 1] = cjson.encode(ARGV[i + 1]) .. ':' .. size(KEYS[i])
  redis.call('UNLINK', KEYS[i])
end
return {'new', logged(',"flushed":{' .. table.concat(parts, ',') .. '}')}
"""
# Moves dead letters back onto the start URLs, each once whoever races: KEYS 6 the dead letters, 7 the start URL
# key; ARGV 7 its type, 8 'all' or 'ids', then the ids. Replies ``{'missing', ''}`` when none of them is held any
# more.
REQUEUE_LUA = LUA_QUEUES + """
bad = wrong_key({KEYS[6], KEYS[7]}, {'zset', ARGV[7]})
if bad then return redis.error_reply(bad) end
local entries, missing, held = claim(ARGV[8], 9)
if #held == 0 then return {'missing', ''} end
if #entries > 0 then push(KEYS[7], ARGV[7], entries, 1, #entries) end
return {'new', logged(',"requeued":' .. #entries .. ',"missing":' .. missing)}
"""

# On a Redis Cluster a spider's scrapy-redis keys sit in other slots than the monitor's (one hash tag), and one
# script cannot touch both: the change is made key by key (PUSH_LUA, UNLINK_LUA; a requeue first claims its dead
# letters, CLAIM_LUA), then logged, audited and its answer kept (LOGGED_LUA, ARGV 7 the ``extra``). The idempotency
# key is checked before the change and again when it is logged; two identical requests racing may both act.
PUSH_LUA = LUA_KEYS + """
local bad = wrong_key(KEYS, {ARGV[1]})
if bad then return redis.error_reply(bad) end
return push(KEYS[1], ARGV[1], ARGV, 2, #ARGV)
"""
UNLINK_LUA = LUA_KEYS + """
local n = size(KEYS[1])
redis.call('UNLINK', KEYS[1])
return n
"""
CLAIM_LUA = LUA_QUEUES + """
bad = wrong_key({KEYS[6]}, {'zset'})
if bad then return redis.error_reply(bad) end
local entries, missing, held = claim(ARGV[7], 8)
if #held == 0 then return {'missing', ''} end
return {'claimed', cjson.encode({entries = entries, members = held, missing = missing})}
"""
LOGGED_LUA = LUA_QUEUES + """
return {'new', logged(ARGV[7])}
"""


def act_on_queues(r, prefix, script, keys, args, entry, audit, idempotency=""):
    """Run one of the queue scripts with the control log and audit keys: ``(answer, repeated)``, or
    ``(None, False)`` when it found nothing to act on. On a Redis Cluster whose slots part the keys, key by key
    (``act_apart``)."""
    every = (control_key(prefix, "seq"), control_key(prefix, "log"), *audit_keys(prefix),
             idempotency or control_key(prefix, "seq"), *keys)
    head = (dumps(entry), CONTROL_LOG_KEEP, dumps(audit), AUDIT_KEEP, idempotency, IDEMPOTENCY_TTL)
    keyslot = getattr(r, "keyslot", None)  # a cluster client's
    if keyslot is not None and len(set(map(keyslot, every))) > 1:
        return act_apart(r, script, every, head, args)
    kind, raw = r.eval(script, len(every), *every, *head, *args)
    return answered(kind, raw)


def answered(kind, raw):
    kind = as_text(kind)
    if kind == "missing":
        return None, False
    return loads(raw, bounded=False), kind == "repeat"


def act_apart(r, script, every, head, args):
    """``act_on_queues`` on a cluster: SEED_LUA, FLUSH_LUA or REQUEUE_LUA's change made key by key, then logged.
    A requeue's claimed dead letters go back if their push fails, so none is lost."""
    monitor, keys = every[:5], every[5:]
    if head[4] and r.get(every[4]) is not None:
        return answered(*r.eval(LOGGED_LUA, 5, *monitor, *head, ""))  # the first answer, as a repeat
    if script == SEED_LUA:
        extra = ',"pushed":%d' % r.eval(PUSH_LUA, 1, keys[0], *args)
    elif script == FLUSH_LUA:
        extra = ',"flushed":{%s}' % ",".join(f"{dumps(name)}:{r.eval(UNLINK_LUA, 1, key)}"
                                              for key, name in zip(keys, args))
    elif script == REQUEUE_LUA:
        kind, raw = r.eval(CLAIM_LUA, 6, *monitor, keys[0], *head, *args[1:])
        if as_text(kind) != "claimed":
            return answered(kind, raw)
        claimed = loads(raw, bounded=False)
        entries = claimed["entries"] if isinstance(claimed["entries"], list) else []  # cjson: {} for an empty list
        try:
            if entries:
                r.eval(PUSH_LUA, 1, keys[1], args[0], *entries)
        except BaseException:
            try:
                r.zadd(keys[0], dict.fromkeys(claimed["members"], 0))
            except Exception:
                logger.error("%d dead letter(s) claimed for a requeue could not be pushed nor given back",
                             len(claimed["members"]))
            raise
        extra = ',"requeued":%d,"missing":%d' % (len(entries), claimed["missing"])
    else:
        raise ValueError("a script that cannot be split across cluster slots")
    return answered(*r.eval(LOGGED_LUA, 5, *monitor, *head, extra))


# Sets (or with '' lifts) one domain's cluster-wide delay: KEYS 6 the slow hash; ARGV 7 the domain, 8 its JSON, 9 the
# delay as JSON (or null) for the log entry.
SLOW_LUA = LUA_QUEUES + """
bad = wrong_key({KEYS[6]}, {'hash'})
if bad then return redis.error_reply(bad) end
if ARGV[8] == '' then redis.call('HDEL', KEYS[6], ARGV[7]) else redis.call('HSET', KEYS[6], ARGV[7], ARGV[8]) end
return {'new', logged(',"delay":' .. ARGV[9])}
"""
