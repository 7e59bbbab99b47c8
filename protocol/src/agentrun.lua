#!lua name=agentrun

-- agentrun's Redis functions (see protocol/src/functions.rs and docs/protocol.md, "Redis
-- functions"). The operator loads this library on every master; run users, the relay and the
-- archiver may call these functions (FCALL) and may not load code of their own.
--
-- Function names carry the version of their contract (`agentrun_v1_*`): a change of keys,
-- arguments or reply is a new function, and the old one stays in the library for as long as
-- sidecars of an older release may call it.
--
-- Every function touches only the keys it is given, and Redis checks each call inside it
-- against the caller's ACL user, so a run's user still reaches only its own run's keys.

-- The seq of the newest entry of a stream (0: none).
local function newest_seq(key)
  local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if #newest > 0 then return tonumber(string.sub(newest[1][1], 3)) end
  return 0
end

-- Appends a batch of entries of one producer to one stream and announces each on the channel
-- of the same name (protocol/src/publish.rs explains dedup, sequence numbers and epochs).
-- keys[1] stream key (and channel); keys[2] producers hash; keys[3] (optional) the run's
-- state hash: without it the function neither reads nor writes the epoch.
-- args[1] producer id, args[2] MAXLEN (0 = uncapped), args[3] publish command or "",
-- args[4] a fresh epoch proposed by the caller, args[5] the stream top the producer was last
-- acknowledged (0: no check), args[6] the epoch of that acknowledgement ("" = none), then
-- five values per entry: pseq, ts, type, content, meta ("" = none).
-- Returns {last stream seq, entries appended, highest pseq applied, epoch ("" = none),
-- 1 when this call started a new epoch because the history was rewound, else 0}.
--
-- The producers hash also keeps each stream's top (field: the stream key itself), written in
-- the same step as the entries, so that a publish does not read the newest entry to learn it
-- (that read costs more than the append). Without it (a stream written before it was kept)
-- the newest entry says; when the stream is ahead of it (changed by hand) the append is
-- refused and the newest entry says. Numbers stay the strings they came as where they can:
-- formatting a Lua number is dear too.
local function publish(keys, args)
  local field = keys[1] .. '|' .. args[1]
  -- (HGET twice rather than HMGET: run users of older releases may not HMGET.)
  local applied = tonumber(redis.call('HGET', keys[2], field) or '0')
  local top = tonumber(redis.call('HGET', keys[2], keys[1]))
  local first = nil
  for i = 7, #args, 5 do
    if tonumber(args[i]) > applied then first = i; break end
  end
  local epoch = ''
  if #keys >= 3 then epoch = redis.call('HGET', keys[3], 'epoch') or '' end
  if not first then
    -- Only re-sends: nothing changes.
    return {top or newest_seq(keys[1]), 0, applied, epoch, 0}
  end
  if not top then top = newest_seq(keys[1]) end
  local head = {keys[1]}
  if tonumber(args[2]) > 0 then head = {keys[1], 'MAXLEN', '~', args[2]} end
  -- Appends entry i as seq top + 1 and returns that seq (a string).
  local function append(i)
    local xadd = {unpack(head)}
    local n = #xadd
    xadd[n + 1] = '0-?'
    xadd[n + 2] = 'seq'; xadd[n + 3] = '?'
    xadd[n + 4] = 'ts'; xadd[n + 5] = args[i + 1]
    xadd[n + 6] = 'type'; xadd[n + 7] = args[i + 2]
    xadd[n + 8] = 'content'; xadd[n + 9] = args[i + 3]
    if args[i + 4] ~= '' then
      xadd[n + 10] = 'meta'; xadd[n + 11] = args[i + 4]
    end
    for attempt = 1, 2 do
      -- '%d', not tostring: a Lua number prints with 14 digits at most.
      local seq = string.format('%d', top + 1)
      xadd[n + 1] = '0-' .. seq
      xadd[n + 3] = seq
      local r = redis.pcall('XADD', unpack(xadd))
      if type(r) ~= 'table' or not r.err then
        top = top + 1
        return seq
      end
      -- The stream is ahead of the top kept for it: learn it from the newest entry once.
      if attempt == 2 or not string.find(r.err, 'equal or smaller', 1, true) then error(r) end
      top = newest_seq(keys[1])
    end
  end
  local seq = append(first)
  local rewound = 0
  if #keys >= 3 then
    -- The stream's top before this batch, against the one the producer was acknowledged.
    local before = top - 1
    local expected = tonumber(args[5])
    if epoch == '' then
      epoch = args[4]
      redis.call('HSET', keys[3], 'epoch', epoch)
      if expected > 0 then rewound = 1 end
    elseif expected > 0 and before < expected and epoch == args[6] then
      epoch = args[4]
      redis.call('HSET', keys[3], 'epoch', epoch)
      rewound = 1
    end
  end
  local tail = ''
  if epoch ~= '' then tail = ' ' .. epoch end
  local pub = args[3]
  local added = 0
  local applied_arg = ''
  for i = first, #args, 5 do
    local pseq = tonumber(args[i])
    if pseq > applied then
      if i ~= first then seq = append(i) end
      if pub ~= '' then
        local meta = args[i + 4]
        local metalen = '0'
        if meta ~= '' then metalen = tostring(#meta) end
        redis.call(pub, keys[1], seq .. ' ' .. args[i + 1] .. ' ' .. args[i + 2] .. ' ' .. metalen .. tail .. '\n' .. meta .. args[i + 3])
      end
      applied = pseq
      applied_arg = args[i]
      added = added + 1
    end
  end
  redis.call('HSET', keys[2], field, applied_arg, keys[1], seq)
  return {top, added, applied, epoch, rewound}
end

-- Adds a variation to the run's declared `variations` (comma-separated) unless it is there.
-- keys[1] state hash; args[1] variation. Returns 1 when it was added.
local function add_variation(keys, args)
  local current = redis.call('HGET', keys[1], 'variations')
  if not current or current == '' then
    redis.call('HSET', keys[1], 'variations', args[1])
    return 1
  end
  for v in string.gmatch(current, '[^,]+') do
    if v == args[1] then return 0 end
  end
  redis.call('HSET', keys[1], 'variations', current .. ',' .. args[1])
  return 1
end

-- Derives the run's `phase` from the latest state of each declared variation: final once
-- every variation is final (failed if any failed, else stopped if any stopped, else
-- succeeded), otherwise running, paused, starting or pending. Sets `ended` the first time the
-- phase is final. keys[1] state hash; args[1] now (ms). Returns the phase (nil: no variation
-- is declared).
local function settle_phase(keys, args)
  local declared = redis.call('HGET', keys[1], 'variations')
  if not declared or declared == '' then return false end
  local total, final, failed, stopped, paused, running, starting = 0, 0, 0, 0, 0, 0, 0
  for v in string.gmatch(declared, '[^,]+') do
    total = total + 1
    local state = 'pending'
    local raw = redis.call('HGET', keys[1], 'var:' .. v)
    if raw then
      local ok, event = pcall(cjson.decode, raw)
      if ok and type(event) == 'table' and type(event.state) == 'string' then state = event.state end
    end
    if state == 'succeeded' then final = final + 1
    elseif state == 'failed' then final = final + 1; failed = failed + 1
    elseif state == 'stopped' then final = final + 1; stopped = stopped + 1
    elseif state == 'paused' then paused = paused + 1
    elseif state == 'running' then running = running + 1
    elseif state == 'starting' then starting = starting + 1 end
  end
  local phase = 'pending'
  if final == total then
    if failed > 0 then phase = 'failed' elseif stopped > 0 then phase = 'stopped' else phase = 'succeeded' end
  elseif running > 0 then phase = 'running'
  elseif paused > 0 then phase = 'paused'
  elseif starting > 0 then phase = 'starting' end
  redis.call('HSET', keys[1], 'phase', phase)
  if final == total then redis.call('HSETNX', keys[1], 'ended', args[1]) end
  return phase
end

-- Sets `archive` only when the state hash exists (a state hash made by this alone would be a
-- key without a TTL) and is not `complete`. keys[1] state; args status, error ("" = none).
local function archive_set_status(keys, args)
  if redis.call('EXISTS', keys[1]) == 0 then return 0 end
  if redis.call('HGET', keys[1], 'archive') == 'complete' then return 0 end
  redis.call('HSET', keys[1], 'archive', args[1])
  if args[2] ~= '' then
    redis.call('HSET', keys[1], 'archive_error', args[2])
  else
    redis.call('HDEL', keys[1], 'archive_error')
  end
  return 1
end

-- keys[1] state, keys[2..] keys to expire; args[1] TTL. Expires them unless the run waits
-- for its archive; returns 1 when it did.
local function expire_unless_archiving(keys, args)
  local a = redis.call('HGET', keys[1], 'archive')
  if a and a ~= 'complete' then return 0 end
  for i = 2, #keys do redis.call('EXPIRE', keys[i], args[1]) end
  return 1
end

-- Marks the run's archive complete and puts the retention TTL on its keys.
-- keys[1] state, keys[2..] every other key of the run; args[1] now (ms), args[2] TTL (0 = none).
local function archive_complete(keys, args)
  if redis.call('EXISTS', keys[1]) == 1 then
    redis.call('HSET', keys[1], 'archive', 'complete', 'archived', args[1])
    redis.call('HDEL', keys[1], 'archive_error')
  end
  local ttl = tonumber(args[2])
  if ttl > 0 then
    for i = 1, #keys do redis.call('EXPIRE', keys[i], ttl) end
  end
  return 1
end

-- keys[1] archive queue; args group, id, consumer. Resets the idle time of a request this
-- consumer still owns; 0 when it is not its own any more.
local function archive_heartbeat(keys, args)
  local p = redis.call('XPENDING', keys[1], args[1], args[2], args[2], 1)
  if #p == 0 or p[1][2] ~= args[3] then return 0 end
  redis.call('XCLAIM', keys[1], args[1], args[3], 0, args[2], 'JUSTID')
  return 1
end

-- keys[1] archive queue, keys[2] dead letters; args group, id, max length, then field/value
-- pairs. Moves a request to the dead-letter stream in one step.
local function archive_dead_letter(keys, args)
  redis.call('XADD', keys[2], 'MAXLEN', '~', args[3], '*', unpack(args, 4))
  redis.call('XACK', keys[1], args[1], args[2])
  redis.call('XDEL', keys[1], args[2])
  return 1
end

-- keys[1] archive queue, keys[2] dead letters; args[1] run ('' = every run), args[2] most
-- entries. Moves dead letters back to the queue (less their failure fields); returns their
-- runs.
local function archive_requeue(keys, args)
  local moved = {}
  local entries = redis.call('XRANGE', keys[2], '-', '+', 'COUNT', args[2])
  for _, e in ipairs(entries) do
    local id, f = e[1], e[2]
    local run, keep = nil, {}
    for i = 1, #f, 2 do
      local k = f[i]
      if k == 'run' then run = f[i + 1] end
      if k ~= 'reason' and k ~= 'attempts' and k ~= 'failed' and k ~= 'queue_id' then
        keep[#keep + 1] = k; keep[#keep + 1] = f[i + 1]
      end
    end
    if run and (args[1] == '' or args[1] == run) then
      redis.call('XADD', keys[1], '*', unpack(keep))
      redis.call('XDEL', keys[2], id)
      moved[#moved + 1] = run
    end
  end
  return moved
end

redis.register_function('agentrun_v1_publish', publish)
redis.register_function('agentrun_v1_add_variation', add_variation)
redis.register_function('agentrun_v1_settle_phase', settle_phase)
redis.register_function('agentrun_v1_archive_set_status', archive_set_status)
redis.register_function('agentrun_v1_expire_unless_archiving', expire_unless_archiving)
redis.register_function('agentrun_v1_archive_complete', archive_complete)
redis.register_function('agentrun_v1_archive_heartbeat', archive_heartbeat)
redis.register_function('agentrun_v1_archive_dead_letter', archive_dead_letter)
redis.register_function('agentrun_v1_archive_requeue', archive_requeue)
