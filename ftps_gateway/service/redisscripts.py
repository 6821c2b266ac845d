"""The Lua scripts ``cluster.RedisState`` runs in Redis: each decision atomic, one call.

Why scripts: a login slot needs three counts checked and three taken at once, a quota
reservation every scope of a path or none; a script runs alone in Redis (no other
command interleaves), so two nodes can never both take the last slot, and it costs
one round trip where ``WATCH``/``MULTI`` would cost three and retry under contention.

Keys, all under the configured prefix ``P``:

- ``P nodes``: sorted set, node name -> the end of its lease (ms, Redis' clock);
- ``P owner:<node>``: the node's random token, expiring with the lease: a second
  process with the same ``server.node_name`` is refused, and a node whose lease
  ran out finds out (``lost``) and writes its holdings back;
- ``P held:<node>``: hash of what the node holds: ``t`` (sessions), ``a|<key>``,
  ``u|<user>``, ``b|<scope>`` and ``f|<scope>`` (reserved bytes and files). Counts
  are sums over the *live* nodes' hashes, so a dead node's holdings stop counting
  the moment its lease ends, with nobody having to clean up first (the heartbeats
  of the others delete them afterwards);
- ``P committed:<scope>``: hash ``b``, ``f``: what uploads ever committed there
  (changed only by commits, negative bytes when a smaller file replaced a larger
  one; a quota mark is a reading of it);
- ``P fail:<key>``: list of failure times within the defender's window;
- ``P offence:<key>``: hash ``n`` (offences), ``until`` (ms); it expires
  ``max_ban_seconds`` after the ban ends, which is the defender's "an address that
  behaved that long starts over";
- ``P bans``: sorted set, address key -> end of its ban (ms), for ``ban list``;
- ``P bans:version``: incremented by every ban change; channel ``P bans`` carries
  each change (JSON) to every node's replica.

Time is Redis' (``TIME``): one clock for every node, so no node's skew moves a ban
or a lease. Redis 7 replicates scripts by their effects, so ``TIME`` in a script that
writes is safe. Scripts touch keys they do not declare: fine on one Redis server
(with replicas or Sentinel), not on Redis Cluster, which the docs say.
"""

from __future__ import annotations

from typing import Final

# Every script starts with ARGV[1] = prefix, ARGV[2] = node, ARGV[3] = token.
_COMMON: Final = """
local P, node, token = ARGV[1], ARGV[2], ARGV[3]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function owned()
  return redis.call('GET', P .. 'owner:' .. node) == token
end
local function live(now)
  return redis.call('ZRANGEBYSCORE', P .. 'nodes', now, '+inf')
end
local function sums(nodes, fields)
  local totals = {}
  for i = 1, #fields do totals[i] = 0 end
  for _, n in ipairs(nodes) do
    local values = redis.call('HMGET', P .. 'held:' .. n, unpack(fields))
    for i = 1, #fields do totals[i] = totals[i] + (tonumber(values[i]) or 0) end
  end
  return totals
end
"""

# ARGV[4] lease ms, then field, value pairs: take (or keep) the node's lease and
# write its holdings whole. 'taken': another live process owns this node name.
CLAIM: Final = (
    _COMMON
    + """
local owner = redis.call('GET', P .. 'owner:' .. node)
if owner and owner ~= token then return 'taken' end
local now = now_ms()
local lease = tonumber(ARGV[4])
redis.call('SET', P .. 'owner:' .. node, token, 'PX', lease)
redis.call('ZADD', P .. 'nodes', now + lease, node)
local held = P .. 'held:' .. node
redis.call('DEL', held)
local i = 5
while i <= #ARGV do
  local last = math.min(i + 199, #ARGV)
  redis.call('HSET', held, unpack(ARGV, i, last))
  i = last + 1
end
return 'ok'
"""
)

# ARGV[4] lease ms: renew the lease, forget dead nodes' holdings and ended bans.
# Returns {state, bans version}; state 'ok', 'lost' (write holdings back) or 'taken'.
HEARTBEAT: Final = (
    _COMMON
    + """
local owner = redis.call('GET', P .. 'owner:' .. node)
local version = redis.call('GET', P .. 'bans:version') or '0'
if owner ~= token then
  if owner then return {'taken', version} end
  return {'lost', version}
end
local now = now_ms()
local lease = tonumber(ARGV[4])
redis.call('PEXPIRE', P .. 'owner:' .. node, lease)
redis.call('ZADD', P .. 'nodes', now + lease, node)
for _, n in ipairs(redis.call('ZRANGEBYSCORE', P .. 'nodes', '-inf', '(' .. now)) do
  redis.call('DEL', P .. 'held:' .. n)
  redis.call('ZREM', P .. 'nodes', n)
end
redis.call('ZREMRANGEBYSCORE', P .. 'bans', '-inf', now)
return {'ok', version}
"""
)

