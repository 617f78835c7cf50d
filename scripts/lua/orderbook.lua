#!lua flags=no-writes
-- GPUCACHE.ORDERBOOK region gpu_type [DEPTH n], as a read-only script (load after common.lua;
-- the shebang line must come first, so loadgen moves it to the top).
--   EVALSHA <sha> 1 <region> <gpu_type> [DEPTH n]
-- Same reads and reply as src/commands/orderbook.rs: level by level from the own-price index
-- (ZRANGE BYSCORE LIMIT 0 1 WITHSCORES + ZCOUNT per level) plus the type-price level.
return run(function()
  arity('gpucache.orderbook', 2, 6)
  local region = arg_region(KEYS[1])
  local gpu_type = arg_id('GPU type', ARGV[1])
  local depth = nil
  local i = 2
  while ARGV[i] do
    if string.upper(ARGV[i]) ~= 'DEPTH' then
      fail("ERR unknown option '" .. shown(ARGV[i], 64) .. "'")
    end
    if ARGV[i + 1] == nil then
      fail('ERR option DEPTH needs a value')
    end
    local value = arg_integer('DEPTH', ARGV[i + 1], 1, 1000)
    if depth then
      fail('ERR option DEPTH given twice')
    end
    depth = value
    i = i + 2
  end
  depth = depth or 10
  local k = region_keys(region)

  local listed, total = type_counts(k, gpu_type)
  local multiplier = multiplier_of(listed, total)
  local own = k.own(gpu_type)
  local levels = {}
  local lower = '0'
  while #levels < depth do
    local first = rd('ZRANGE', own, lower, '+inf', 'BYSCORE', 'LIMIT', '0', '1', 'WITHSCORES')
    if #first < 2 then
      break
    end
    local score = first[2]
    local count = rd('ZCOUNT', own, score, score)
    local s = tonumber(score)
    if not s or s ~= s or s < 0 or s > 1000000 then
      break
    end
    levels[#levels + 1] = {math.floor(s * MICROS + 0.5), count}
    lower = '(' .. score
  end
  local tp = load_type_price(k, gpu_type)
  if tp then
    local typed = rd('ZCARD', k.typed(gpu_type))
    if typed > 0 then
      local merged = false
      for i = 1, #levels do
        if levels[i][1] == tp.price then
          levels[i][2] = levels[i][2] + typed
          merged = true
          break
        end
      end
      if not merged then
        levels[#levels + 1] = {tp.price, typed}
      end
    end
  end
  table.sort(levels, function(a, b) return a[1] < b[1] end)
  local asks = {}
  for i = 1, math.min(depth, #levels) do
    asks[i] = reply('gpus', levels[i][2], 'price', fmt_price(apply_multiplier(levels[i][1], multiplier)))
  end
  -- (The module reads the two index sizes and the type total a second time here.)
  return reply('asks', asks, 'demand_multiplier', fmt_hundredths(multiplier), 'gpus_listed', listed,
    'gpus_total', total, 'type', gpu_type)
end)
