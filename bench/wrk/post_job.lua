-- POST /v1/jobs with BODY at RATE requests/s (see pace.lua).
dofile(os.getenv("WRK_DIR") .. "/pace.lua")
wrk.method = "POST"
wrk.body = os.getenv("BODY")
wrk.headers["Content-Type"] = "application/json"
