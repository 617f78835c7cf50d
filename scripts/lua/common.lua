-- Helpers shared by the Lua equivalents of the gpucache commands (scripts/lua/*.lua).
--
-- These scripts exist for benchmarking (scripts/bench.sh, examples/loadgen.rs): they do the
-- same reads and the same writes on the same keys as the module's commands (src/commands,
-- src/market.rs), so "module vs Lua" compares two implementations of one marketplace. They
-- follow the module (versions from the region sequence included); `loadgen verify` (run by scripts/bench.sh) checks
-- that replies, errors, stream events, keys and TTLs still agree with the module under test.
--
-- A command script is not loadable on its own: it is loaded as its shebang line (`#!lua`, or
-- `#!lua flags=no-writes` for the read-only ones, which must come first), then this file, then
-- the rest of the command script. By hand:
--   f=scripts/lua/book.lua
--   sha=$(redis-cli SCRIPT LOAD "$(head -n1 $f; cat scripts/lua/common.lua; tail -n +2 $f)")
--   redis-cli EVALSHA $sha 1 <region> <gpu_id> <booking_id> <user_id> <duration_s>
-- examples/loadgen.rs does the same but keeps only the definitions below that the script uses
-- (a script body runs whole on every call, so each helper's closure is created on every call:
-- a hand-written script would not carry helpers it does not use);
-- LOADGEN_DUMP_SCRIPTS=<dir> makes it write the assembled scripts there. Top-level definitions
-- here must start at column 0 with `local` for that.
-- Write scripts declare no flags (`#!lua`), so like the module's deny-oom commands they are
-- refused whole over maxmemory; read scripts declare `no-writes`.
-- Every script takes the region as its one key (KEYS[1]), exactly as the module declares the
-- region as its key (first_key = last_key = 1): the region name hashes to the same cluster slot
-- as every `gpucache:{region}:...` key. The remaining arguments are the command's own, in order.
--
-- The line below is the module's configuration. The defaults are the module's defaults;
-- examples/loadgen.rs replaces this line with the values `CONFIG GET gpucache.*` reports before
-- it loads the scripts, so both sides draw TTLs and demand multipliers alike.
local CFG = {availability_ttl = 300, pricing_ttl = 600, jitter = 10, stream_maxlen = 10000, tiers = {{10, 200}, {30, 150}, {50, 120}}}

local MICROS = 1000000
local MAX_PRICE_MICROS = 1000000 * MICROS
local BUCKET_MS = 15 * 60 * 1000
local WINDOW_MS = 24 * 3600 * 1000
local BUCKETS = WINDOW_MS / BUCKET_MS

-- Errors -------------------------------------------------------------------------------------
-- A refusal is raised as {fail = "CODE message"} and turned into an error reply by `run`, so
-- the reply carries no "script: ..., on @user_script" suffix. All refusals happen before the
-- first write, as in the module.

local function fail(message)
  error({fail = message}, 0)
end

local function shown(text, max)
  max = max or 64
  local cut = string.sub(text, 1, max)
  local out = (string.gsub(cut, '[^\32-\126]', function(c)
    return string.format('\\x%02x', string.byte(c))
  end))
  if #text > max then
    out = out .. '...'
  end
  return out
end

local function wrongtype(key)
  fail("WRONGTYPE key '" .. key .. "' holds a value of the wrong type for gpucache")
end

local function corrupt(key)
  fail("CORRUPT key '" .. key .. "' is not a record gpucache wrote (fields missing or malformed)")
end

-- A read. A key of a foreign type is reported like the module reports it.
local function rd(command, key, ...)
  local reply = redis.pcall(command, key, ...)
  if type(reply) == 'table' and reply.err then
    if string.sub(reply.err, 1, 9) == 'WRONGTYPE' then
      wrongtype(key)
    end
    fail('ERR internal read failed: ' .. reply.err)
  end
  return reply
end

-- Runs a command body; refusals become error replies, anything else is re-raised.
local function run(body)
  local ok, result = pcall(body)
  if ok then
    return result
  end
  if type(result) == 'table' and result.fail then
    return redis.error_reply(result.fail)
  end
  error(result, 0)
end

-- Arguments ----------------------------------------------------------------------------------

local function arity(name, min, max)
  local n = #KEYS + #ARGV
  if #KEYS ~= 1 or n < min or n > max then
    fail("ERR wrong number of arguments for '" .. name .. "' command")
  end
end

local function checked_name(what, text, max_len)
  if text == nil or #text == 0 then
    fail('ERR ' .. what .. ' must not be empty')
  end
  if #text > max_len then
    fail('ERR ' .. what .. ' is longer than ' .. max_len .. ' bytes')
  end
  if not string.find(text, '^[A-Za-z0-9_%-%.:/@%+=]+$') then
    fail('ERR ' .. what .. " '" .. shown(text, 64) .. "' may only contain letters, digits and _ - . : / @ + =")
  end
  return text
end

local function arg_region(text)
  checked_name('region', text, 64)
  if string.find(text, ':', 1, true) then
    fail("ERR region must not contain ':'")
  end
  return text
end

local function arg_id(what, text)
  return checked_name(what, text, 128)
end

-- Whether a decimal integer string fits in an i64 (Rust's parse::<i64>).
local function fits_i64(text)
  if #text < 19 then
    return true
  end
  local digits = string.gsub(string.gsub(text, '^[+-]', ''), '^0+', '')
  if #digits < 19 then
    return true
  end
  if #digits > 19 then
    return false
  end
  if string.sub(text, 1, 1) == '-' then
    return digits <= '9223372036854775808'
  end
  return digits <= '9223372036854775807'
end

local function arg_integer(what, text, min, max)
  if not string.find(text, '^%-?%d+$') or not fits_i64(text) then
    fail('ERR ' .. what .. " must be an integer, got '" .. shown(text, 64) .. "'")
  end
  local value = tonumber(text)
  if value < min or value > max then
    fail('ERR ' .. what .. ' must be between ' .. min .. ' and ' .. max)
  end
  return value
end

-- Prices: exact micro-units, as src/core/price.rs. Returns nil when `text` is not a price.
local function parse_price(text)
  if text == nil then
    return nil
  end
  local dot = string.find(text, '.', 1, true)
  local whole, fraction = text, ''
  if dot then
    whole, fraction = string.sub(text, 1, dot - 1), string.sub(text, dot + 1)
  end
  if #whole == 0 or #whole > 7 or #fraction > 6 or string.sub(text, -1) == '.' then
    return nil
  end
  if not string.find(whole, '^%d+$') or not string.find(fraction, '^%d*$') then
    return nil
  end
  local micros = tonumber(whole) * MICROS
  if #fraction > 0 then
    micros = micros + tonumber(fraction .. string.rep('0', 6 - #fraction))
  end
  if micros > MAX_PRICE_MICROS then
    return nil
  end
  return micros
end

local function arg_price(text)
  local micros = parse_price(text)
  if micros == nil then
    fail("ERR invalid price '" .. shown(text, 64) .. "': expected a decimal from 0 to 1000000 with at most 6 decimal places")
  end
  return micros
end

local function fmt_int(n)
  return string.format('%d', n)
end

local function fmt_price(micros)
  local whole = math.floor(micros / MICROS)
  local fraction = micros - whole * MICROS
  if fraction == 0 then
    return fmt_int(whole)
  end
  local digits = string.gsub(string.format('%06d', fraction), '0+$', '')
  return fmt_int(whole) .. '.' .. digits
end

local function fmt_hundredths(value)
  return fmt_price(value * 10000)
end

-- An integer hash field as the module reads it (Rust's parse::<i64>): nil when malformed.
local function parse_int(text)
  if text and string.find(text, '^[+-]?%d+$') and fits_i64(text) then
    return tonumber(text)
  end
  return nil
end

local GPU_STATUSES = {available = 'available', busy = 'busy', offline = 'offline', maintenance = 'maintenance'}
local PROVIDER_STATUSES = {online = 'online', offline = 'offline', maintenance = 'maintenance'}

local function arg_status(text)
  local status = GPU_STATUSES[string.lower(text)]
  if not status then
    fail("ERR invalid GPU status '" .. shown(text, 64) .. "': expected available, busy, offline or maintenance")
  end
  return status
end

-- Keys ---------------------------------------------------------------------------------------

local function region_keys(region)
  local p = 'gpucache:{' .. region .. '}:'
  return {
    region = region,
    prefix = p,
    gpu = function(id) return p .. 'gpu:' .. id end,
    booking = function(id) return p .. 'booking:' .. id end,
    provider = function(id) return p .. 'provider:' .. id end,
    provider_gpus = function(id) return p .. 'provider-gpus:' .. id end,
    price = function(t) return p .. 'price:' .. t end,
    own = function(t) return p .. 'avail-own:' .. t end,
    typed = function(t) return p .. 'avail-type:' .. t end,
    by_score = function(t) return p .. 'avail-score:' .. t end,
    order_book = function(t) return p .. 'orderbook:' .. t end,
    window = p .. 'stats:24h',
    registry = p .. 'index:gpus',
    types = p .. 'index:types',
    providers = p .. 'index:providers',
    bookings = p .. 'index:bookings',
    booking_ends = p .. 'index:booking-ends',
    stats = p .. 'stats:market',
    events = p .. 'events',
  }
end

-- Key-type guards. The module opens every key a command may write and refuses the command
-- before its first write when one holds a foreign type (Region::check_key_types, a cheap
-- RM_OpenKey each). A script gets the same all-or-nothing guarantee by asking TYPE for the keys
-- it would otherwise first touch with a write; a key it reads before writing raises WRONGTYPE at
-- that read already (see `rd`), with the same message. Each script lists its guarded keys.
local function type_ok(key, wanted)
  local actual = redis.call('TYPE', key).ok
  return actual == wanted or actual == 'none'
end

local function expect_type(key, wanted)
  if not type_ok(key, wanted) then
    wrongtype(key)
  end
end

-- Region::has_market_state: whether the region holds GPUs, bookings, types or providers.
local function has_market_state(k)
  return redis.call('EXISTS', k.registry, k.bookings, k.types, k.providers) > 0
end

-- Region::check_key_types, its region-wide part, in the module's order: the provider set,
-- 24-hour window, GPU registry, type set, booking registry, booking clock (a sorted set),
-- counters and stream; then the module's refusal to write on top of lost market counters
-- (Region::check_counters_present: a region with state and no counters hash). The module also
-- queues a repair of the region there; a script cannot, so the Lua twin only refuses (with the
-- module's words) and leaves the repair to GPUCACHE.REPAIR or the module's next look at the
-- region.
local function guard_region(k)
  expect_type(k.providers, 'set')
  expect_type(k.window, 'hash')
  expect_type(k.registry, 'hash')
  expect_type(k.types, 'set')
  expect_type(k.bookings, 'hash')
  expect_type(k.booking_ends, 'zset')
  local stats = redis.call('TYPE', k.stats).ok
  if stats ~= 'hash' and stats ~= 'none' then
    wrongtype(k.stats)
  end
  expect_type(k.events, 'stream')
  if stats == 'none' and has_market_state(k) then
    fail("CORRUPT the market counters of region '" .. k.region .. "' are gone (" .. k.stats
      .. '); a repair is queued, or run GPUCACHE.REPAIR ' .. k.region)
  end
end

-- Records --------------------------------------------------------------------------------------

-- The named fields of a hash (HMGET), as a table; nil when none is there (no such key).
local function hash_fields(key, ...)
  local names = {...}
  local values = rd('HMGET', key, ...)
  local f, found = {}, false
  for i = 1, #names do
    if values[i] then
      f[names[i]] = values[i]
      found = true
    end
  end
  return found and f or nil
end

-- A GPU record (GpuRecord::from_fields), nil when the key does not exist, CORRUPT when a field
-- the module always writes is missing or malformed. Reads the record's fields, as the module.
-- `terms` is the copy of its booking's terms a booked GPU's record keeps (booking_user,
-- booking_price, booking_duration_s, booking_start_ms, booking_end_ms): it counts only whole
-- and only beside the booking it copies (GpuFields::build).
local function load_gpu(k, gpu_id)
  local key = k.gpu(gpu_id)
  local f = hash_fields(key, 'provider', 'type', 'price', 'price_seq', 'memory_gb', 'cores',
    'score', 'status', 'booking', 'version', 'updated_ms', 'booking_user', 'booking_price',
    'booking_duration_s', 'booking_start_ms', 'booking_end_ms')
  if not f then
    return nil
  end
  local g = {
    provider = f.provider,
    type = f.type,
    price = parse_price(f.price),
    status = f.status and GPU_STATUSES[string.lower(f.status)],
    booking = f.booking,
    memory_gb = parse_int(f.memory_gb),
    cores = parse_int(f.cores),
  }
  if g.booking == '' then
    g.booking = nil
  end
  local score = f.score and tonumber(f.score)
  if score and score == score and score ~= math.huge and score ~= -math.huge then
    -- Written by the module with Rust's shortest round-trip formatting; kept as is.
    g.score = f.score
  end
  local ints = {'price_seq', 'version', 'updated_ms'}
  for i = 1, #ints do
    local name = ints[i]
    if f[name] == nil then
      g[name] = 0
    else
      g[name] = parse_int(f[name])
      if g[name] == nil then
        corrupt(key)
      end
    end
  end
  if not (g.provider and g.type and g.price and g.status) then
    corrupt(key)
  end
  if g.booking then
    local t = {
      user = f.booking_user, price = parse_price(f.booking_price),
      duration_s = parse_int(f.booking_duration_s), start_ms = parse_int(f.booking_start_ms),
      end_ms = parse_int(f.booking_end_ms),
    }
    if t.user and t.user ~= '' and t.price and t.duration_s and t.start_ms and t.end_ms then
      g.terms = t
    end
  end
  return g
end

local function require_gpu(k, gpu_id)
  local g = load_gpu(k, gpu_id)
  if not g then
    fail("NOGPU no such GPU '" .. gpu_id .. "'")
  end
  return g
end

local function terms_equal(a, b)
  return a.user == b.user and a.price == b.price and a.duration_s == b.duration_s
    and a.start_ms == b.start_ms and a.end_ms == b.end_ms
end

local TERM_FIELDS = {'booking_user', 'booking_price', 'booking_duration_s', 'booking_start_ms', 'booking_end_ms'}

-- GpuRecord::changed_fields: the fields of the new record whose stored text differs from the
-- old record's, as one HSET's arguments (a status change rewrites 3-4 fields, a booking also
-- its terms, not the whole record).
local function changed_fields(old, new)
  local f = {}
  local function put(name, value)
    f[#f + 1] = name
    f[#f + 1] = value
  end
  if new.provider ~= old.provider then
    put('provider', new.provider)
  end
  if new.type ~= old.type then
    put('type', new.type)
  end
  if new.price ~= old.price then
    put('price', fmt_price(new.price))
  end
  if new.price_seq ~= old.price_seq then
    put('price_seq', fmt_int(new.price_seq))
  end
  if new.status ~= old.status then
    put('status', new.status)
  end
  if (new.booking or '') ~= (old.booking or '') then
    put('booking', new.booking or '')
  end
  if new.version ~= old.version then
    put('version', fmt_int(new.version))
  end
  if new.updated_ms ~= old.updated_ms then
    put('updated_ms', fmt_int(new.updated_ms))
  end
  if new.memory_gb and new.memory_gb ~= old.memory_gb then
    put('memory_gb', fmt_int(new.memory_gb))
  end
  if new.cores and new.cores ~= old.cores then
    put('cores', fmt_int(new.cores))
  end
  if new.score and new.score ~= old.score then
    put('score', new.score)
  end
  local t = new.terms
  if t and not (old.terms and terms_equal(old.terms, t)) then
    put('booking_user', t.user)
    put('booking_price', fmt_price(t.price))
    put('booking_duration_s', fmt_int(t.duration_s))
    put('booking_start_ms', fmt_int(t.start_ms))
    put('booking_end_ms', fmt_int(t.end_ms))
  end
  return f
end

-- GpuRecord::dropped_fields: optional fields the new record no longer has (one HDEL).
local function dropped_fields(old, new)
  local f = {}
  if old.memory_gb and not new.memory_gb then
    f[#f + 1] = 'memory_gb'
  end
  if old.cores and not new.cores then
    f[#f + 1] = 'cores'
  end
  if old.score and not new.score then
    f[#f + 1] = 'score'
  end
  if old.terms and not new.terms then
    for i = 1, #TERM_FIELDS do
      f[#f + 1] = TERM_FIELDS[i]
    end
  end
  return f
end

local function copy(t)
  local c = {}
  for name, value in pairs(t) do
    c[name] = value
  end
  return c
end

-- A booking record (Booking::from_fields); gpu_type and provider are absent in bookings written
-- before they were recorded.
local function load_booking(k, booking_id)
  local key = k.booking(booking_id)
  local f = hash_fields(key, 'gpu', 'user', 'price', 'duration_s', 'start_ms', 'end_ms',
    'gpu_type', 'provider')
  if not f then
    return nil
  end
  local b = {
    gpu = f.gpu, user = f.user, price = parse_price(f.price),
    duration_s = parse_int(f.duration_s), start_ms = parse_int(f.start_ms), end_ms = parse_int(f.end_ms),
  }
  if not (b.gpu and b.user and b.price and b.duration_s and b.start_ms and b.end_ms) then
    corrupt(key)
  end
  if f.gpu_type ~= '' then
    b.gpu_type = f.gpu_type
  end
  if f.provider ~= '' then
    b.provider = f.provider
  end
  return b
end

-- Booking::from_terms + holding: the booking a booked GPU's copy of its terms describes.
local function booking_of_terms(gpu_id, g)
  local t = g.terms
  return {
    gpu = gpu_id, user = t.user, price = t.price, duration_s = t.duration_s,
    start_ms = t.start_ms, end_ms = t.end_ms, gpu_type = g.type, provider = g.provider,
  }
end

-- Booking::to_fields: the booking hash's fields, as one HSET's arguments.
local function booking_fields(b)
  local f = {
    'gpu', b.gpu, 'user', b.user, 'price', fmt_price(b.price), 'duration_s', fmt_int(b.duration_s),
    'start_ms', fmt_int(b.start_ms), 'end_ms', fmt_int(b.end_ms),
  }
  if b.gpu_type then
    f[#f + 1] = 'gpu_type'
    f[#f + 1] = b.gpu_type
  end
  if b.provider then
    f[#f + 1] = 'provider'
    f[#f + 1] = b.provider
  end
  return f
end

-- Type price (HMGET price seq version); nil when none is set.
local function load_type_price(k, gpu_type)
  local key = k.price(gpu_type)
  local v = rd('HMGET', key, 'price', 'seq', 'version')
  if not v[1] then
    return nil
  end
  local price = parse_price(v[1])
  if not price then
    corrupt(key)
  end
  return {price = price, seq = parse_int(v[2] or nil) or 0, version = parse_int(v[3] or nil) or 0}
end

local function provider_status(k, provider)
  local key = k.provider(provider)
  local text = rd('HGET', key, 'status')
  if not text then
    return 'online'
  end
  local status = PROVIDER_STATUSES[string.lower(text)]
  if not status then
    corrupt(key)
  end
  return status
end

local function is_listed(status, provider)
  return status == 'available' and provider == 'online'
end

-- Own or type price: whichever was set last (core::gpu::price_source).
local function price_source(g, tp)
  if tp and tp.seq > g.price_seq then
    return 'type'
  end
  return 'own'
end

local function base_price(g, tp)
  if price_source(g, tp) == 'type' then
    return tp.price, 'type'
  end
  return g.price, 'own'
end

-- Demand pricing ---------------------------------------------------------------------------------

local function stat_int(k, field)
  return parse_int(rd('HGET', k.stats, field) or nil) or 0
end

local function type_counts(k, gpu_type)
  local listed = rd('ZCARD', k.own(gpu_type)) + rd('ZCARD', k.typed(gpu_type))
  return listed, stat_int(k, 'type-total:' .. gpu_type)
end

local function multiplier_of(listed, total)
  if total <= 0 then
    return 100
  end
  if listed < 0 then
    listed = 0
  elseif listed > total then
    listed = total
  end
  for i = 1, #CFG.tiers do
    if listed * 100 < total * CFG.tiers[i][1] then
      return CFG.tiers[i][2]
    end
  end
  return 100
end

local function demand_multiplier(k, gpu_type)
  return multiplier_of(type_counts(k, gpu_type))
end

-- price x hundredths / 100, rounded to the micro-unit, exact in doubles.
local function apply_multiplier(micros, hundredths)
  local high = math.floor(micros / 100)
  local low = micros - high * 100
  return high * hundredths + math.floor((low * hundredths + 50) / 100)
end

-- Time and TTLs --------------------------------------------------------------------------------

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- core::ttl::jittered_ttl_ms with a fresh uniform draw.
local function jittered_ttl_ms(base_seconds, percent)
  local base_ms = math.max(base_seconds, 1) * 1000
  percent = math.min(math.max(percent, 0), 100)
  local spread = math.floor(base_ms * percent / 100)
  local x = (math.random() * 2 - 1) * spread
  local offset
  if x >= 0 then
    offset = math.floor(x + 0.5)
  else
    offset = -math.floor(-x + 0.5)
  end
  return math.max(base_ms + offset, 1000)
end

-- Region::gpu_expiry for a GPU no booking holds: a jittered availability TTL from now. (A
-- booked GPU's record has no TTL: store_gpu gets nil and PERSISTs it.)
local function gpu_expire_at(now)
  return now + jittered_ttl_ms(CFG.availability_ttl, CFG.jitter)
end

local function pricing_expire_at(now)
  return now + jittered_ttl_ms(CFG.pricing_ttl, CFG.jitter)
end

-- Writes: a change context ---------------------------------------------------------------------
-- Mirrors Region (src/market.rs): it remembers the keys written (for the event's `keys` and, in
-- the module, its notifications), each touched type's demand multiplier before the first change
-- and the types whose order book changed.

local function new_change(k, region)
  return {k = k, region = region, written = {}, written_set = {}, demand_before = {}, books = {}}
end

local function mark(c, key)
  if not c.written_set[key] then
    c.written_set[key] = true
    c.written[#c.written + 1] = key
  end
end

local function wr(c, command, key, ...)
  mark(c, key)
  return redis.call(command, key, ...)
end

-- Region::add_to_hash_counter: the computed value is written (HGET + HSET, not HINCRBY), so a
-- counter overwritten with text counts as 0 instead of failing the command halfway.
local function hash_counter(c, key, field, delta)
  if delta ~= 0 then
    local current = parse_int(redis.call('HGET', key, field) or nil) or 0
    wr(c, 'HSET', key, field, fmt_int(current + delta))
  end
end

local function counter(c, field, delta)
  hash_counter(c, c.k.stats, field, delta)
end

-- Region::touch_type. `known` is the multiplier when the caller already computed it.
local function touch_type(c, gpu_type, book_changes, known)
  if c.demand_before[gpu_type] == nil then
    c.demand_before[gpu_type] = known or demand_multiplier(c.k, gpu_type)
  end
  if book_changes then
    c.books[gpu_type] = true
  end
end

-- Region::list
local function list(c, gpu_id, g, tp)
  local k = c.k
  touch_type(c, g.type, true)
  wr(c, 'ZADD', k.by_score(g.type), g.score or '0', gpu_id)
  if price_source(g, tp) == 'own' then
    -- fmt_price parses back to the same double as the module's micros / 1e6.
    wr(c, 'ZADD', k.own(g.type), fmt_price(g.price), gpu_id)
    counter(c, 'own-sum:' .. g.type, g.price)
  else
    wr(c, 'ZADD', k.typed(g.type), '0', gpu_id)
  end
end

-- Region::unlist
local function unlist(c, gpu_id, gpu_type)
  local k = c.k
  touch_type(c, gpu_type, true)
  wr(c, 'ZREM', k.by_score(gpu_type), gpu_id)
  local score = rd('ZSCORE', k.own(gpu_type), gpu_id)
  if score then
    wr(c, 'ZREM', k.own(gpu_type), gpu_id)
    local s = tonumber(score)
    local micros = 0
    if s and s >= 0 and s <= 1000000 then
      micros = math.floor(s * MICROS + 0.5)
    end
    counter(c, 'own-sum:' .. gpu_type, -micros)
  elseif rd('ZSCORE', k.typed(gpu_type), gpu_id) then
    wr(c, 'ZREM', k.typed(gpu_type), gpu_id)
  end
end

local function registry_entry(g)
  local entry = g.status .. ' ' .. g.type .. ' ' .. g.provider
  if g.booking then
    entry = entry .. ' ' .. g.booking
  end
  return entry
end

-- Region::store_gpu for a change that keeps the GPU's provider, type, price and attributes
-- (BOOK, CANCEL, STATUS): the record's changed fields, the fields it dropped, its expiry
-- (`expire_at` nil: none, PERSIST), registry, status counters, availability index.
local function store_gpu(c, gpu_id, old, new, provider, tp, expire_at)
  local k = c.k
  local key = k.gpu(gpu_id)
  local fields = changed_fields(old, new)
  if #fields > 0 then
    wr(c, 'HSET', key, unpack(fields))
  end
  local dropped = dropped_fields(old, new)
  if #dropped > 0 then
    wr(c, 'HDEL', key, unpack(dropped))
  end
  if expire_at then
    wr(c, 'PEXPIREAT', key, fmt_int(expire_at))
  else
    -- A record that existed may carry a TTL from when it was idle.
    wr(c, 'PERSIST', key)
  end
  if old.status ~= new.status or old.booking ~= new.booking then
    wr(c, 'HSET', k.registry, gpu_id, registry_entry(new))
  end
  if old.status ~= new.status then
    counter(c, 'gpus:' .. old.status, -1)
    counter(c, 'gpus:' .. new.status, 1)
  end
  local was_listed = is_listed(old.status, provider)
  local now_listed = is_listed(new.status, provider)
  if was_listed and now_listed then
    return
  end
  if was_listed then
    unlist(c, gpu_id, old.type)
  end
  if now_listed then
    list(c, gpu_id, new, tp)
  end
end

-- Region::record_booking: the rolling 24-hour window. Market state: no TTL (a window written
-- by an earlier version still has one, which goes).
local function record_booking(c, now, cost_micros)
  local key = c.k.window
  local bucket = math.floor(now / BUCKET_MS)
  local stale = {}
  if rd('HLEN', key) > 2 * (BUCKETS + 8) then
    local fields = rd('HKEYS', key)
    for i = 1, #fields do
      local b = parse_int(string.match(fields[i], '^[^:]*:(.*)$'))
      if b and (b < bucket - BUCKETS + 1 or b > bucket) then
        stale[#stale + 1] = fields[i]
      end
    end
  end
  hash_counter(c, key, 'count:' .. fmt_int(bucket), 1)
  hash_counter(c, key, 'volume:' .. fmt_int(bucket), cost_micros)
  if #stale > 0 then
    wr(c, 'HDEL', key, unpack(stale))
  end
  if redis.call('PTTL', key) >= 0 then
    wr(c, 'PERSIST', key)
  end
end

-- Region::next_seq: the region's sequence orders own against type prices and numbers every
-- record version; a hand-edited sequence is refused rather than restarted. A missing one
-- resumes where the event stream's newest entry recorded it (Region::lost_seq_floor); a region
-- with state and no such record is refused (the module also queues a repair there, which a
-- script cannot). `read_seq` reads and checks it before the first write; `next_seq` draws.
local function read_seq(c)
  if c.seq then
    return c.seq
  end
  local k = c.k
  local seq_text = rd('HGET', k.stats, 'seq')
  local seq
  if seq_text then
    seq = parse_int(seq_text)
    if not seq then
      corrupt(k.stats)
    end
  else
    if redis.call('TYPE', k.events).ok == 'stream' then
      local last = redis.call('XREVRANGE', k.events, '+', '-', 'COUNT', '1')[1]
      local f = last and last[2] or {}
      for i = 1, #f - 1, 2 do
        if f[i] == 'seq' then
          seq = parse_int(f[i + 1])
          if seq then
            break
          end
        end
      end
    end
    if not seq then
      if has_market_state(k) then
        fail("CORRUPT the sequence of region '" .. k.region .. "' is lost (" .. k.stats
          .. " has no 'seq' and the event stream records none); a repair is queued, or run GPUCACHE.REPAIR "
          .. k.region)
      end
      seq = 0
    end
  end
  c.seq = seq
  return seq
end

local function next_seq(c)
  local seq = read_seq(c) + 1
  c.seq = seq
  wr(c, 'HSET', c.k.stats, 'seq', fmt_int(seq))
  return seq
end

-- Events -------------------------------------------------------------------------------------

-- An event with the module's fields (src/core/events.rs). `old`/`new` hold changed values only.
local function new_event(kind, region, ts)
  return {type = kind, region = region, ts_ms = ts, old = {}, new = {}}
end

local function changed(e, name, old, new)
  if old ~= new then
    e.old[name] = old
    e.new[name] = new
  end
end

-- Region::append_event: `type`, then the region's sequence as it stands after the command
-- (`seq`, left out while it is unreadable), then the JSON payload. The module trims the stream
-- to exactly its current length instead of `~ stream_maxlen` when memory is tight (>= 95 % of
-- maxmemory used); a script cannot read that ratio, so the twin always trims `~ stream_maxlen`
-- (loadgen verify does not run under memory pressure).
local function append_event(c, e)
  if next(e.old) == nil then
    e.old = nil
  end
  if next(e.new) == nil then
    e.new = nil
  end
  if c.seq == nil then
    c.seq = parse_int(redis.call('HGET', c.k.stats, 'seq') or nil) or false
  end
  local events, maxlen = c.k.events, fmt_int(CFG.stream_maxlen)
  if c.seq then
    wr(c, 'XADD', events, 'MAXLEN', '~', maxlen, '*', 'type', e.type, 'seq', fmt_int(c.seq),
      'payload', cjson.encode(e))
  else
    wr(c, 'XADD', events, 'MAXLEN', '~', maxlen, '*', 'type', e.type, 'payload', cjson.encode(e))
  end
end

local function sorted_keys(t)
  local names = {}
  for name in pairs(t) do
    names[#names + 1] = name
  end
  table.sort(names)
  return names
end

-- Region::publish + publish_derived: the command's event (listing the keys written, minus the
-- stream and the internal indexes), then a `pricing_updated` event per type whose demand
-- multiplier moved and an `order_book_updated` event per type whose availability index changed.
-- (The module also fires module keyspace events on each written key; a script cannot, the
-- native commands' own keyspace events stand in for them.)
local function publish(c, e)
  local k = c.k
  local internal = {
    [k.events] = true, [k.registry] = true, [k.types] = true, [k.providers] = true,
    [k.bookings] = true, [k.booking_ends] = true, [k.window] = true,
  }
  local keys = {}
  for i = 1, #c.written do
    if not internal[c.written[i]] then
      keys[#keys + 1] = c.written[i]
    end
  end
  e.keys = keys
  append_event(c, e)
  local ts = e.ts_ms
  local types = sorted_keys(c.demand_before)
  for i = 1, #types do
    local gpu_type = types[i]
    local old = c.demand_before[gpu_type]
    local new = demand_multiplier(k, gpu_type)
    if new ~= old then
      local p = new_event('pricing_updated', c.region, ts)
      p.reason = 'demand'
      p.gpu_type = gpu_type
      changed(p, 'multiplier', fmt_hundredths(old), fmt_hundredths(new))
      p.keys = {k.price(gpu_type)}
      append_event(c, p)
      c.books[gpu_type] = true
    end
  end
  local books = sorted_keys(c.books)
  for i = 1, #books do
    local o = new_event('order_book_updated', c.region, ts)
    o.gpu_type = books[i]
    o.keys = {k.order_book(books[i])}
    append_event(c, o)
  end
end

-- A reply: a flat field/value array, as the module's reply map is in RESP2. Called with
-- name, value, name, value, ... in the module's field order (alphabetical: its reply map is a
-- BTreeMap); a nil value leaves its field out, `false` is a nil reply.
local function reply(...)
  local args = {...}
  local out = {}
  for i = 1, select('#', ...), 2 do
    if args[i + 1] ~= nil then
      out[#out + 1] = args[i]
      out[#out + 1] = args[i + 1]
    end
  end
  return out
end

-- Bookings ending ----------------------------------------------------------------------------

-- Region::held_gpu: the GPU `booking_id` holds, if that booking is the one holding it, with
-- what releasing it needs, read and checked before the first write. `c` is the change that will
-- release it: a GPU to be listed again has its type's demand multiplier read now.
local function held_gpu(c, gpu_id, booking_id)
  local k = c.k
  local g = load_gpu(k, gpu_id)
  if not (g and g.booking == booking_id) then
    return nil
  end
  -- check_gpu_key_types: the GPU record, provider, type price and (when listed again) the
  -- own/type-price indexes are read first.
  expect_type(k.by_score(g.type), 'zset')
  expect_type(k.provider_gpus(g.provider), 'set')
  local held = {gpu = g, provider = provider_status(k, g.provider), tp = load_type_price(k, g.type)}
  if held.provider == 'online' then
    touch_type(c, g.type, false)
  else
    expect_type(k.own(g.type), 'zset')
    expect_type(k.typed(g.type), 'zset')
  end
  return held
end

-- Region::release: the GPU is available again (listed if its provider is online) with a fresh
-- TTL and without its booking's terms; the change goes on `e`.
local function release(c, gpu_id, held, version, now, e)
  local old = held.gpu
  local new = copy(old)
  new.status = 'available'
  new.booking = nil
  new.terms = nil
  new.version = version
  new.updated_ms = now
  store_gpu(c, gpu_id, old, new, held.provider, held.tp, gpu_expire_at(now))
  e.gpu_type = new.type
  e.provider_id = new.provider
  e.version = version
  changed(e, 'status', old.status, new.status)
  changed(e, 'listed', false, is_listed(new.status, held.provider))
  return new
end

-- Region::close_booking, in two steps: `prepare_close` reads and checks everything (refusals
-- happen here), `finish_close` writes. Its record, registry entry and place on the booking
-- clock go, and the GPU it holds (if this booking is the one holding it) is released; one
-- `booking_cancelled` event with `reason`.
local function prepare_close(k, booking_id, booking)
  guard_region(k)
  local c = new_change(k, k.region)
  local held = held_gpu(c, booking.gpu, booking_id)
  if held then
    read_seq(c)
  end
  return {c = c, booking_id = booking_id, booking = booking, held = held}
end

local function finish_close(plan, reason, counter_field)
  local c, k, booking_id, booking, held = plan.c, plan.c.k, plan.booking_id, plan.booking, plan.held
  local now = now_ms()
  local version = held and next_seq(c)
  wr(c, 'DEL', k.booking(booking_id))
  wr(c, 'HDEL', k.bookings, booking_id)
  wr(c, 'ZREM', k.booking_ends, booking_id)
  local e = new_event('booking_cancelled', k.region, now)
  e.reason = reason
  e.gpu_id = booking.gpu
  e.booking_id = booking_id
  e.user_id = booking.user
  local released = held and release(c, booking.gpu, held, version, now, e)
  counter(c, counter_field, 1)
  publish(c, e)
  return released
end

-- The booking as the GPU holding it records it, when its own record is gone
-- (booking_clock::terms_on_holder).
local function terms_on_holder(k, booking_id)
  local gpu_id = rd('HGET', k.bookings, booking_id)
  if not gpu_id then
    return nil
  end
  local g = load_gpu(k, gpu_id)
  if g and g.booking == booking_id and g.terms then
    return booking_of_terms(gpu_id, g)
  end
  return nil
end

-- booking_clock::settle_ended: ends `booking_id` if its time is up (as CANCEL would, reason
-- `ended`) before a BOOK reuses its id or books its GPU. Returns whether it was ended.
local function settle_ended(k, booking_id, now)
  local booking = load_booking(k, booking_id) or terms_on_holder(k, booking_id)
  if not booking or booking.end_ms > now then
    return false
  end
  finish_close(prepare_close(k, booking_id, booking), 'ended', 'bookings:ended')
  return true
end
