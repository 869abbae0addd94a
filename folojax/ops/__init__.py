"""Device ops: attention, KV-cache pytrees and writes, sampling."""
