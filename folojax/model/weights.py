"""The params pytree as typed, registered dataclasses: what each layer holds, with one source of
shapes per config (`expected_shapes` in folojax/weights/params.py builds from these names).

Projections that read the same input are fused into one Linear each (q, k and v; gate and up),
so a decode step streams each fused weight in one matrix-vector product: fewer, larger reads.
`linear(x, w)` dispatches on the weight's type, so another weight type (a quantized one) plugs
in beside Linear without touching the decoder.
"""

from __future__ import annotations

import dataclasses
import functools

import jax


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight", "bias"],
                   meta_fields=[])
@dataclasses.dataclass
class Linear:
    weight: jax.Array  # [out, in], Hugging Face's layout
    bias: jax.Array | None = None  # [out]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionWeights:
    qkv: Linear  # [heads * head_dim + 2 * kv_heads * head_dim, hidden]: q, k, v rows stacked
    o: Linear  # [hidden, heads * head_dim]
    q_norm: jax.Array | None = None  # [head_dim] (Qwen3)
    k_norm: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MLPWeights:
    gate_up: Linear  # [2 * intermediate, hidden]: gate rows, then up rows
    down: Linear  # [hidden, intermediate]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerWeights:
    input_norm: jax.Array  # [hidden]
    attention: AttentionWeights
    post_attention_norm: jax.Array  # [hidden]
    mlp: MLPWeights


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelWeights:
    embed: jax.Array  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: jax.Array  # [hidden]
    lm_head: Linear | None = None  # None: tied to the embedding

    @property
    def head_weight(self) -> jax.Array:
        """[vocab, hidden]: the lm_head's, or the tied embedding."""
        return self.embed if self.lm_head is None else self.lm_head.weight
