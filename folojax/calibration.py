"""Calibration for GPTQ (folojax/quant_methods.py): text every machine has, cut into token
segments, and the Hessian 2 X X^T of each linear's inputs X, taken one decoder layer at a time.

The text is the module docstrings of the Python standard library that runs folojax (its .py
files read with `ast`, nothing imported; tests and pydoc_data, where `folojax perplexity`'s
held-out text comes from, left out), so it changes a little between Python versions.

A layer's linears are observed by running the decoder's own layer (folojax/model/decoder.py)
with each linear wrapped in an ObservedLinear, whose `linear` hands its input to a recorder
while the layer is traced.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np

from folojax.config import ModelConfig
from folojax.model.decoder import count_compile, decoder_layer, dense_attend
from folojax.model.layers import apply_linear, linear, rope_cos_sin
from folojax.model.rope import rope_inv_freq
from folojax.model.weights import LayerWeights

_SKIPPED_DIRECTORIES = ("site-packages", "dist-packages", "test", "tests", "idlelib",
                        "pydoc_data", "__pycache__")

# The linears of a layer, by the order GPTQ rounds them ("true sequential"): each one's inputs
# are taken with the ones before it already quantized. Fused q/k/v and gate/up share inputs.
LINEAR_GROUPS = ("qkv", "o", "gate_up", "down")


@functools.lru_cache(maxsize=1)
def stdlib_docstrings() -> str:
    """The standard library's module docstrings, in path order, separated by blank lines (read
    once per process: a few seconds)."""
    root = sysconfig.get_paths()["stdlib"]
    docstrings = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories
                                   if d not in _SKIPPED_DIRECTORIES and not d.startswith("."))
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    docstring = ast.get_docstring(ast.parse(f.read()))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few files are deliberately broken or not UTF-8
            if docstring:
                docstrings.append(docstring)
    return "\n\n".join(docstrings)


def calibration_segments(token_ids: list[int], num_samples: int, length: int, seed: int = 0
                         ) -> np.ndarray:
    """num_samples segments [num_samples, length] of token_ids at random offsets (seeded), as
    GPTQ samples its calibration text."""
    if len(token_ids) < length:
        raise ValueError(f"the calibration text has {len(token_ids)} tokens, fewer than one "
                         f"segment of {length}")
    starts = np.random.default_rng(seed).integers(0, len(token_ids) - length + 1, num_samples)
    ids = np.asarray(token_ids, np.int32)
    return np.stack([ids[s:s + length] for s in starts])


@dataclasses.dataclass
class ObservedLinear:
    """A linear weight whose input goes to `record[name]` (a dict, filled while tracing)."""
    weight: object
    name: str
    record: dict


@apply_linear.register
def _(weight: ObservedLinear, x: jax.Array) -> jax.Array:
    weight.record[weight.name] = x
    return linear(x, weight.weight)


_LINEAR_PARENTS = {"qkv": "attention", "o": "attention", "gate_up": "mlp", "down": "mlp"}


def layer_linear(layer: LayerWeights, group: str):
    """The weight of linear `group` (one of LINEAR_GROUPS) of a layer."""
    return getattr(getattr(layer, _LINEAR_PARENTS[group]), group)


def with_layer_linear(layer: LayerWeights, group: str, weight) -> LayerWeights:
    """The layer with linear `group` replaced by `weight`."""
    parent = _LINEAR_PARENTS[group]
    return dataclasses.replace(layer, **{parent: dataclasses.replace(
        getattr(layer, parent), **{group: weight})})


def _observed(layer: LayerWeights, record: dict) -> LayerWeights:
    for group in LINEAR_GROUPS:
        layer = with_layer_linear(layer, group,
                                  ObservedLinear(layer_linear(layer, group), group, record))
    return layer


@functools.partial(jax.jit, static_argnames=("config", "group"))
def layer_pass(layer: LayerWeights, config: ModelConfig, hidden: jax.Array,
               group: str | None):
    """One decoder layer over calibration hidden states [batch, seq, hidden]: the Hessian
    2 X^T X (summed over tokens) of the inputs X of linear `group` (one of LINEAR_GROUPS), or,
    for group None, the layer's outputs. Only what the answer needs is computed."""
    count_compile("calibration_layer_pass")
    batch, seq, _ = hidden.shape
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    cos, sin = rope_cos_sin(positions, *rope_inv_freq(config, seq))
    record = {}
    out, _ = decoder_layer(_observed(layer, record), 0, config, hidden, cos, sin,
                           dense_attend(positions, jnp.full((batch,), seq)), None)
    if group is None:
        return out
    inputs = record[group].reshape(batch * seq, -1).astype(jnp.float32)
    return 2 * jnp.einsum("ti,tj->ij", inputs, inputs, precision=jax.lax.Precision.HIGHEST)
