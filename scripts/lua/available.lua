#!lua flags=no-writes
-- GPUCACHE.AVAILABLE region [SORT PRICE|SCORE] [LIMIT n], as a read-only script (load after
-- common.lua; the shebang line must come first, so loadgen moves it to the top).
--   EVALSHA <sha> 1 <region> [SORT PRICE|SCORE] [LIMIT n]
-- Same reads and reply as src/commands/available.rs without filters: per type the demand
-- multiplier and type price, then its indexes walked in pages and merged lazily by the price
-- each entry shows (SORT PRICE: own-price and type-price sets, ZRANGE BYSCORE LIMIT WITHSCORES)
-- or by its score (SORT SCORE: the score set, best score first and each score's GPUs in
-- ascending id order), a GPU record (and, once per provider, its provider) read only when its
-- entry comes out on top. TYPE, MAXPRICE, MINMEMORY and MINCORES are not implemented here.
return run(function()
  arity('gpucache.available', 1, 15)
  local region = arg_region(KEYS[1])
  local limit = 100
  local by_score = false
  local given = {}
  local i = 1
  while i <= #ARGV do
    local name, value = ARGV[i], ARGV[i + 1]
    local upper = string.upper(name)
    local known = upper == 'TYPE' or upper == 'MAXPRICE' or upper == 'MINMEMORY'
      or upper == 'MINCORES' or upper == 'SORT' or upper == 'LIMIT'
    if value == nil then
      if known then
        fail('ERR option ' .. string.upper(shown(name, 64)) .. ' needs a value')
      end
      fail("ERR unknown option '" .. shown(name, 64) .. "'")
    end
    if upper == 'LIMIT' then
      limit = arg_integer('LIMIT', value, 1, 10000)
    elseif upper == 'SORT' then
      local sort = string.upper(value)
      if sort ~= 'PRICE' and sort ~= 'SCORE' then
        fail('ERR SORT must be PRICE or SCORE')
      end
      by_score = sort == 'SCORE'
    elseif known then
      fail('ERR option ' .. upper .. ' is not implemented by the Lua equivalent')
    else
      fail("ERR unknown option '" .. shown(name, 64) .. "'")
    end
    if given[upper] then
      fail('ERR option ' .. upper .. ' given twice')
    end
    given[upper] = true
    i = i + 2
  end
  local k = region_keys(region)
  -- No MAXPRICE: the highest price the module accepts, x100 (its default bound).
  local max_price = MAX_PRICE_MICROS * 100
  local page = math.min(math.max(limit, 8), 1000)

  -- Per type its multiplier and type price, and one walk per index: the own-price set (ranked
  -- by the price its score shows) and the type-price set (all at the type price).
  local contexts, sources = {}, {}
  local types = rd('SMEMBERS', k.types)
  for t = 1, #types do
    local gpu_type = types[t]
    local context = {multiplier = demand_multiplier(k, gpu_type), tp = load_type_price(k, gpu_type)}
    contexts[gpu_type] = context
    if by_score then
      -- One walk per type, best score first: `upper` bounds the scores not walked yet, `tie` is
      -- the score being walked (its GPUs ascending by id, in pages).
      sources[#sources + 1] = {
        key = k.by_score(gpu_type), by_score = true, upper = '+inf', tie = nil,
        offset = 0, exhausted = true, buffer = {}, at = 1,
      }
    else
      local max_base = math.floor(max_price * 100 / math.max(context.multiplier, 1)) + 1
      sources[#sources + 1] = {
        key = k.own(gpu_type), min = '0', max = fmt_price(max_base), multiplier = context.multiplier,
        offset = 0, exhausted = false, buffer = {}, at = 1,
      }
      if context.tp then
        local shown = apply_multiplier(context.tp.price, context.multiplier)
        if shown <= max_price then
          sources[#sources + 1] = {
            key = k.typed(gpu_type), min = '0', max = '0', shown = shown,
            offset = 0, exhausted = false, buffer = {}, at = 1,
          }
        end
      end
    end
  end

  -- The next entry of a score walk and its rank (the score, negated: best first). The walk
  -- takes one score at a time (ZRANGE REV LIMIT 0 1 for the next lower score), then that score's
  -- GPUs ascending (ZRANGE <s> <s> BYSCORE LIMIT), so ties come out by GPU id as the module's.
  local function next_score_entry(source)
    while true do
      local gpu_id = source.buffer[source.at]
      if gpu_id then
        local score = tonumber(source.buffer[source.at + 1]) or 0
        source.at = source.at + 2
        source.head = {-score, gpu_id}
        return
      end
      if source.exhausted then
        local first = rd('ZRANGE', source.key, source.upper, '-inf', 'BYSCORE', 'REV', 'LIMIT',
          '0', '1', 'WITHSCORES')
        if #first < 2 then
          source.head = nil
          return
        end
        source.tie, source.upper = first[2], '(' .. first[2]
        source.offset, source.exhausted = 0, false
      end
      local batch = rd('ZRANGE', source.key, source.tie, source.tie, 'BYSCORE', 'LIMIT',
        fmt_int(source.offset), fmt_int(page), 'WITHSCORES')
      local n = #batch / 2
      source.exhausted = n < page
      source.offset = source.offset + n
      source.buffer, source.at = batch, 1
    end
  end

  -- The next entry of a walk and its rank (the price it shows), fetching a page when needed.
  local function next_entry(source)
    if source.by_score then
      return next_score_entry(source)
    end
    if source.at > #source.buffer and not source.exhausted then
      local batch = rd('ZRANGE', source.key, source.min, source.max, 'BYSCORE', 'LIMIT',
        fmt_int(source.offset), fmt_int(page), 'WITHSCORES')
      local n = #batch / 2
      source.exhausted = n < page
      source.offset = source.offset + n
      source.buffer, source.at = batch, 1
    end
    local gpu_id = source.buffer[source.at]
    if not gpu_id then
      source.head = nil
      return
    end
    local score = tonumber(source.buffer[source.at + 1])
    source.at = source.at + 2
    local rank = source.shown
    if not rank then
      local base = 0
      if score and score >= 0 and score <= 1000000 then
        base = math.floor(score * MICROS + 0.5)
      end
      rank = apply_multiplier(base, source.multiplier)
    end
    source.head = {rank, gpu_id}
  end

  -- Merge the walks lazily (available.rs::merged_offers): take the lowest (rank, GPU id, walk)
  -- head, advance its walk, and read the record only then, until LIMIT GPUs pass. GPU ids
  -- compare in byte order (bench.sh runs redis-server with LC_ALL=C).
  for i = 1, #sources do
    next_entry(sources[i])
  end
  local offers, online = {}, {}
  while #offers < limit do
    local best
    for i = 1, #sources do
      local head = sources[i].head
      if head and (not best or head[1] < best[1] or (head[1] == best[1] and head[2] < best[2])) then
        best = head
        best.source = i
      end
    end
    if not best then
      break
    end
    next_entry(sources[best.source])
    local gpu_id = best[2]
    -- A record that expired a moment ago (or is corrupt) is skipped.
    local ok, g = pcall(load_gpu, k, gpu_id)
    if ok and g then
      local is_online = online[g.provider]
      if is_online == nil then
        is_online = provider_status(k, g.provider) == 'online'
        online[g.provider] = is_online
      end
      local context = contexts[g.type]
      if is_online and g.status == 'available' and context then
        local price = apply_multiplier((base_price(g, context.tp)), context.multiplier)
        if price <= max_price then
          offers[#offers + 1] = {gpu_id = gpu_id, price = price, g = g}
        end
      end
    end
  end
  local rows = {}
  for j = 1, math.min(limit, #offers) do
    local o = offers[j]
    rows[j] = reply('cores', o.g.cores, 'gpu_id', o.gpu_id, 'memory_gb', o.g.memory_gb,
      'price', fmt_price(o.price), 'provider', o.g.provider, 'score', o.g.score, 'type', o.g.type,
      'version', o.g.version)
  end
  return rows
end)
