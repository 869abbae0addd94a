"""Frozen, hashable configs. ModelConfig is a static jit argument; the others validate knobs."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from folojax.errors import UnsupportedModelError

# Architectures sharing the decoder: what differs is q/k RMSNorm (Qwen3) and q/k/v bias (Qwen2).
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")


ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A scaled RoPE's parameters, with transformers' names and defaults (folojax/model/rope.py)."""

    rope_type: str
    factor: float
    original_max_position_embeddings: int  # yarn, llama3: the pretraining context
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: None = from factor (and mscale)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling type {self.rope_type!r} is not supported; supported: default, "
                f"{', '.join(ROPE_TYPES)}")
        if not isinstance(self.factor, (int, float)) or isinstance(self.factor, bool) or not (
                self.factor > 0):
            raise ValueError(f"rope_scaling factor must be a positive number, got {self.factor!r}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")

    @classmethod
    def from_hf(cls, rope: dict, max_position_embeddings: int) -> RopeScaling | None:
        """From config.json's `rope_parameters` (transformers 5) or `rope_scaling` (older)."""
        kind = rope.get("rope_type", rope.get("type"))
        if kind in (None, "default"):
            return None
        if kind not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling type {kind!r} is not supported; supported: default, "
                f"{', '.join(ROPE_TYPES)}")
        if rope.get("factor") is None:
            raise ValueError(f"rope_scaling of type {kind!r} needs a 'factor'")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_type", "factor",
                                                              "original_max_position_embeddings"}
        extra = {name: rope[name] for name in names if rope.get(name) is not None}
        return cls(rope_type=kind, factor=float(rope["factor"]),
                   original_max_position_embeddings=int(rope.get(
                       "original_max_position_embeddings") or max_position_embeddings),
                   **extra)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    use_qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before RoPE
    attention_bias: bool  # Qwen2: bias on the q, k and v projections
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def num_query_groups(self) -> int:
        """Query heads per KV head (1 = MHA, num_heads = MQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Builds the config from a Hugging Face `config.json` dict."""
        architectures = hf.get("architectures") or [hf.get("model_type", "<missing>")]
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {architecture!r} (config.json 'architectures') is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers >= 5 writes rope_theta inside "rope_parameters"; older files at top level.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        max_position_embeddings = hf.get("max_position_embeddings", 4096)
        num_heads = hf["num_attention_heads"]
        hidden_size = hf["hidden_size"]
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden_size // num_heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            use_qk_norm=architecture == "Qwen3ForCausalLM",
            attention_bias=architecture == "Qwen2ForCausalLM" or bool(hf.get("attention_bias")),
            max_position_embeddings=max_position_embeddings,
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
            rope_scaling=RopeScaling.from_hf(rope, max_position_embeddings),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict that from_hf_config reads back as this config (for
        a model directory written from a GGUF file, e.g. by `folojax quantize`)."""
        model_types = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2",
                       "LlamaForCausalLM": "llama"}
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**{k: v for k, v in dataclasses.asdict(self.rope_scaling).items()
                       if v is not None}, "rope_theta": self.rope_theta}
        eos = list(self.eos_token_ids)
        return {
            "architectures": [self.architecture], "model_type": model_types[self.architecture],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "bos_token_id": self.bos_token_id, "rope_theta": self.rope_theta,
            "rope_parameters": rope,
        }

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        with open(path) as f:
            return cls.from_hf_config(json.load(f))


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    max_seq_len: int  # tokens per row: prompt plus generated
    batch_size: int = 1

    def __post_init__(self):
        for name in ("max_seq_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"cache {name} must be a positive int, got {value!r}")


def _check_positive_ints(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # requests running at once (vLLM's default; docs/BENCHMARKS.md)
    max_num_batched_tokens: int = 1024  # tokens computed in one step (prefill chunks + decodes)
    enable_chunked_prefill: bool = True  # split prompts longer than the budget over steps
    # Schedule and dispatch step N+1 before reading step N's tokens back (see LLMEngine.step).
    async_scheduling: bool = True
    # Decode tokens one dispatch computes for each request when a step only decodes and nothing
    # waits (vLLM v0's multi-step scheduling): the host's per-step work is spent once per this
    # many tokens. A request may compute up to this many - 1 tokens past a stop it meets.
    num_scheduler_steps: int = 1

    def __post_init__(self):
        _check_positive_ints(self, "max_num_seqs", "max_num_batched_tokens",
                             "num_scheduler_steps")


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    block_size: int = 16  # tokens per block of the paged cache
    num_blocks: int = 1
    enable_prefix_caching: bool = True

    def __post_init__(self):
        _check_positive_ints(self, "block_size", "num_blocks")

    @property
    def num_tokens(self) -> int:
        """Tokens the whole pool holds."""
        return self.block_size * self.num_blocks


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    scheduler: SchedulerConfig
    max_model_len: int
    dtype: str
    kv_cache: KVCacheConfig = KVCacheConfig()
    max_logprobs: int = 20  # the most top-N logprobs a request may ask for (vLLM's default)
    # Compile a recurring new step shape in a background thread while its steps run padded to
    # a compiled one (runner/model_runner.py); False: compile it when the step is dispatched.
    background_compile: bool = True
    # Steps of a new shape that run padded before it compiles (1: a server, long-lived, compiles
    # every shape it meets; 8: an offline call's rare shapes cost no compile).
    padded_steps_before_compile: int = 8
    # The attention backend (folojax.list_attention_backends()) or "auto"; checked against the
    # model's head_dim and the cache's block size and dtype when the engine starts.
    attention_backend: str = "auto"

    def __post_init__(self):
        _check_positive_ints(self, "max_model_len", "padded_steps_before_compile")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be an int >= 0, got {self.max_logprobs!r}")
        if self.max_model_len > self.model.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's "
                f"max_position_embeddings={self.model.max_position_embeddings}"
            )
        scheduler = self.scheduler
        if not scheduler.enable_chunked_prefill and (
                scheduler.max_num_batched_tokens < self.max_model_len):
            raise ValueError(
                f"max_num_batched_tokens={scheduler.max_num_batched_tokens} is below "
                f"max_model_len={self.max_model_len}: without chunked prefill every prompt must "
                "fit in one step's token budget")
