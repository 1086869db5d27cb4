-- Argo CD health check for keysmith.dev/RoleBinding.
--
-- Progressing  keysmith has not reconciled the current spec yet, or Ready is
--              False with reason Pending (the account is not yet granted
--              every role).
-- Healthy      Ready is True: the account holds every role.
-- Degraded     PolicyViolation is True (the connection's policy denies a
--              role, which is never granted), or Ready is False for a reason
--              someone has to act on: PolicyViolation, AccountNotFound,
--              ConnectionNotFound, ConnectionNotAdmitted, or any reason not
--              listed above. The message is the condition's.
--
-- Written for Argo CD's Lua VM (gopher-lua, Lua 5.1), which runs custom
-- health checks with the base and table libraries only: no string or math
-- functions, and no Argo CD helpers. keysmith writes only status, never
-- spec, so status is all there is to read.

local function condition(type_)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

-- What to tell the user about a condition: its message, else its reason.
local function describe(c)
  if c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return c.type
end

-- Whether keysmith has acted on the current spec: status.observedGeneration
-- says which metadata.generation its status describes.
local function reconciled()
  if obj.status == nil or obj.status.observedGeneration == nil then
    return false
  end
  local generation = tonumber(obj.metadata.generation)
  return generation == nil or tonumber(obj.status.observedGeneration) >= generation
end

local waiting = { status = "Progressing", message = "Waiting for keysmith to reconcile" }

-- The verdict of the Ready condition. `working` holds the reasons of
-- Ready=False that mean keysmith is still at work, or retrying by itself.
local function from_ready(working)
  local ready = condition("Ready")
  if ready == nil then
    return waiting
  end
  if ready.status == "True" then
    return { status = "Healthy", message = describe(ready) }
  end
  if ready.status ~= "False" or working[ready.reason] then
    return { status = "Progressing", message = describe(ready) }
  end
  return { status = "Degraded", message = describe(ready) }
end

if not reconciled() then
  return waiting
end
local violation = condition("PolicyViolation")
if violation ~= nil and violation.status == "True" then
  return { status = "Degraded", message = describe(violation) }
end
return from_ready({ Pending = true })
