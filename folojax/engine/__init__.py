"""Host code: generation loops, request bookkeeping, the LLM class."""
