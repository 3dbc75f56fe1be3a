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
TOO_LATE = -3
"""What ENQUEUE answers when it ran after the deadline it was given: nothing was written."""

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
-- ARGV: id, received (ms), body, deadline (ms, the server's clock), field, value, ... (the
--       hash; its recipients and received time imply the CAAS_RECEIVED events, so none are
--       pushed to events:<id>)
-- Every key is declared, so a server that may not write one of them (ACL) refuses the
-- script before it starts: all of it or nothing.
-- Fenced: past the deadline the relay has told its client 451 (or is about to), so a script
-- that runs only then (a server paused, a command queued while reconnecting) writes nothing
-- and the client's retry is the only copy.
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
if tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) > tonumber(ARGV[4]) then
  return -3
end
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local id, received = ARGV[1], ARGV[2]
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('SET', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], received, id)
redis.call('ZADD', KEYS[4], received, id)
redis.call('ZADD', KEYS[5], received, id)
if KEYS[6] then redis.call('ZADD', KEYS[6], received, id) end
return 1
"""

ENQUEUE_CHARGED = (
    """
-- KEYS: account:<name>, then those of ENQUEUE; ARGV: credits, then those of ENQUEUE.
-- ENQUEUE, and the account's sms_credits taken in the same script if it stored the
-- notification; -4 (nothing written) if the account has fewer. No sms_credits field: no
-- prepaid limit, nothing taken.
local account = table.remove(KEYS, 1)
local credits = tonumber(table.remove(ARGV, 1))
local have = redis.call('HGET', account, 'sms_credits')
if have and tonumber(have) < credits then return -4 end
local function enqueue()
"""
    + ENQUEUE
    + """
end
local done = enqueue()
if done == 1 and have then redis.call('HINCRBY', account, 'sms_credits', -credits) end
return done
"""
)

NO_CREDITS = -4

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
-- KEYS: queue:queued, queue:deferred, queue:in_flight, queue:held
local counts = {}
for i = 1, #KEYS do counts[i] = redis.call('ZCARD', KEYS[i]) end
return counts
"""

LEASE_LOST = -2
"""What a delivery-queue script answers when the lease it was given is not current."""

# Helpers of the delivery-queue scripts. Each script computes everything first and only then
# writes: Redis does not undo what a script wrote before it failed.
_QUEUE_HELPERS = """
-- Whether notification:<id> is in flight under ``lease`` (its current one).
local function leased(notification, inFlight, id, lease)
  return redis.call('ZSCORE', inFlight, id) and redis.call('HGET', notification, 'lease') == lease
end

-- The notification's recipients (a list of {address, channel}) and the positions (from 0)
-- of those still pending: its ``pending`` field, or all of them when there is none.
local function pendingOf(notification)
  local recipients = cjson.decode(redis.call('HGET', notification, 'recipients'))
  local stored = redis.call('HGET', notification, 'pending')
  local pending = {}
  if stored then
    pending = cjson.decode(stored)
  else
    for i = 1, #recipients do pending[i] = i - 1 end
  end
  return recipients, pending
end

-- Notification ids are decimal integers too long for Lua's doubles: entries {score, id, ...}
-- sort by score, then by id compared as digit strings.
local function older(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  if #a[2] ~= #b[2] then return #a[2] < #b[2] end
  return a[2] < b[2]
end
"""

_REPORT_HELPERS = """
-- Put ``count`` reports of one notification in the outbox, due at ``now``, and their ids in
-- ``index`` (its reports-of:<id>): KEYS[keyAt...] are their report:<id> keys, ARGV[argAt...]
-- pairs of id and report JSON.
local function addReports(due, index, keyAt, argAt, count, now)
  for j = 0, count - 1 do
    redis.call('HSET', KEYS[keyAt + j], 'data', ARGV[argAt + 2 * j + 1], 'attempts', 0)
    redis.call('ZADD', due, now, ARGV[argAt + 2 * j])
    redis.call('SADD', index, ARGV[argAt + 2 * j])
  end
end
"""

