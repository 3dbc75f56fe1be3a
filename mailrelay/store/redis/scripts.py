"""
The Lua scripts of the Redis store: each runs atomically on the server (nothing else runs
in between), which makes a check and the write that depends on it one step -- "add this
sender unless the account is missing or has it already" -- without a WATCH round trip.

Every script first checks what could make it refuse and only then writes, so a refusal
leaves nothing behind. Results are small integers (``1`` done, ``0`` not found, ``-1``
exists already) or arrays; the store turns them into values and exceptions.

Some scripts build key names from prefixes passed in ARGV (see :mod:`.keys`); they are for a
single Redis server (with replicas), not Redis Cluster.
"""

from __future__ import annotations

DONE = 1
MISSING = 0
EXISTS = -1

# A helper prepended to scripts that push or set many values: Lua's unpack() is limited to a
# few thousand values, so large argument lists go in slices.
_IN_SLICES = """
local function inSlices(command, key, values, first, last)
  for i = first, last, 1000 do
    redis.call(command, key, unpack(values, i, math.min(i + 999, last)))
  end
end
"""

ADD_ACCOUNT = """
-- KEYS: account:<name>, accounts; ARGV: name, field, value, ...
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

UPDATE_ACCOUNT = """
-- KEYS: account:<name>; ARGV: field, value, ... (every field: absent ones become None)
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

LIST_ACCOUNTS = """
-- KEYS: accounts; ARGV: the account:<name> prefix. Returns name, fields, name, fields, ...
local result = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  result[#result + 1] = name
  result[#result + 1] = redis.call('HGETALL', ARGV[1] .. name)
end
return result
"""

ADD_API_KEY = """
-- KEYS: account:<name>, apikey:<sha256>, apikey-id:<keyId>, apikeys:<name>, apikey-sequence
-- ARGV: keyId, account name, created (ms), sha256
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
redis.call('HSET', KEYS[2], 'key_id', ARGV[1], 'account', ARGV[2], 'created', ARGV[3],
           'revoked', '0')
redis.call('SET', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[5]), ARGV[4])
return 1
"""

LIST_API_KEYS = """
-- KEYS: apikeys:<name>; ARGV: the apikey:<sha256> prefix.
-- Returns key id, account, created, ... of the active keys in insertion order.
local result = {}
for _, sha in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = redis.call('HMGET', ARGV[1] .. sha, 'key_id', 'account', 'created', 'revoked')
  if key[1] and key[4] == '0' then
    result[#result + 1] = key[1]
    result[#result + 1] = key[2]
    result[#result + 1] = key[3]
  end
end
return result
"""

REVOKE_API_KEY = """
-- KEYS: apikey-id:<keyId>, apikeys:<name>; ARGV: account name, the apikey:<sha256> prefix
local sha = redis.call('GET', KEYS[1])
if not sha then return 0 end
local key = ARGV[2] .. sha
local found = redis.call('HMGET', key, 'account', 'revoked')
if found[1] ~= ARGV[1] or found[2] ~= '0' then return 0 end
redis.call('HSET', key, 'revoked', '1')
redis.call('ZREM', KEYS[2], sha)
return 1
"""

ADD_SENDER = """
-- KEYS: account:<name>, senders:<name>; ARGV: value, kind
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return -1 end
return 1
"""

ENQUEUE = """
-- KEYS: notification:<id>, body:<id>, queue, accepted:<account>, received
--       [, bulk:<account>:<bulkId>]
-- ARGV: id, received (ms), body, field, value, ... (the hash; its recipients and received
--       time imply the CAAS_RECEIVED events, so none are pushed to events:<id>)
-- Every key is declared, so a server that may not write one of them (ACL) refuses the
-- script before it starts: all of it or nothing.
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local id, received = ARGV[1], ARGV[2]
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('SET', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], received, id)
redis.call('ZADD', KEYS[4], received, id)
redis.call('ZADD', KEYS[5], received, id)
if KEYS[6] then redis.call('ZADD', KEYS[6], received, id) end
return 1
"""

STATUS_TRAIL = """
-- KEYS: notification:<id>, events:<id>; ARGV: the hash fields to read
-- Returns {the fields' values (nil where absent), the event entries}, read at one moment.
return {redis.call('HMGET', KEYS[1], unpack(ARGV)), redis.call('LRANGE', KEYS[2], 0, -1)}
"""

