#!lua
-- GPUCACHE.BOOK region gpu_id booking_id user_id duration_s, as a script (load after common.lua).
--   EVALSHA <sha> 1 <region> <gpu_id> <booking_id> <user_id> <duration_s>
-- Same reads, writes, stream events and replies as src/commands/book.rs::book.

-- heal::settle_vanished + heal_booking: the booking record of this id is gone but the booking
-- registry still lists it (it ended a moment ago and the module's healing timer has not run,
-- or the record vanished without an event): repair it first, releasing its GPU, so the id can
-- be reused. Like the module, leaves it alone when a key holds a foreign type or a record is
-- corrupt.
local function settle_ended_booking(k, region, booking_id, gpu_id)
  local base = {
    {k.providers, 'set'}, {k.window, 'hash'}, {k.registry, 'hash'}, {k.types, 'set'},
    {k.stats, 'hash'}, {k.events, 'stream'},
  }
  for i = 1, #base do
    if not type_ok(base[i][1], base[i][2]) then
      return
    end
  end
  local ok, gpu, provider, tp = pcall(function()
    local g = load_gpu(k, gpu_id)
    if not (g and g.booking == booking_id) then
      return nil
    end
    local checks = {
      {k.gpu(gpu_id), 'hash'}, {k.own(g.type), 'zset'}, {k.typed(g.type), 'zset'},
      {k.by_score(g.type), 'zset'}, {k.price(g.type), 'hash'}, {k.provider(g.provider), 'hash'},
      {k.provider_gpus(g.provider), 'set'},
    }
    for i = 1, #checks do
      expect_type(checks[i][1], checks[i][2])
    end
    return g, provider_status(k, g.provider), load_type_price(k, g.type)
  end)
  if not ok then
    if type(gpu) == 'table' and gpu.fail then
      return
    end
    error(gpu, 0)
  end
  local now = now_ms()
  local c = new_change(k, region)
  local version = gpu and next_seq(c, k)
  wr(c, 'HDEL', k.bookings, booking_id)
  mark(c, k.booking(booking_id))
  counter(c, 'bookings:ended', 1)
  local e = new_event('booking_cancelled', region, now)
  e.reason = 'ended'
  e.booking_id = booking_id
  e.gpu_id = gpu_id
  if gpu then
    local new = copy(gpu)
    new.status = 'available'
    new.booking = nil
    new.version = version
    new.updated_ms = now
    store_gpu(c, gpu_id, gpu, new, provider, tp, gpu_expire_at(now, nil))
    e.gpu_type = new.type
    e.provider_id = new.provider
    e.version = new.version
    changed(e, 'status', gpu.status, new.status)
    changed(e, 'listed', false, is_listed(new.status, provider))
  end
  publish(c, e)
end

return run(function()
  arity('gpucache.book', 5, 5)
  local region = arg_region(KEYS[1])
  local gpu_id = arg_id('gpu id', ARGV[1])
  local booking_id = arg_id('booking id', ARGV[2])
  local user_id = arg_id('user id', ARGV[3])
  local duration_s = arg_integer('duration_s', ARGV[4], 1, 366 * 24 * 3600)
  local k = region_keys(region)

  local function booking_reply(b, result, gpu_version)
    -- cost = price x hours in micro-units, floored (Booking::cost_micros); split so that it stays
    -- exact in doubles up to 2^53 micro-units.
    local per_hour = math.floor(b.price / 3600)
    local cost = per_hour * b.duration_s + math.floor((b.price - per_hour * 3600) * b.duration_s / 3600)
    return reply('booking_id', booking_id, 'cost', fmt_price(cost), 'duration_s', b.duration_s,
      'end_ms', b.end_ms, 'gpu_id', b.gpu, 'gpu_version', gpu_version, 'price', fmt_price(b.price),
      'result', result, 'start_ms', b.start_ms, 'user_id', b.user), cost
  end

  local booking_key = k.booking(booking_id)
  local existing = load_booking(k, booking_id)
  if existing then
    -- A repeated request is idempotent; the same id for anything else is refused.
    if existing.gpu ~= gpu_id or existing.user ~= user_id or existing.duration_s ~= duration_s then
      fail("BOOKINGEXISTS booking id '" .. booking_id .. "' is already used for GPU '"
        .. existing.gpu .. "' by user '" .. existing.user .. "'")
    end
    local g = load_gpu(k, gpu_id)
    return (booking_reply(existing, 'existing', g and g.version or 0))
  end

  local bookings_ok = type_ok(k.bookings, 'hash')
  if bookings_ok then
    local listed_for = redis.call('HGET', k.bookings, booking_id)
    if listed_for and redis.call('EXISTS', booking_key) == 0 then
      settle_ended_booking(k, region, booking_id, listed_for)
    end
  end

  local old = require_gpu(k, gpu_id)
  local provider = provider_status(k, old.provider)
  if old.status == 'busy' then
    fail("GPUBUSY GPU '" .. gpu_id .. "' is already booked")
  elseif old.status ~= 'available' then
    fail("GPUUNAVAILABLE GPU '" .. gpu_id .. "' is " .. old.status)
  elseif provider ~= 'online' then
    fail("GPUUNAVAILABLE provider of GPU '" .. gpu_id .. "' is " .. provider)
  end
  -- Guards for the keys written before (or without) being read; the booking, GPU, provider,
  -- type price, own/type-price indexes and counters are read first.
  guard_region(k)
  if not bookings_ok then
    wrongtype(k.bookings)
  end
  expect_type(k.events, 'stream')
  expect_type(k.by_score(old.type), 'zset')
  expect_type(k.provider_gpus(old.provider), 'set')
  local tp = load_type_price(k, old.type)
  -- Charged what the GPU shows now, demand multiplier included.
  local multiplier = demand_multiplier(k, old.type)
  local price = apply_multiplier((base_price(old, tp)), multiplier)

  -- Validation is over: from here on every step writes.
  local now = now_ms()
  local booking = {
    gpu = gpu_id, user = user_id, price = price, duration_s = duration_s,
    start_ms = now, end_ms = now + duration_s * 1000,
  }
  local c = new_change(k, region)
  touch_type(c, old.type, false, multiplier)
  local version = next_seq(c, k)
  wr(c, 'HSET', booking_key, 'gpu', gpu_id, 'user', user_id, 'price', fmt_price(price),
    'duration_s', fmt_int(duration_s), 'start_ms', fmt_int(now), 'end_ms', fmt_int(booking.end_ms))
  wr(c, 'PEXPIREAT', booking_key, fmt_int(booking.end_ms))
  wr(c, 'HSET', k.bookings, booking_id, gpu_id)
  local new = copy(old)
  new.status = 'busy'
  new.booking = booking_id
  new.version = version
  new.updated_ms = now
  store_gpu(c, gpu_id, old, new, provider, tp, gpu_expire_at(now, booking.end_ms))
  counter(c, 'bookings:created', 1)
  local result, cost = booking_reply(booking, 'created', new.version)
  record_booking(c, now, cost)

  local e = new_event('booking_created', region, now)
  e.gpu_id = gpu_id
  e.gpu_type = new.type
  e.provider_id = new.provider
  e.booking_id = booking_id
  e.user_id = user_id
  e.version = new.version
  changed(e, 'status', old.status, new.status)
  changed(e, 'listed', true, false)
  e.new.price = fmt_price(price)
  e.new.end_ms = booking.end_ms
  publish(c, e)
  return result
end)
