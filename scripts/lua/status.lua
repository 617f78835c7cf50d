#!lua
-- GPUCACHE.STATUS region gpu_id available|busy|offline|maintenance, as a script (load after
-- common.lua).
--   EVALSHA <sha> 1 <region> <gpu_id> <status>
-- Same reads, writes, stream events and replies as src/commands/status.rs.
return run(function()
  arity('gpucache.status', 3, 3)
  local region = arg_region(KEYS[1])
  local gpu_id = arg_id('gpu id', ARGV[1])
  local target = arg_status(ARGV[2])
  local k = region_keys(region)

  local old = require_gpu(k, gpu_id)
  -- The state machine (core::status::check_manual_transition).
  if old.booking and target ~= old.status then
    fail("BADSTATE GPU has active booking '" .. old.booking .. "': cancel it before setting " .. target)
  end
  -- busy is never set by hand, not even on a GPU that is busy already.
  if target == 'busy' then
    fail('BADSTATE a GPU becomes busy only through GPUCACHE.BOOK')
  end
  if old.status == target then
    return reply('gpu_id', gpu_id, 'result', 'unchanged', 'status', target, 'version', old.version)
  end
  -- Guards for the keys written before (or without) being read; the GPU, provider and type
  -- price are read first.
  guard_region(k)
  expect_type(k.by_score(old.type), 'zset')
  expect_type(k.provider_gpus(old.provider), 'set')
  local provider = provider_status(k, old.provider)
  local tp = load_type_price(k, old.type)
  local c = new_change(k, region)
  if is_listed(old.status, provider) ~= is_listed(target, provider) then
    -- Its listing changes: the type's demand multiplier before the change (this reads the
    -- counters and the own/type-price indexes).
    touch_type(c, old.type, false)
  else
    expect_type(k.own(old.type), 'zset')
    expect_type(k.typed(old.type), 'zset')
  end

  local now = now_ms()
  local new = copy(old)
  new.status = target
  new.version = next_seq(c)
  new.updated_ms = now
  store_gpu(c, gpu_id, old, new, provider, tp, gpu_expire_at(now))

  local e = new_event('gpu_availability_changed', region, now)
  e.reason = 'status'
  e.gpu_id = gpu_id
  e.gpu_type = new.type
  e.provider_id = new.provider
  e.version = new.version
  changed(e, 'status', old.status, new.status)
  changed(e, 'listed', is_listed(old.status, provider), is_listed(new.status, provider))
  publish(c, e)
  return reply('gpu_id', gpu_id, 'result', 'changed', 'status', target, 'version', new.version)
end)