ADD_EVENTS_WITH_REPORTS = (
    _IN_SLICES
    + _REPORT_HELPERS
    + """
-- KEYS: notification:<id>, events:<id>, reports-due, reports-of:<id>, then report:<reportId>
--       of each report
-- ARGV: event count n, n events (JSON), report count m, now (ms), m pairs id, report (JSON)
-- Returns 1, or 0 if the notification does not exist (nothing written).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local count = tonumber(ARGV[1])
inSlices('RPUSH', KEYS[2], ARGV, 2, 1 + count)
addReports(KEYS[3], KEYS[4], 5, 4 + count, tonumber(ARGV[2 + count]), ARGV[3 + count])
return 1
"""
)

CLAIM_REPORTS = """
-- KEYS: reports-due; ARGV: now (ms), limit, lease end (ms), lease token, report:<id> prefix
-- Returns {{id, data, attempts}, ...}: due reports, now held under the lease until its end.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local claimed = {}
for _, id in ipairs(due) do
  local key = ARGV[5] .. id
  local data = redis.call('HGET', key, 'data')
  if data then
    redis.call('HSET', key, 'lease', ARGV[4])
    redis.call('ZADD', KEYS[1], ARGV[3], id)
    claimed[#claimed + 1] = {id, data, redis.call('HGET', key, 'attempts') or '0'}
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return claimed
"""

RECORD_REPORT_ATTEMPT = """
-- KEYS: report:<id>, reports-due, report-attempts:<notification>, reports-of:<notification>
-- ARGV: id, lease, attempt JSON ('' for none), next attempt (ms, '' to drop; with no attempt:
--       '' is due at once), now (ms)
-- Returns 1, or 0 if the lease is not current (nothing written).
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[2] then return 0 end
if ARGV[3] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[3]) end
if ARGV[4] == '' and ARGV[3] ~= '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('SREM', KEYS[4], ARGV[1])
  return 1
end
redis.call('HDEL', KEYS[1], 'lease')
if ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
local at = ARGV[4]
if at == '' then at = ARGV[5] end
redis.call('ZADD', KEYS[2], at, ARGV[1])
return 1
"""

SHARED_KEY = """
-- KEYS: shared-key:<name>; ARGV: candidate. Returns the stored key, storing the candidate first
-- if there is none.
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""

CLAIM_DUE = (
    _QUEUE_HELPERS
    + """
