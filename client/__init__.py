"""The Python SDK of the distill service: an HTTP client of its API, nothing else."""
