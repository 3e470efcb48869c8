-- Argo CD health of a kubetune.io FineTuneJob (resource.customizations.health.kubetune.io_FineTuneJob).
-- Read from the conditions the operator writes; status.phase only summarises them. Lua 5.1 as
-- Argo CD runs it (gopher-lua): no goto, no integer division. Tested in tests/unit/test_health_checks.py.
--   Succeeded=True -> Healthy; Failed=True -> Degraded ("Reason: message"). A finished job stays so
--   whatever its generation: the operator keeps a finished job's status as it is.
--   status.observedGeneration behind metadata.generation -> Progressing (the operator has not seen the edit).
--   Stalled=True (not finished: pods that cannot start until a person acts, e.g. a missing PVC or
--   PriorityClass, an image that cannot be pulled, a crash loop) -> Degraded with the Running reason.
--   Suspended=True -> Suspended, except reason Queued (waiting in a Kueue queue) -> Progressing.
--   Anything else (Pending, Admitted, Running) -> Progressing: phase, percent done, the Running message.
local MAX_MESSAGE = 256

-- A number as digits: Argo CD hands JSON numbers to Lua as floats, and string.format("%d") is not
-- portable across Lua implementations.
local function whole(n)
  return tostring(math.floor(n))
end

local function condition(type_)
  if obj.status == nil or type(obj.status.conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if type(c) == "table" and c.type == type_ then
      return c
    end
  end
  return nil
end

local function is_true(type_)
  local c = condition(type_)
  return c ~= nil and c.status == "True"
end

-- One line for the UI: the first line of the message, clipped.
local function one_line(text)
  text = tostring(text or "")
  local newline = string.find(text, "\n", 1, true)
  if newline ~= nil then
    text = string.sub(text, 1, newline - 1)
  end
  if string.len(text) > MAX_MESSAGE then
    text = string.sub(text, 1, MAX_MESSAGE - 3) .. "..."
  end
  return text
end

local function explain(c)
  if c == nil then
    return ""
  end
  if c.reason ~= nil and c.reason ~= "" then
    return one_line(c.reason .. ": " .. tostring(c.message or ""))
  end
  return one_line(c.message)
end

-- The generation the status describes: status.observedGeneration, else the newest condition's.
local function observed_generation()
  if obj.status.observedGeneration ~= nil then
    return obj.status.observedGeneration
  end
  local newest = nil
  if type(obj.status.conditions) == "table" then
    for _, c in ipairs(obj.status.conditions) do
      if type(c) == "table" and c.observedGeneration ~= nil and (newest == nil or c.observedGeneration > newest) then
        newest = c.observedGeneration
      end
    end
  end
  return newest
end

local hs = {}
if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Pending: waiting for the operator to admit the job"
  return hs
end
if is_true("Succeeded") then
  hs.status = "Healthy"
  hs.message = explain(condition("Succeeded"))
  return hs
end
if is_true("Failed") then
  hs.status = "Degraded"
  hs.message = explain(condition("Failed"))
  return hs
end
local generation = obj.metadata and obj.metadata.generation
local observed = observed_generation()
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to observe generation " .. whole(generation) ..
    " (status is for " .. whole(observed) .. ")"
  return hs
end
if is_true("Stalled") then
  hs.status = "Degraded"
  hs.message = explain(condition("Running") or condition("Stalled"))
  return hs
end
local suspended = condition("Suspended")
if suspended ~= nil and suspended.status == "True" then
  hs.status = suspended.reason == "Queued" and "Progressing" or "Suspended"
  hs.message = explain(suspended)
  return hs
end
local phase = obj.status.phase or "Pending"
local parts = { phase }
if obj.status.progress ~= nil and type(obj.status.progress.percent) == "number" then
  table.insert(parts, whole(obj.status.progress.percent) .. "% done")
end
local detail = condition("Running")
if detail == nil or detail.message == nil or detail.message == "" then
  detail = condition("Admitted")
end
if detail ~= nil and detail.message ~= nil and detail.message ~= "" then
  table.insert(parts, one_line(detail.message))
end
hs.status = "Progressing"
hs.message = one_line(table.concat(parts, "; "))
return hs
