-- Argo CD health of a kubetune.io AdapterDeployment (resource.customizations.health.kubetune.io_AdapterDeployment).
-- Read from the conditions and status.adapters the operator writes. Lua 5.1 as Argo CD runs it
-- (gopher-lua): no goto, no integer division. Tested in tests/unit/test_health_checks.py.
--   status.observedGeneration behind metadata.generation -> Progressing (the operator has not seen the edit).
--   Degraded=True -> Degraded ("Reason: message").
--   An adapter Rejected (its job's evaluation fails a require rule) or Failed -> Degraded with its
--   name and message: the operator keeps serving, but a person has to act for it to be served.
--   Available=True, every adapter Loaded, AdaptersReady not False and Progressing not True -> Healthy.
--   Anything else -> Progressing, with the message of the condition that holds it back.
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

local function status_of(type_)
  local c = condition(type_)
  if c == nil then
    return nil
  end
  return c.status
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
  hs.message = "waiting for the operator to render the serving Deployment"
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
if status_of("Degraded") == "True" then
  hs.status = "Degraded"
  hs.message = explain(condition("Degraded"))
  return hs
end
local adapters = {}
if type(obj.status.adapters) == "table" then
  adapters = obj.status.adapters
end
local all_loaded = true
for _, adapter in ipairs(adapters) do
  if type(adapter) == "table" then
    if adapter.state == "Rejected" or adapter.state == "Failed" then
      hs.status = "Degraded"
      hs.message = one_line("adapter " .. tostring(adapter.name) .. " is " .. adapter.state .. ": " ..
        tostring(adapter.message or ""))
      return hs
    end
    if adapter.state ~= "Loaded" then
      all_loaded = false
    end
  end
end
local available = status_of("Available") == "True"
local progressing = status_of("Progressing") == "True"
local adapters_ready = status_of("AdaptersReady") ~= "False"
if available and all_loaded and adapters_ready and not progressing then
  hs.status = "Healthy"
  hs.message = one_line(tostring((condition("Available") or {}).message or "") .. "; adapters " ..
    tostring(obj.status.adaptersReady or "0/0") .. " loaded")
  return hs
end
hs.status = "Progressing"
if progressing then
  hs.message = explain(condition("Progressing"))
elseif not available then
  hs.message = explain(condition("Available"))
else
  hs.message = explain(condition("AdaptersReady"))
end
if hs.message == "" then
  hs.message = "waiting for replicas and adapters"
end
return hs