# ARGV[4..8] address key, user, max total, max per address, max per user.
# 'ok', a LIMIT_* reason, or 'lost'.
LOGIN: Final = (
    _COMMON
    + """
if not owned() then return 'lost' end
local a, u = 'a|' .. ARGV[4], 'u|' .. ARGV[5]
local s = sums(live(now_ms()), {'t', a, u})
if s[1] >= tonumber(ARGV[6]) then return 'limit-total' end
if s[2] >= tonumber(ARGV[7]) then return 'limit-per-ip' end
if s[3] >= tonumber(ARGV[8]) then return 'limit-per-user' end
local held = P .. 'held:' .. node
redis.call('HINCRBY', held, 't', 1)
redis.call('HINCRBY', held, a, 1)
redis.call('HINCRBY', held, u, 1)
return 'ok'
"""
)

# ARGV[4] = n, then n (field, delta) pairs for the node's holdings (logouts,
# releases), then (scope, bytes, files) triples committed by uploads. Commits always
# count; holdings only while the lease is ours ('lost' otherwise: they are written
# back whole).
DELTAS: Final = (
    _COMMON
    + """
local held = P .. 'held:' .. node
local ok = owned()
local i = 5
for _ = 1, tonumber(ARGV[4]) do
  if ok then
    if redis.call('HINCRBY', held, ARGV[i], ARGV[i + 1]) <= 0 then
      redis.call('HDEL', held, ARGV[i])
    end
  end
  i = i + 2
end
while i <= #ARGV do
  local key = P .. 'committed:' .. ARGV[i]
  redis.call('HINCRBY', key, 'b', ARGV[i + 1])
  redis.call('HINCRBY', key, 'f', ARGV[i + 2])
  i = i + 3
end
if ok then return 'ok' end
return 'lost'
"""
)

# ARGV[4..]: scopes. Returns {bytes, files} committed, per scope in order.
MARKS: Final = (
    _COMMON
    + """
local out = {}
for i = 4, #ARGV do
  local v = redis.call('HMGET', P .. 'committed:' .. ARGV[i], 'b', 'f')
  out[#out + 1] = tonumber(v[1]) or 0
  out[#out + 1] = tonumber(v[2]) or 0
end
return out
"""
)

# ARGV[4] = n claims, then 9 values each: scope, max bytes (-1: none), max files
# (-1), walked bytes, walked files, mark bytes, mark files, bytes asked, files asked.
# A grant needs walked + committed since the mark + reserved by every live node +
# asked <= limit, for bytes and for files, for every scope, or none: exactly
# session.state.LocalState's sum (a scope already over its limit refuses even a
# claim that asks nothing more of it).
# {'ok'}, {'full', scope} or {'lost'}.
RESERVE: Final = (
    _COMMON
    + """
if not owned() then return {'lost'} end
local nodes = live(now_ms())
local count = tonumber(ARGV[4])
for c = 0, count - 1 do
  local i = 5 + c * 9
  local scope = ARGV[i]
  local max_b, max_f = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local ask_b, ask_f = tonumber(ARGV[i + 7]), tonumber(ARGV[i + 8])
  local done = redis.call('HMGET', P .. 'committed:' .. scope, 'b', 'f')
  local held = sums(nodes, {'b|' .. scope, 'f|' .. scope})
  local since_b = (tonumber(done[1]) or 0) - tonumber(ARGV[i + 5])
  local since_f = (tonumber(done[2]) or 0) - tonumber(ARGV[i + 6])
  if max_b >= 0 and tonumber(ARGV[i + 3]) + since_b + held[1] + ask_b > max_b then
    return {'full', scope}
  end
  if max_f >= 0 and tonumber(ARGV[i + 4]) + since_f + held[2] + ask_f > max_f then
    return {'full', scope}
  end
end
local mine = P .. 'held:' .. node
for c = 0, count - 1 do
  local i = 5 + c * 9
  if tonumber(ARGV[i + 7]) ~= 0 then
    redis.call('HINCRBY', mine, 'b|' .. ARGV[i], ARGV[i + 7])
  end
  if tonumber(ARGV[i + 8]) ~= 0 then
    redis.call('HINCRBY', mine, 'f|' .. ARGV[i], ARGV[i + 8])
  end
end
return {'ok'}
"""
)

_PUBLISH_BAN: Final = """
local function publish_ban(addr, until_ms, now, offences)
  local version = redis.call('INCR', P .. 'bans:version')
  redis.call('ZADD', P .. 'bans', until_ms, addr)
  redis.call('PUBLISH', P .. 'bans', cjson.encode(
    {op = 'ban', ip = addr, ['until'] = until_ms, now = now, n = offences,
     v = version}))
  return version
end
"""

