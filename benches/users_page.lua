-- wrk script for benches/users_page.sh: a mix of what the Users page asks for: email and
-- name prefix searches, keyset pages deep into a million users, sorting by name and
-- filters. Every request is a GET with the bearer token wrk is given (-H).
math.randomseed(os.time())

local function hex(s)
  return (s:gsub('.', function(c) return string.format('%02x', string.byte(c)) end))
end

local base = "/api/v1/tenants/Bench/users?limit=50"

request = function()
  local r = math.random(100)
  local p
  if r <= 25 then
    p = base .. "&q=u" .. math.random(1, 99999)
  elseif r <= 40 then
    p = base .. "&q=lee" .. math.random(1, 4999)
  elseif r <= 50 then
    p = base .. "&q=ann" .. math.random(1, 999)
  elseif r <= 70 then
    p = base .. "&after=" .. hex('{"p":0,"k":["u' .. math.random(0, 999999) .. '@example.com"]}')
  elseif r <= 80 then
    p = base .. "&sort=name&after=" .. hex('{"p":0,"k":["lee' .. math.random(1, 4999) .. '","ann1",0]}')
  elseif r <= 88 then
    p = base .. "&status=deactivated"
  elseif r <= 94 then
    p = base .. "&pool=Standard&status=active&after=" .. hex('{"p":0,"k":["u' .. math.random(0, 999999) .. '@example.com"]}')
  else
    p = base
  end
  return wrk.format("GET", p)
end
