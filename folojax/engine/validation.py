"""The checks every request passes before it is queued (LLMEngine and folojax.generate alike):
a request that could never run raises here, naming the problem, and nothing is queued."""

import numpy as np

from folojax.sampling_params import SEED_LIMIT, SamplingParams

DEFAULT_MAX_LOGPROBS = 20  # vLLM's default limit on SamplingParams.logprobs


def validate_seed(seed, owner: str) -> None:
    """Raises ValueError unless `seed` is an int in [0, 2**64) (the range of a key's data)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{owner} seed must be an int in [0, 2**64), got {seed!r}")


def validate_prompt(prompt, vocab_size: int, room: int, where: str = "prompt") -> None:
    """Raises for a prompt that is not a non-empty list of token ids in the vocab, or leaves no
    room to generate."""
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"{where} must be a list of token ids, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError(f"{where} is empty: at least one token is needed")
    bad = [t for t in prompt if isinstance(t, (bool, np.bool_))
           or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{where} has invalid token ids (ids are ints in [0, {vocab_size})): "
                         f"{bad[:5]}")
    if len(prompt) >= room:
        raise ValueError(
            f"{where} has {len(prompt)} tokens but max_model_len leaves room for {room} in total "
            f"(prompt plus at least one generated token)"
        )


def validate_request(prompt, sampling, *, vocab_size: int, room: int, has_tokenizer: bool,
                     max_logprobs: int = DEFAULT_MAX_LOGPROBS, where: str = "prompt") -> None:
    """Raises ValueError / TypeError for a request that cannot run."""
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"expected SamplingParams, got {type(sampling).__name__}")
    if sampling.stop and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer (none was loaded or given)")
    for field in ("logprobs", "prompt_logprobs"):
        value = getattr(sampling, field)
        if value is not None and value > max_logprobs:
            raise ValueError(f"SamplingParams.{field}={value} exceeds max_logprobs={max_logprobs}")
    validate_prompt(prompt, vocab_size, room, where)
