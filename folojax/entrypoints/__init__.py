"""Ways in from outside the process: the OpenAI-compatible server (entrypoints/openai) over the
asyncio engine front end (async_engine.py)."""
