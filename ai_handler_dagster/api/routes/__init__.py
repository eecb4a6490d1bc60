"""The routes of the HTTP API, one module per story, each with its ``router``."""
