-- GET at about RATE requests/s over CONNECTIONS connections.
local rate = tonumber(os.getenv("RATE") or "500")
local connections = tonumber(os.getenv("CONNECTIONS") or "16")

function delay()
  return math.floor(1000 * connections / rate)
end
