"""Host code: checkpoints (HF safetensors directories, GGUF files) -> params pytree."""
