"""The client tools: `ingest push`, `ingest top` and their reports; nothing of the server."""
