"""The Python SDK and the `distill` command line."""
