#!lua
-- GPUCACHE.CANCEL region booking_id, as a script (load after common.lua).
--   EVALSHA <sha> 1 <region> <booking_id>
-- Same reads, writes, stream events and replies as src/commands/book.rs::cancel.
return run(function()
  arity('gpucache.cancel', 2, 2)
  local region = arg_region(KEYS[1])
  local booking_id = arg_id('booking id', ARGV[1])
  local k = region_keys(region)

  local booking_key = k.booking(booking_id)
  local booking = load_booking(k, booking_id)
  if not booking then
    fail("NOBOOKING no such booking '" .. booking_id .. "'")
  end
  -- Guards for the keys written before (or without) being read.
  guard_region(k)
  expect_type(k.bookings, 'hash')
  expect_type(k.events, 'stream')
  local gpu = load_gpu(k, booking.gpu)
  -- The GPU is released only if this booking is the one holding it.
  local held = gpu and gpu.booking == booking_id
  local c = new_change(k, region)
  local provider, tp
  local multiplier_read = false
  if held then
    expect_type(k.by_score(gpu.type), 'zset')
    expect_type(k.provider_gpus(gpu.provider), 'set')
    provider = provider_status(k, gpu.provider)
    tp = load_type_price(k, gpu.type)
    if provider == 'online' then
      -- It will be listed: its type's demand multiplier before the change (this reads the
      -- counters and the own/type-price indexes).
      touch_type(c, gpu.type, false)
      multiplier_read = true
    else
      expect_type(k.own(gpu.type), 'zset')
      expect_type(k.typed(gpu.type), 'zset')
    end
  end
  if not multiplier_read then
    expect_type(k.stats, 'hash')
  end

  local now = now_ms()
  local version = held and next_seq(c, k)
  wr(c, 'DEL', booking_key)
  wr(c, 'HDEL', k.bookings, booking_id)
  local e = new_event('booking_cancelled', region, now)
  e.reason = 'cancelled'
  e.gpu_id = booking.gpu
  e.booking_id = booking_id
  e.user_id = booking.user
  local gpu_status, gpu_version = false, nil
  if held then
    local new = copy(gpu)
    new.status = 'available'
    new.booking = nil
    new.version = version
    new.updated_ms = now
    store_gpu(c, booking.gpu, gpu, new, provider, tp, gpu_expire_at(now, nil))
    e.gpu_type = new.type
    e.provider_id = new.provider
    e.version = new.version
    changed(e, 'status', gpu.status, new.status)
    changed(e, 'listed', false, is_listed(new.status, provider))
    gpu_status, gpu_version = new.status, new.version
  end
  counter(c, 'bookings:cancelled', 1)
  publish(c, e)
  return reply('booking_id', booking_id, 'gpu_id', booking.gpu, 'gpu_status', gpu_status,
    'gpu_version', gpu_version)
end)
