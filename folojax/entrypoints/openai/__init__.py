"""The OpenAI-compatible HTTP server: protocol (request models), api_server (the app),
streaming (text deltas), metrics (Prometheus)."""