ADD_EVENTS = (
    _IN_SLICES
    + """
-- KEYS: notification:<id>, events:<id>, notification:<id2>, events:<id2>, ...
-- ARGV: count of events for <id>, the events as JSON, count for <id2>, its events, ...
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 0 then return 0 end
end
local at = 1
for i = 1, #KEYS, 2 do
  local count = tonumber(ARGV[at])
  inSlices('RPUSH', KEYS[i + 1], ARGV, at + 1, at + count)
  at = at + count + 1
end
return 1
"""
)

STATS = """
-- KEYS: queue:queued, queue:deferred, queue:in_flight
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3])}
"""

CLAIM = """
-- KEYS: queue:queued, queue:deferred, queue:in_flight
-- ARGV: now (ms), limit, lease end (ms), the notification:<id> prefix, the body:<id> prefix
-- Takes the due entries, oldest due first (ties: smaller id first), into in_flight until the
-- lease ends. Returns {id, attempts, notification fields, body} per entry.
local limit = tonumber(ARGV[2])
local due = {}
for source = 1, 3 do
  local found = redis.call('ZRANGEBYSCORE', KEYS[source], '-inf', ARGV[1], 'WITHSCORES',
                           'LIMIT', 0, limit)
  for i = 1, #found, 2 do
    due[#due + 1] = {tonumber(found[i + 1]), found[i], source}
  end
end
-- ids are decimal integers too long for Lua's doubles: compare them as digit strings
table.sort(due, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  if #a[2] ~= #b[2] then return #a[2] < #b[2] end
  return a[2] < b[2]
end)
local claimed = {}
for k = 1, math.min(limit, #due) do
  local id, source = due[k][2], due[k][3]
  redis.call('ZREM', KEYS[source], id)
  redis.call('ZADD', KEYS[3], ARGV[3], id)
  local key = ARGV[4] .. id
  local attempts = redis.call('HINCRBY', key, 'attempts', 1)
  claimed[k] = {id, attempts, redis.call('HGETALL', key), redis.call('GET', ARGV[5] .. id)}
end
return claimed
"""

DEFER = """
-- KEYS: queue:queued, queue:deferred, queue:in_flight; ARGV: id, next attempt (ms)
local removed = 0
for i = 1, 3 do removed = removed + redis.call('ZREM', KEYS[i], ARGV[1]) end
if removed == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

COMPLETE = """
-- KEYS: queue:queued, queue:deferred, queue:in_flight, body:<id>; ARGV: id
local removed = 0
for i = 1, 3 do removed = removed + redis.call('ZREM', KEYS[i], ARGV[1]) end
if removed == 0 then return 0 end
redis.call('DEL', KEYS[4])
return 1
"""

EXPIRE = """
-- KEYS: received, queue:queued, queue:deferred, queue:in_flight
-- ARGV: before (ms, exclusive), offset, count, and the prefixes of notification:<id>,
--       body:<id>, events:<id>, accepted:<account>, bulk:...
-- Looks at ``count`` ids received before ``before`` from ``offset`` on, and deletes those no
-- longer queued with everything kept about them. Returns {deleted, looked at}; the ones
-- kept stay where they were, so the next batch starts at offset + kept.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1],
                       'LIMIT', ARGV[2], ARGV[3])
local deleted = 0
for _, id in ipairs(ids) do
  local queued = false
  for i = 2, 4 do
    if redis.call('ZSCORE', KEYS[i], id) then
      queued = true
      break
    end
  end
  if not queued then
    local key = ARGV[4] .. id
    local found = redis.call('HMGET', key, 'account', 'bulk_id')
    local account, bulk = found[1], found[2]
    if account then
      redis.call('ZREM', ARGV[7] .. account, id)
      if bulk then
        redis.call('ZREM', ARGV[8] .. #account .. ':' .. account .. ':' .. bulk, id)
      end
    end
    redis.call('DEL', key, ARGV[5] .. id, ARGV[6] .. id)
    redis.call('ZREM', KEYS[1], id)
    deleted = deleted + 1
  end
end
return {deleted, #ids}
"""

RENEW_LEASE = """
-- KEYS: instance-lease:<n>; ARGV: token, seconds. 1 if still ours (and renewed), else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

RELEASE_LEASE = """
-- KEYS: instance-lease:<n>; ARGV: token. Deletes the lease only if it is still ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
