-- GET at RATE requests/s (see pace.lua).
dofile(os.getenv("WRK_DIR") .. "/pace.lua")
