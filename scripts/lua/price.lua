#!lua
-- GPUCACHE.PRICE region gpu_type price, as a script (load after common.lua).
--   EVALSHA <sha> 1 <region> <gpu_type> <price>
-- Same reads, writes, stream events and replies as src/commands/price.rs: the type price is
-- stored once with a region sequence number; listed own-priced GPUs of the type move to the
-- type-price set with one ZUNIONSTORE.
return run(function()
  arity('gpucache.price', 3, 3)
  local region = arg_region(KEYS[1])
  local gpu_type = arg_id('GPU type', ARGV[1])
  local price = arg_price(ARGV[2])
  local k = region_keys(region)

  local price_key = k.price(gpu_type)
  local own = k.own(gpu_type)
  local typed = k.typed(gpu_type)
  -- Guards for the keys written before (or without) being read; the type price, both indexes
  -- and the counters are read first.
  guard_region(k)
  local old = load_type_price(k, gpu_type)
  local moved = rd('ZCARD', own)
  local already_typed = rd('ZCARD', typed)

  local c = new_change(k, region)
  -- Listed GPUs of the type move within its order book (their shown price changes).
  if moved + already_typed > 0 then
    touch_type(c, gpu_type, true, multiplier_of(moved + already_typed, stat_int(k, 'type-total:' .. gpu_type)))
  end
  local now = now_ms()
  local seq = next_seq(c)
  local version = seq
  wr(c, 'HSET', price_key, 'price', fmt_price(price), 'seq', fmt_int(seq),
    'version', fmt_int(version), 'updated_ms', fmt_int(now))
  wr(c, 'PEXPIREAT', price_key, fmt_int(pricing_expire_at(now)))
  wr(c, 'SADD', k.types, gpu_type)
  if moved > 0 then
    wr(c, 'ZUNIONSTORE', typed, '2', typed, own, 'WEIGHTS', '0', '0')
    wr(c, 'DEL', own)
    wr(c, 'HDEL', k.stats, 'own-sum:' .. gpu_type)
  end

  local e = new_event('pricing_updated', region, now)
  e.gpu_type = gpu_type
  e.version = version
  changed(e, 'price', old and fmt_price(old.price) or cjson.null, fmt_price(price))
  publish(c, e)
  return reply('listed_gpus', moved + already_typed, 'price', fmt_price(price), 'type', gpu_type,
    'version', version)
end)
