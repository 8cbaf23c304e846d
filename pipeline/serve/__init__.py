"""Serving: an OpenAI-compatible HTTP server of a job's query side (app, service, batcher, limits, metrics)."""
