"""The distillation engine: torch only; knows nothing of HTTP, Celery or the database."""
