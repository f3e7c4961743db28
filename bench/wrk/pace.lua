-- Open-loop pacing shared by the scripts: each wrk thread sends THREADS/RATE apart on a fixed
-- schedule, whatever the responses' latency (a fixed delay after each response would lower the
-- rate as latency grows). A thread that falls behind sends at once and does not burst.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_usec; } pace_timeval;
  int gettimeofday(pace_timeval *tv, void *tz);
]]
local tv = ffi.new("pace_timeval")
local rate = tonumber(os.getenv("RATE") or "500")
local threads = tonumber(os.getenv("THREADS") or "2")
local interval_ms = 1000 * threads / rate
local next_at = nil

local function now_ms()
  ffi.C.gettimeofday(tv, nil)
  return tonumber(tv.tv_sec) * 1000 + tonumber(tv.tv_usec) / 1000
end

function delay()
  local now = now_ms()
  next_at = math.max((next_at or now) + interval_ms, now)
  return math.floor(next_at - now)
end
