#!lua
-- GPUCACHE.CANCEL region booking_id, as a script (load after common.lua).
--   EVALSHA <sha> 1 <region> <booking_id>
-- Same reads, writes, stream events and replies as src/commands/book.rs::cancel
-- (Region::close_booking): a booking whose time is up is over, even in the moment before the
-- module's booking clock ends it.
return run(function()
  arity('gpucache.cancel', 2, 2)
  local region = arg_region(KEYS[1])
  local booking_id = arg_id('booking id', ARGV[1])
  local k = region_keys(region)

  local booking = load_booking(k, booking_id)
  if not booking or booking.end_ms <= now_ms() then
    fail("NOBOOKING no such booking '" .. booking_id .. "'")
  end
  -- The GPU is released only if this booking is the one holding it.
  local gpu = finish_close(prepare_close(k, booking_id, booking), 'cancelled', 'bookings:cancelled')
  return reply('booking_id', booking_id, 'gpu_id', booking.gpu,
    'gpu_status', gpu and gpu.status or false, 'gpu_version', gpu and gpu.version or nil)
end)
