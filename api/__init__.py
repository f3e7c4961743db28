"""The HTTP API (FastAPI): validates, stores uploads, writes rows, enqueues job ids."""
