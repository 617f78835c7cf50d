#!lua flags=no-writes
-- GPUCACHE.GET region gpu_id, as a read-only script (load after common.lua; the shebang line
-- must come first, so loadgen moves it to the top).
--   EVALSHA <sha> 1 <region> <gpu_id>
-- Same reads and reply as src/commands/get.rs.
return run(function()
  arity('gpucache.get', 2, 2)
  local region = arg_region(KEYS[1])
  local gpu_id = arg_id('gpu id', ARGV[1])
  local k = region_keys(region)

  local g = require_gpu(k, gpu_id)
  local provider = provider_status(k, g.provider)
  local tp = load_type_price(k, g.type)
  local base, source = base_price(g, tp)
  local multiplier = demand_multiplier(k, g.type)
  -- The record carries its booking's terms; one written before it did reads the booking.
  local b = {}
  if g.terms then
    b = g.terms
  elseif g.booking then
    b = load_booking(k, g.booking) or {}
  end
  local ttl = rd('PTTL', k.gpu(gpu_id))
  if ttl < 0 then
    ttl = nil
  end
  return reply(
    'base_price', fmt_price(base),
    'booking_end_ms', b.end_ms,
    'booking_id', g.booking or false,
    'booking_price', b.price and fmt_price(b.price),
    'booking_user', b.user,
    'cores', g.cores,
    'demand_multiplier', fmt_hundredths(multiplier),
    'gpu_id', gpu_id,
    'listed', is_listed(g.status, provider) and 1 or 0,
    'memory_gb', g.memory_gb,
    'own_price', fmt_price(g.price),
    'price', fmt_price(apply_multiplier(base, multiplier)),
    'price_source', source,
    'provider', g.provider,
    'provider_status', provider,
    'region', region,
    'score', g.score,
    'status', g.status,
    'ttl_ms', ttl,
    'type', g.type,
    'updated_ms', g.updated_ms,
    'version', g.version)
end)
