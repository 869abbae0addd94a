"""Rotary-embedding frequencies, with the scaled variants transformers implements: linear,
dynamic (NTK), yarn and llama3. Computed on the host in numpy from the static config, so they
enter the jitted step as constants.

`rope_length` is the sequence length the frequencies are computed for; it matters only to
`dynamic`, which (as in transformers) rescales past max_position_embeddings alone: the dense
`forward` passes its own length, and the engine, whose requests never pass
max_position_embeddings, passes that.
"""

from __future__ import annotations

import math

import numpy as np

from folojax.config import ModelConfig, RopeScaling


def default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))


def rope_inv_freq(config: ModelConfig, rope_length: int) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim / 2] float32, the factor cos and sin are scaled by)."""
    scaling, dim, theta = config.rope_scaling, config.head_dim, config.rope_theta
    if scaling is None:
        return default_inv_freq(theta, dim), 1.0
    kind = scaling.rope_type
    if kind == "linear":
        return default_inv_freq(theta, dim) / scaling.factor, 1.0
    if kind == "dynamic":
        max_len = config.max_position_embeddings
        seq_len = max(rope_length, max_len)
        base = theta * ((scaling.factor * seq_len / max_len) - (scaling.factor - 1)) ** (
            dim / (dim - 2))
        return default_inv_freq(base, dim), 1.0
    if kind == "yarn":
        return _yarn(scaling, theta, dim)
    if kind == "llama3":
        return _llama3(scaling, default_inv_freq(theta, dim)), 1.0
    raise AssertionError(f"unchecked rope_type {kind!r}")  # RopeScaling validates the type


def _yarn(scaling: RopeScaling, base: float, dim: int) -> tuple[np.ndarray, float]:
    factor = scaling.factor

    def mscale(scale: float, value: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * value * math.log(scale) + 1.0

    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = mscale(factor, scaling.mscale) / mscale(factor,
                                                                       scaling.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(scaling.original_max_position_embeddings
                               / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singular ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv_freq = ((1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight)
                + (1.0 / pos_freqs) * extrapolation_weight)
    return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(scaling: RopeScaling, inv_freq: np.ndarray) -> np.ndarray:
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
