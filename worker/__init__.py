"""The Celery worker: claims jobs by id, runs the engine in a child process, records outcomes."""
