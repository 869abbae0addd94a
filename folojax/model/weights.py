"""The params pytree as typed, registered dataclasses: what each layer holds, with one source of
shapes per config (`expected_shapes` in folojax/weights/params.py builds from these names).

Projections that read the same input are fused into one Linear each (q, k and v; gate and up),
so a decode step streams each fused weight in one matrix-vector product: fewer, larger reads.
`linear(x, w)` dispatches on the weight's type, so other weight types plug in beside Linear
without touching the decoder: PanelLinear (the CPU kernel's float layout), QuantLinear
(weights kept quantized, in the same panels) and Int8Linear (int8 weights against int8
activations) are three.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from folojax.ops.cpu_matmul import unpack_panels  # the panel layouts live with their kernels
from folojax.ops.int8_matmul import dequantize_int8
from folojax.ops.quant_matmul import dequantize_panels


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight", "bias"],
                   meta_fields=[])
@dataclasses.dataclass
class Linear:
    weight: jax.Array  # [out, in], Hugging Face's layout
    bias: jax.Array | None = None  # [out]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dense_weight(self) -> jax.Array:
        return self.weight


@functools.partial(jax.tree_util.register_dataclass, data_fields=["panels", "bias"],
                   meta_fields=["out_features"])
@dataclasses.dataclass
class PanelLinear:
    """A Linear repacked at load time for the CPU matmul kernel (folojax/ops/cpu_matmul.py)."""
    panels: jax.Array  # [ceil(out / 64), in, 64]: panel p, depth k holds weight[64p:64p + 64, k]
    out_features: int
    bias: jax.Array | None = None  # [out]

    def dense_weight(self) -> jax.Array:
        """[out, in], Hugging Face's layout (a copy)."""
        return unpack_panels(self.panels, self.out_features)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["codes", "scales", "offsets", "bias", "input_order"],
                   meta_fields=["out_features", "zero_points"])
@dataclasses.dataclass
class QuantLinear:
    """A Linear kept quantized, 4 or 8 bits with a scale and an offset (or a zero point) per
    output and group of inputs, in panels (the layout: folojax/ops/quant_matmul.py)."""
    codes: jax.Array  # [P, in, 64] int8 (8 bits) or [P, in, 32] uint8 (4 bits, two per byte)
    scales: jax.Array  # [P, G, 64] float16
    offsets: jax.Array  # [P, G, 64] float16: offsets, or zero points if zero_points
    out_features: int
    bias: jax.Array | None = None  # [out]
    # [in] int32: the codes' inputs in this order (GPTQ's act-order groups inputs out of order);
    # x is gathered into it before the matmul. None: in order.
    input_order: jax.Array | None = None
    zero_points: bool = False

    @property
    def bits(self) -> int:
        return 8 if self.codes.dtype == jnp.int8 else 4

    def dense_weight(self) -> jax.Array:
        """[out, in] float32, Hugging Face's layout (a dequantized copy)."""
        weight = unpack_panels(dequantize_panels(self.codes, self.scales, self.offsets,
                                                 zero_points=self.zero_points),
                               self.out_features)
        if self.input_order is None:
            return weight
        return weight[:, jnp.argsort(self.input_order)]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scales", "bias"],
                   meta_fields=["out_features", "in_features"])
@dataclasses.dataclass
class Int8Linear:
    """A Linear quantized to int8 per output channel at load time, applied to activations
    quantized to int8 on the fly (the layout and the math: folojax/ops/int8_matmul.py)."""
    codes: jax.Array  # [P, ceil(in / 4), 256] uint8: 4 inputs per output together, plus 128
    scales: jax.Array  # [P, 64] float32
    out_features: int
    in_features: int
    bias: jax.Array | None = None  # [out]

    def dense_weight(self) -> jax.Array:
        """[out, in] float32, Hugging Face's layout (a dequantized copy)."""
        return dequantize_int8(self.codes, self.scales, self.out_features, self.in_features)


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
    # [vocab, hidden]; a tied embedding repacked for the CPU kernel or quantized is a
    # PanelLinear, a QuantLinear or an Int8Linear (the head), whose rows the lookup gathers.
    embed: jax.Array | PanelLinear | QuantLinear | Int8Linear
    layers: list[LayerWeights]
    final_norm: jax.Array  # [hidden]
    # None: tied to the embedding
    lm_head: Linear | PanelLinear | QuantLinear | Int8Linear | None = None

    @property
    def head(self) -> Linear | PanelLinear | QuantLinear | Int8Linear:
        """The lm_head's weights, or the tied embedding's (read in place, not copied)."""
        if self.lm_head is not None:
            return self.lm_head
        if isinstance(self.embed, PanelLinear | QuantLinear | Int8Linear):
            return self.embed
        return Linear(self.embed)
