-- Shared by every script (prepended at build time): the store's clock, and the text
-- form of float seconds that the Python service writes with str(time.time()).

-- Redis TIME in whole microseconds; a Lua number holds these exactly (< 2^53).
local function now_micros()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- "1732780000", "1732780000.5", "1732780000.1234567" -> microseconds (digits past the
-- sixth decimal dropped); nil for anything else. Mirrors Micros::parse_seconds.
local function to_micros(text)
  local whole, fraction = string.match(text, '^(%d+)%.?(%d*)$')
  if not whole then
    return nil
  end
  return tonumber(whole) * 1000000 + tonumber(string.sub(fraction .. '000000', 1, 6))
end

-- Microseconds -> "1732780000.123456", which Python's float() reads back exactly.
local function seconds(micros)
  return string.format('%d.%06d', math.floor(micros / 1000000), micros % 1000000)
end