# ARGV[4..8] address key, max failures, window ms, first ban ms, max ban ms.
# {0}: no ban; {1, until, now, offences, version}: this failure earned a ban.
FAILURE: Final = (
    _COMMON
    + _PUBLISH_BAN
    + """
local addr = ARGV[4]
local now = now_ms()
local off_key = P .. 'offence:' .. addr
local off = redis.call('HMGET', off_key, 'n', 'until')
local offences = tonumber(off[1]) or 0
if (tonumber(off[2]) or 0) > now then return {0} end
local fails = P .. 'fail:' .. addr
local window = tonumber(ARGV[6])
redis.call('RPUSH', fails, now)
while true do
  local first = redis.call('LINDEX', fails, 0)
  if not first or tonumber(first) > now - window then break end
  redis.call('LPOP', fails)
end
if redis.call('LLEN', fails) < tonumber(ARGV[5]) then
  redis.call('PEXPIRE', fails, window)
  return {0}
end
redis.call('DEL', fails)
offences = offences + 1
local max_ban = tonumber(ARGV[8])
local length = math.floor(math.min(tonumber(ARGV[7]) * 2 ^ (offences - 1), max_ban))
local until_ms = now + length
redis.call('HSET', off_key, 'n', offences, 'until', until_ms)
redis.call('PEXPIRE', off_key, length + max_ban)
local version = publish_ban(addr, until_ms, now, offences)
return {1, until_ms, now, offences, version}
"""
)

# ARGV[4..7] address key, remaining ms, offences, max ban ms: a ban a node decided
# alone (Redis was unreachable) joins the cluster's, never shortening one.
PUSH_BAN: Final = (
    _COMMON
    + _PUBLISH_BAN
    + """
local addr = ARGV[4]
local now = now_ms()
local off_key = P .. 'offence:' .. addr
local off = redis.call('HMGET', off_key, 'n', 'until')
local until_ms = math.max(tonumber(off[2]) or 0, now + tonumber(ARGV[5]))
local offences = math.max(tonumber(off[1]) or 0, tonumber(ARGV[6]))
redis.call('HSET', off_key, 'n', offences, 'until', until_ms)
redis.call('PEXPIRE', off_key, until_ms - now + tonumber(ARGV[7]))
publish_ban(addr, until_ms, now, offences)
return 1
"""
)

# ARGV[4] address key: lift its ban and forget its record.
# {1 if it was banned else 0, version}.
UNBAN: Final = (
    _COMMON
    + """
local addr = ARGV[4]
local now = now_ms()
local score = tonumber(redis.call('ZSCORE', P .. 'bans', addr) or '0')
redis.call('DEL', P .. 'offence:' .. addr, P .. 'fail:' .. addr)
redis.call('ZREM', P .. 'bans', addr)
local version = redis.call('INCR', P .. 'bans:version')
redis.call('PUBLISH', P .. 'bans', cjson.encode({op = 'unban', ip = addr, v = version}))
if score > now then return {1, version} end
return {0, version}
"""
)

# {now, version, address, until, offences, ...}: the bans in force.
BANS: Final = (
    _COMMON
    + """
local now = now_ms()
local out = {now, redis.call('GET', P .. 'bans:version') or '0'}
local items = redis.call('ZRANGEBYSCORE', P .. 'bans', '(' .. now, '+inf', 'WITHSCORES')
for i = 1, #items, 2 do
  out[#out + 1] = items[i]
  out[#out + 1] = items[i + 1]
  out[#out + 1] = redis.call('HGET', P .. 'offence:' .. items[i], 'n') or '1'
end
return out
"""
)

# Sums of every held field over the live nodes: {field, value, ...} (admin status).
TOTALS: Final = (
    _COMMON
    + """
local totals, order = {}, {}
for _, n in ipairs(live(now_ms())) do
  local fields = redis.call('HGETALL', P .. 'held:' .. n)
  for i = 1, #fields, 2 do
    if totals[fields[i]] == nil then
      totals[fields[i]] = 0
      order[#order + 1] = fields[i]
    end
    totals[fields[i]] = totals[fields[i]] + tonumber(fields[i + 1])
  end
end
local out = {}
for _, field in ipairs(order) do
  out[#out + 1] = field
  out[#out + 1] = totals[field]
end
return out
"""
)

# A clean stop: give back everything at once (no wait for the lease to end).
LEAVE: Final = (
    _COMMON
    + """
if not owned() then return 0 end
redis.call('DEL', P .. 'held:' .. node, P .. 'owner:' .. node)
redis.call('ZREM', P .. 'nodes', node)
return 1
"""
)

ALL: Final = {
    "claim": CLAIM,
    "heartbeat": HEARTBEAT,
    "login": LOGIN,
    "deltas": DELTAS,
    "marks": MARKS,
    "reserve": RESERVE,
    "failure": FAILURE,
    "push_ban": PUSH_BAN,
    "unban": UNBAN,
    "bans": BANS,
    "totals": TOTALS,
    "leave": LEAVE,
}
