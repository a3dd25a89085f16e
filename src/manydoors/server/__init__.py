"""The connection server: supervisor, workers, hub, API."""
