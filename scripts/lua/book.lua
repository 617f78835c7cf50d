#!lua
-- GPUCACHE.BOOK region gpu_id booking_id user_id duration_s, as a script (load after common.lua).
--   EVALSHA <sha> 1 <region> <gpu_id> <booking_id> <user_id> <duration_s>
-- Same reads, writes, stream events and replies as src/commands/book.rs::book.

-- heal::settle_vanished + heal_booking: the booking record of this id is gone but the booking
-- registry still lists it (deleted by hand, or an expiry from an earlier version that the
-- module's healing has not handled yet): repair it first. The GPU holding it keeps a copy of
-- its terms: the booking is rebuilt from them (or ended, if its time is up); without a copy
-- (a record written before copies were kept) the booking ends and its GPU is released. Like
-- the module, leaves it alone when a key holds a foreign type, a record is corrupt or the
-- region's counters are gone (the module logs it and queues a repair of the region).
local function settle_vanished_booking(k, booking_id)
  if not type_ok(k.bookings, 'hash') then
    return
  end
  local gpu_id = redis.call('HGET', k.bookings, booking_id)
  if not gpu_id or redis.call('EXISTS', k.booking(booking_id)) == 1 then
    return
  end
  local ok, plan = pcall(function()
    guard_region(k)
    local now = now_ms()
    local g = load_gpu(k, gpu_id)
    if g and g.booking == booking_id and g.terms then
      local booking = booking_of_terms(gpu_id, g)
      if booking.end_ms <= now then
        return {close = prepare_close(k, booking_id, booking)}
      end
      return {rebuild = booking}
    end
    local c = new_change(k, k.region)
    local held = held_gpu(c, gpu_id, booking_id)
    if held then
      read_seq(c)
    end
    return {c = c, held = held, now = now}
  end)
  if not ok then
    if type(plan) == 'table' and plan.fail then
      return
    end
    error(plan, 0)
  end
  if plan.close then
    finish_close(plan.close, 'ended', 'bookings:ended')
  elseif plan.rebuild then
    -- heal::rebuild_booking: the record and its place on the booking clock, from the terms.
    local b = plan.rebuild
    local c = new_change(k, k.region)
    wr(c, 'HSET', k.booking(booking_id), unpack(booking_fields(b)))
    wr(c, 'ZADD', k.booking_ends, fmt_int(b.end_ms), booking_id)
    local e = new_event('booking_created', k.region, now_ms())
    e.reason = 'rebuilt'
    e.gpu_id = b.gpu
    e.booking_id = booking_id
    e.user_id = b.user
    e.new.end_ms = b.end_ms
    publish(c, e)
  else
    local c, held, now = plan.c, plan.held, plan.now
    local version = held and next_seq(c)
    wr(c, 'HDEL', k.bookings, booking_id)
    wr(c, 'ZREM', k.booking_ends, booking_id)
    mark(c, k.booking(booking_id))
    counter(c, 'bookings:ended', 1)
    local e = new_event('booking_cancelled', k.region, now)
    e.reason = 'ended'
    e.booking_id = booking_id
    e.gpu_id = gpu_id
    if held then
      release(c, gpu_id, held, version, now, e)
    end
    publish(c, e)
  end
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
  local now = now_ms()
  local existing = load_booking(k, booking_id)
  if not existing then
    -- Its record may have vanished with the booking still active: the repair rebuilds it from
    -- its GPU's copy of the terms (or ends it); what it leaves is what this id names.
    settle_vanished_booking(k, booking_id)
    existing = load_booking(k, booking_id)
  end
  if existing and existing.end_ms > now then
    -- A repeated request is idempotent; the same id for anything else is refused.
    if existing.gpu ~= gpu_id or existing.user ~= user_id or existing.duration_s ~= duration_s then
      fail("BOOKINGEXISTS booking id '" .. booking_id .. "' is already used for GPU '"
        .. existing.gpu .. "' by user '" .. existing.user .. "'")
    end
    local g = load_gpu(k, gpu_id)
    return (booking_reply(existing, 'existing', g and g.version or 0))
  end
  -- (The module refuses BOOK here under an allkeys-* eviction policy unless
  -- gpucache.accept-eviction-risk is set; a script cannot read the server's configuration, so
  -- the twin books regardless. loadgen verify runs without such a policy.)
  -- A booking whose time is up but which the booking clock has not ended yet: ended first, so
  -- the id can be reused and the GPU it held is free.
  if existing then
    settle_ended(k, booking_id, now)
  end
  local old = require_gpu(k, gpu_id)
  if old.booking and settle_ended(k, old.booking, now) then
    old = require_gpu(k, gpu_id)
  end
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
  expect_type(k.by_score(old.type), 'zset')
  expect_type(k.provider_gpus(old.provider), 'set')
  local tp = load_type_price(k, old.type)
  -- Charged what the GPU shows now, demand multiplier included.
  local multiplier = demand_multiplier(k, old.type)
  local price = apply_multiplier((base_price(old, tp)), multiplier)
  local c = new_change(k, region)
  touch_type(c, old.type, false, multiplier)

  -- Validation is over: from here on every step writes.
  local booking = {
    gpu = gpu_id, user = user_id, price = price, duration_s = duration_s,
    start_ms = now, end_ms = now + duration_s * 1000, gpu_type = old.type, provider = old.provider,
  }
  local version = next_seq(c)
  -- Market state: no TTL. The module's booking clock ends it at `end_ms`.
  wr(c, 'HSET', booking_key, unpack(booking_fields(booking)))
  wr(c, 'HSET', k.bookings, booking_id, gpu_id)
  wr(c, 'ZADD', k.booking_ends, fmt_int(booking.end_ms), booking_id)
  local new = copy(old)
  new.status = 'busy'
  new.booking = booking_id
  new.terms = {
    user = user_id, price = price, duration_s = duration_s, start_ms = now, end_ms = booking.end_ms,
  }
  new.version = version
  new.updated_ms = now
  -- A booked GPU's record has no TTL.
  store_gpu(c, gpu_id, old, new, provider, tp, nil)
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
