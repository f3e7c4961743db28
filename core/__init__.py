"""Shared core of distill: settings, errors, the job spec, persistence and the engine."""
