-- POST /v1/jobs at about RATE requests/s over CONNECTIONS connections.
local rate = tonumber(os.getenv("RATE") or "500")
local connections = tonumber(os.getenv("CONNECTIONS") or "16")
wrk.method = "POST"
wrk.body = os.getenv("BODY")
wrk.headers["Content-Type"] = "application/json"

function delay()
  return math.floor(1000 * connections / rate)
end
