"""The `distill` command: the service's HTTP commands, local runs, the demo and the launcher."""