-- KEYS: queue:queued, queue:deferred, queue:in_flight, queue:held
-- ARGV: now (ms), limit, lease end (ms), the notification:<id> prefix, the body:<id> prefix,
--       then ``limit`` fresh lease tokens
-- Claims up to ``limit`` due entries, chosen as mailrelay.store.common.fairShare chooses:
-- at least half of ``limit`` each of never-tried (queued) ones and retries (deferred, and
-- in_flight whose lease has run out) while they last, the rest the oldest of both. Each goes
-- to in_flight until the lease ends, under a token of its own, one attempt more. A lapsed
-- entry an operator held goes to queue:held instead; an entry without a body stays where it
-- is. Returns {{id, attempts, notification fields, body, token}, ...}, {ids without body}.
local now, limit = ARGV[1], tonumber(ARGV[2])
local function due(key, source)
  local found = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  local entries = {}
  for i = 1, #found, 2 do
    entries[#entries + 1] = {tonumber(found[i + 1]), found[i], source}
  end
  return entries
end
local fresh, retries = due(KEYS[1], 1), due(KEYS[2], 2)
for _, entry in ipairs(due(KEYS[3], 3)) do retries[#retries + 1] = entry end
table.sort(retries, older)
local half = math.floor(limit / 2)
local chosen, rest = {}, {}
for i, entry in ipairs(fresh) do
  if i <= half then chosen[#chosen + 1] = entry else rest[#rest + 1] = entry end
end
for i, entry in ipairs(retries) do
  if i <= half then chosen[#chosen + 1] = entry else rest[#rest + 1] = entry end
end
table.sort(rest, older)
local left = limit - #chosen
for i = 1, math.min(#rest, left) do chosen[#chosen + 1] = rest[i] end
table.sort(chosen, older)
local claimed, unreadable = {}, {}
for k, entry in ipairs(chosen) do
  local id, source = entry[2], entry[3]
  local key = ARGV[4] .. id
  if source == 3 and redis.call('HGET', key, 'hold') == '1' then
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZADD', KEYS[4], entry[1], id)
    redis.call('HDEL', key, 'lease', 'hold')
  else
    local body = redis.call('GET', ARGV[5] .. id)
    if body then
      local token = ARGV[5 + k]
      redis.call('ZREM', KEYS[source], id)
      redis.call('ZADD', KEYS[3], ARGV[3], id)
      local attempts = redis.call('HINCRBY', key, 'attempts', 1)
      redis.call('HSET', key, 'lease', token)
      claimed[#claimed + 1] = {id, attempts, redis.call('HGETALL', key), body, token}
    else
      unreadable[#unreadable + 1] = id
    end
  end
end
return {claimed, unreadable}
"""
)

RENEW_CLAIM = (
    _QUEUE_HELPERS
    + """
-- KEYS: notification:<id>, queue:in_flight; ARGV: id, lease, new lease end (ms)
-- Returns 1, or -2 if the lease is not current.
if not leased(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return -2 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""
)

RECORD_OUTCOME = (
    _IN_SLICES
    + _QUEUE_HELPERS
    + _REPORT_HELPERS
    + """
-- KEYS: notification:<id>, events:<id>, queue:deferred, queue:in_flight, queue:held, body:<id>,
--       reports-due, reports-of:<id>, then report:<reportId> of each report
-- ARGV: id, lease, next attempt (ms, or '' for none), event count n, n events (JSON), report
--       count m, now (ms), m pairs report id, report (JSON), then the channel and address of
--       each recipient finished
-- Returns 1 (still queued), 2 (nothing pending: out of the queue, body dropped), or -2 if
-- the lease is not current (nothing written).
local id, key = ARGV[1], KEYS[1]
if not leased(key, KEYS[4], id, ARGV[2]) then return -2 end
local count = tonumber(ARGV[4])
local reports = tonumber(ARGV[5 + count])
local finished = {}
for i = 7 + count + 2 * reports, #ARGV, 2 do finished[ARGV[i] .. ':' .. ARGV[i + 1]] = true end
local recipients, pending = pendingOf(key)
local left = {}
for _, position in ipairs(pending) do
  local recipient = recipients[position + 1]
  if not finished[recipient[2] .. ':' .. recipient[1]] then left[#left + 1] = position end
end
inSlices('RPUSH', KEYS[2], ARGV, 5, 4 + count)
addReports(KEYS[7], KEYS[8], 9, 7 + count, reports, ARGV[6 + count])
if #left == 0 then
  redis.call('ZREM', KEYS[4], id)
  redis.call('DEL', KEYS[6])
  redis.call('HDEL', key, 'lease', 'hold', 'pending')
  return 2
end
redis.call('HSET', key, 'pending', '[' .. table.concat(left, ',') .. ']')
if ARGV[3] ~= '' then
  local target = KEYS[3]
  if redis.call('HGET', key, 'hold') == '1' then target = KEYS[5] end
  redis.call('ZREM', KEYS[4], id)
  redis.call('ZADD', target, ARGV[3], id)
  redis.call('HDEL', key, 'lease', 'hold')
end
return 1
"""
)

RELEASE_CLAIM = (
    _QUEUE_HELPERS
    + """
-- KEYS: notification:<id>, queue:queued, queue:deferred, queue:in_flight, queue:held
-- ARGV: id, lease, now (ms)
-- Gives the claim back: due at once (held, if an operator held it meanwhile), the attempt it
-- counted taken back. Returns 1, or -2 if the lease is not current.
local id, key = ARGV[1], KEYS[1]
if not leased(key, KEYS[4], id, ARGV[2]) then return -2 end
local attempts = math.max(tonumber(redis.call('HGET', key, 'attempts') or '1') - 1, 0)
local target = KEYS[3]
if redis.call('HGET', key, 'hold') == '1' then
  target = KEYS[5]
elseif attempts == 0 then
  target = KEYS[2]
end
redis.call('HSET', key, 'attempts', attempts)
redis.call('HDEL', key, 'lease', 'hold')
redis.call('ZREM', KEYS[4], id)
redis.call('ZADD', target, ARGV[3], id)
return 1
"""
)

QUEUE_ITEM = """
-- KEYS: notification:<id>, queue:queued, queue:deferred, queue:in_flight, queue:held
-- ARGV: id. Returns {state (1-4, in that order), score, notification fields}, or 0 if the
-- notification is in no queue.
for i = 2, 5 do
  local score = redis.call('ZSCORE', KEYS[i], ARGV[1])
  if score then return {i - 1, score, redis.call('HGETALL', KEYS[1])} end
end
return 0
"""

QUEUE_PAGE = """
-- KEYS: one queue; ARGV: offset, count, account ('' for every one), the notification:<id>
-- prefix. Looks at ``count`` entries from ``offset`` on (by score). Returns {looked,
-- {id, score, notification fields}, ...} for those of the account.
local first = tonumber(ARGV[1])
local found = redis.call('ZRANGE', KEYS[1], first, first + tonumber(ARGV[2]) - 1, 'WITHSCORES')
local result = {#found / 2}
for i = 1, #found, 2 do
  local key = ARGV[4] .. found[i]
  if ARGV[3] == '' or redis.call('HGET', key, 'account') == ARGV[3] then
    result[#result + 1] = {found[i], found[i + 1], redis.call('HGETALL', key)}
  end
end
return result
"""

RETRY_ONE = """
-- KEYS: queue:queued, queue:deferred; ARGV: id, now (ms)
-- Makes the entry due now if it is queued or deferred. Returns 1 if it is, else 0.
for i = 1, 2 do
  local score = redis.call('ZSCORE', KEYS[i], ARGV[1])
  if score then
    if tonumber(score) > tonumber(ARGV[2]) then redis.call('ZADD', KEYS[i], ARGV[2], ARGV[1]) end
    return 1
  end
end
return 0
"""

RETRY_PAGE = """
-- KEYS: queue:queued or queue:deferred; ARGV: now (ms), count
-- Makes up to ``count`` entries not yet due, due now. Returns how many.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[1], id) end
return #ids
"""

HOLD_ONE = """
-- KEYS: notification:<id>, queue:queued, queue:deferred, queue:in_flight, queue:held; ARGV: id
-- Holds a queued or deferred entry; marks one in flight, to be held when its worker records
-- a retry. Returns 1 if it is held now, else 0.
for i = 2, 3 do
  local score = redis.call('ZSCORE', KEYS[i], ARGV[1])
  if score then
    redis.call('ZREM', KEYS[i], ARGV[1])
    redis.call('ZADD', KEYS[5], score, ARGV[1])
    return 1
  end
end
if redis.call('ZSCORE', KEYS[5], ARGV[1]) then return 1 end
if redis.call('ZSCORE', KEYS[4], ARGV[1]) then redis.call('HSET', KEYS[1], 'hold', '1') end
return 0
"""

RELEASE_ONE = """
-- KEYS: notification:<id>, queue:queued, queue:deferred, queue:in_flight, queue:held
-- ARGV: id, now (ms). Releases a held entry: due now (queued if never tried). Clears the mark
-- of one in flight. Returns 1 if a held entry was released, else 0.
if redis.call('ZSCORE', KEYS[5], ARGV[1]) then
  local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
  local target = KEYS[3]
  if attempts == 0 then target = KEYS[2] end
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('ZADD', target, ARGV[2], ARGV[1])
  return 1
end
if redis.call('ZSCORE', KEYS[4], ARGV[1]) then redis.call('HDEL', KEYS[1], 'hold') end
return 0
"""

ACCOUNT_PAGE = """
-- KEYS: the queue to walk, then queue:queued, queue:deferred, queue:held
-- ARGV: offset, count, account ('' for every one), the notification:<id> prefix, what to do
--       with each of the account's entries, now (ms):
--       'hold' (to queue:held), 'mark' (in flight: to be held), 'unmark', 'release' (from
--       queue:held, due now: queued if never tried), 'count' (nothing)
-- Looks at ``count`` entries from ``offset`` on. Returns {looked, moved out of the queue
-- walked, matched}: the next page starts at offset + looked - moved.
local first = tonumber(ARGV[1])
local found = redis.call('ZRANGE', KEYS[1], first, first + tonumber(ARGV[2]) - 1, 'WITHSCORES')
local what, moved, matched = ARGV[5], 0, 0
for i = 1, #found, 2 do
  local id, score = found[i], found[i + 1]
  local key = ARGV[4] .. id
  if ARGV[3] == '' or redis.call('HGET', key, 'account') == ARGV[3] then
    matched = matched + 1
    if what == 'hold' then
      redis.call('ZREM', KEYS[1], id)
      redis.call('ZADD', KEYS[4], score, id)
      moved = moved + 1
    elseif what == 'mark' then
      redis.call('HSET', key, 'hold', '1')
    elseif what == 'unmark' then
      redis.call('HDEL', key, 'hold')
    elseif what == 'release' then
      local target = KEYS[3]
      if tonumber(redis.call('HGET', key, 'attempts') or '0') == 0 then target = KEYS[2] end
      redis.call('ZREM', KEYS[1], id)
      redis.call('ZADD', target, ARGV[6], id)
      moved = moved + 1
    end
  end
end
return {#found / 2, moved, matched}
"""

DELETE_QUEUED = (
    _IN_SLICES
    + _QUEUE_HELPERS
    + """
-- KEYS: notification:<id>, events:<id>, queue:queued, queue:deferred, queue:in_flight,
--       queue:held, body:<id>
-- ARGV: id, status text, time (ms)
-- Takes the notification out of the queue with a CAAS_FAILED event for each recipient still
-- pending, and drops its body (its lease, if in flight, is lost). Returns {address, channel,
-- ...} of those recipients, or 0 if it is in no queue.
local id, key = ARGV[1], KEYS[1]
local queue = nil
for i = 3, 6 do
  if redis.call('ZSCORE', KEYS[i], id) then queue = KEYS[i] end
end
if not queue then return 0 end
local recipients, pending = pendingOf(key)
local failed, entries = {}, {}
local tail = ',"CAAS_FAILED",' .. cjson.encode(ARGV[2]) .. ',' .. ARGV[3] .. ']'
for _, position in ipairs(pending) do
  local recipient = recipients[position + 1]
  failed[#failed + 1] = recipient[1]
  failed[#failed + 1] = recipient[2]
  entries[#entries + 1] = '[' .. cjson.encode(recipient[1]) .. ',' .. cjson.encode(recipient[2])
    .. tail
end
inSlices('RPUSH', KEYS[2], entries, 1, #entries)
redis.call('ZREM', queue, id)
redis.call('DEL', KEYS[7])
redis.call('HDEL', key, 'lease', 'hold', 'pending')
return failed
"""
)

EXPIRE = """
-- KEYS: received, queue:queued, queue:deferred, queue:in_flight, queue:held, reports-due
-- ARGV: before (ms, exclusive), offset, count, and the prefixes of notification:<id>,
--       body:<id>, events:<id>, accepted:<account>, bulk:..., reports-of:<id>,
--       report:<reportId>, report-attempts:<id>, gateway-texts:<id>, gateway-text:<text>,
--       gateway-id:<gatewayId>
-- Looks at ``count`` ids received before ``before`` from ``offset`` on, and deletes those in
-- no queue (in whatever state) with everything kept about them: events, reports in the
-- outbox and their attempts, gateway ids. Returns {deleted, looked at}; the ones kept stay
-- where they were, so the next batch starts at offset + kept.
local function forgetReports(id)
  local index = ARGV[9] .. id
  for _, report in ipairs(redis.call('SMEMBERS', index)) do
    redis.call('DEL', ARGV[10] .. report)
    redis.call('ZREM', KEYS[6], report)
  end
  redis.call('DEL', index, ARGV[11] .. id)
end
local function forgetGatewayIds(id)
  local texts = ARGV[12] .. id
  for _, text in ipairs(redis.call('ZRANGE', texts, 0, -1)) do
    local parts = ARGV[13] .. text
    for _, part in ipairs(redis.call('SMEMBERS', parts)) do
      -- Unless another text has taken the id over since.
      if redis.call('HGET', ARGV[14] .. part, 'text') == text then
        redis.call('DEL', ARGV[14] .. part)
      end
    end
    redis.call('DEL', parts)
  end
  redis.call('DEL', texts)
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1],
                       'LIMIT', ARGV[2], ARGV[3])
local deleted = 0
for _, id in ipairs(ids) do
  local queued = false
  for i = 2, 5 do
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
    forgetReports(id)
    forgetGatewayIds(id)
    redis.call('ZREM', KEYS[1], id)
    deleted = deleted + 1
  end
end
return {deleted, #ids}
"""

REMEMBER_GATEWAY_IDS = """
-- KEYS: notification:<id>, gateway-text:<text>, gateway-texts:<id>, then gateway-id:<gatewayId>
--       of each part
-- ARGV: notification id, text (the first part's id), address, channel, until (ms), the
--       gateway-text:<text> prefix, then the parts' ids
-- Returns 1, or 0 if the notification does not exist (nothing written). An id that belonged
-- to another text leaves it.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local text, expires = ARGV[2], ARGV[5]
for i = 4, #KEYS do
  local part = ARGV[i + 3]
  local before = redis.call('HGET', KEYS[i], 'text')
  if before and before ~= text then redis.call('SREM', ARGV[6] .. before, part) end
  redis.call('HSET', KEYS[i], 'n', ARGV[1], 'address', ARGV[3], 'channel', ARGV[4], 'text', text)
  redis.call('PEXPIREAT', KEYS[i], expires)
  redis.call('SADD', KEYS[2], part)
end
redis.call('PEXPIREAT', KEYS[2], expires)
redis.call('ZADD', KEYS[3], expires, text)
local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[3], last[2])
return 1
"""

LOOKUP_GATEWAY_ID = """
-- KEYS: gateway-id:<gatewayId>; ARGV: the gateway-text:<text> prefix
-- Returns {notification id, address, channel, {unsettled part ids}}, or nil if unknown.
local found = redis.call('HMGET', KEYS[1], 'n', 'address', 'channel', 'text')
if not found[1] then return nil end
return {found[1], found[2], found[3], redis.call('SMEMBERS', ARGV[1] .. found[4])}
"""

SETTLE_GATEWAY_ID = """
-- KEYS: gateway-id:<gatewayId>
-- ARGV: gateway id, '1' delivered or '0' failed, the gateway-text:<text> and
--       gateway-id:<gatewayId> prefixes
-- Returns 1 if this settles the text (its last part delivered, or a part failed: every part
-- forgotten), else 0 (more parts to come; or the id unknown or settled already).
local text = redis.call('HGET', KEYS[1], 'text')
if not text then return 0 end
local parts = ARGV[3] .. text
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', parts, ARGV[1])
  if redis.call('SCARD', parts) == 0 then return 1 end
  return 0
end
for _, part in ipairs(redis.call('SMEMBERS', parts)) do
  if redis.call('HGET', ARGV[4] .. part, 'text') == text then
    redis.call('DEL', ARGV[4] .. part)
  end
end
redis.call('DEL', parts, KEYS[1])
return 1
"""

PUT_DKIM_KEY = """
-- KEYS: dkim:<domain>, dkim-domains; ARGV: domain, field, value, ...
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

REMOVE_DKIM_KEY = """
-- KEYS: dkim:<domain>, dkim-domains; ARGV: domain. Returns 1 if a key was removed, else 0.
local removed = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return removed
"""

LIST_DKIM_KEYS = """
-- KEYS: dkim-domains; ARGV: the dkim:<domain> prefix. Returns domain, fields, domain, ...
local result = {}
for _, domain in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local fields = redis.call('HGETALL', ARGV[1] .. domain)
  if #fields > 0 then
    result[#result + 1] = domain
    result[#result + 1] = fields
  end
end
return result
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
