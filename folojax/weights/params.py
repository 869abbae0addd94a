"""Turns named checkpoint tensors into the params pytree (folojax/model/weights.py), checking
names and shapes exactly, fusing q/k/v and gate/up, keeping quantized tensors quantized
(QuantLinear), quantizing float ones to int8 (int8=True: Int8Linear), and (panels=True)
repacking the float linear weights into the CPU matmul kernel's panels
(folojax/ops/cpu_matmul.py)."""

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from folojax.config import ModelConfig
from folojax.errors import CheckpointError
from folojax.model.weights import (
    AttentionWeights,
    Int8Linear,
    LayerWeights,
    Linear,
    MLPWeights,
    ModelWeights,
    PanelLinear,
    QuantLinear,
)
from folojax.ops.cpu_matmul import pack_panels
from folojax.ops.int8_matmul import pack_int8
from folojax.ops.quant_matmul import pack_quantized
from folojax.weights.quantized import (
    QuantizedTensor,
    concatenate_rows,
    dense,
    quantize_int8_per_channel,
)

# Each linear of a layer in the params pytree: the Hugging Face projections whose rows it
# stacks, in that order.
LAYER_LINEARS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "o": ("self_attn.o_proj",), "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
                 "down": ("mlp.down_proj",)}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape, for every tensor the params pytree needs."""
    hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_heads,
                                         config.num_kv_heads, config.head_dim)
    shapes = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (config.intermediate_size, hidden),
            p + "mlp.up_proj.weight": (config.intermediate_size, hidden),
            p + "mlp.down_proj.weight": (hidden, config.intermediate_size),
        })
        if config.use_qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (heads * head_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_heads * head_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_heads * head_dim,)
    return shapes


# Present in some checkpoints but derived, not learned: skipped without complaint.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_params(
    config: ModelConfig,
    tensor_names: list[str],
    load: Callable[[str], np.ndarray],
    convert: Callable[[np.ndarray], object],
    source: str,
    progress: bool = False,
    panels: bool = False,
    int8: bool = False,
) -> ModelWeights:
    """Checks every expected tensor is present exactly once with the right shape, then loads each.

    `load(name)` returns the tensor as numpy, or as a QuantizedTensor (kept quantized: a linear
    weight becomes a QuantLinear, anything else is dequantized); `convert` turns float numpy into
    a device array of the model's dtype. Nothing is converted before every name has been checked,
    so a bad checkpoint fails fast and whole.
    panels: every float linear weight (and a tied embedding, which is the head) becomes a
    PanelLinear. int8: every float linear weight (the tied embedding too, as the head) is
    quantized to int8 per output channel into an Int8Linear; an untied embedding stays float (a
    lookup reads few rows).
    """
    shapes = expected_shapes(config)
    names = [n for n in tensor_names if not n.endswith(_IGNORED_SUFFIXES)]
    if config.tie_word_embeddings and "lm_head.weight" in names:
        names.remove("lm_head.weight")  # some tied checkpoints also store the (identical) head
    missing = sorted(set(shapes) - set(names))
    if missing:
        raise CheckpointError(
            f"{source}: missing {len(missing)} tensor(s): {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
        )
    unexpected = sorted(set(names) - set(shapes))
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor(s) for {config.architecture}: "
            f"{', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
        )

    def get(name):
        array = load(name)
        if tuple(array.shape) != shapes[name]:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(array.shape)}, expected "
                f"{shapes[name]} from the config"
            )
        return array

    names_bar = tqdm(shapes, desc="Loading weights", unit="tensor", disable=not progress,
                     leave=False)
    arrays = {name: get(name) for name in names_bar}  # checked before anything is converted
    def fused(prefix: str, parts: tuple[str, ...], suffix: str):
        return concatenate_rows([arrays[f"{prefix}{part}.{suffix}"] for part in parts])

    def floats(name: str):
        return convert(dense(arrays[name]))

    def linear(weight, bias=None) -> Linear | PanelLinear | QuantLinear | Int8Linear:
        bias = None if bias is None else convert(dense(bias))
        if int8 and not isinstance(weight, QuantizedTensor):
            return int8_linear(weight, bias)
        if isinstance(weight, QuantizedTensor):
            packed = pack_quantized(weight.codes, weight.scales, weight.offsets, weight.bits)
            order = None if weight.input_order is None else jnp.asarray(weight.input_order,
                                                                        jnp.int32)
            return QuantLinear(*map(jnp.asarray, packed), weight.shape[0], bias, order,
                               weight.zero_points)
        if panels:
            return PanelLinear(convert(pack_panels(weight)), weight.shape[0], bias)
        return Linear(convert(weight), bias)

    def layer(index: int) -> LayerWeights:
        prefix = f"model.layers.{index}."
        qkv = LAYER_LINEARS["qkv"]
        attention = AttentionWeights(
            qkv=linear(fused(prefix, qkv, "weight"),
                       fused(prefix, qkv, "bias") if config.attention_bias else None),
            o=linear(arrays[prefix + "self_attn.o_proj.weight"]),
            q_norm=floats(prefix + "self_attn.q_norm.weight") if config.use_qk_norm else None,
            k_norm=floats(prefix + "self_attn.k_norm.weight") if config.use_qk_norm else None)
        mlp = MLPWeights(gate_up=linear(fused(prefix, LAYER_LINEARS["gate_up"], "weight")),
                         down=linear(arrays[prefix + "mlp.down_proj.weight"]))
        return LayerWeights(
            input_norm=floats(prefix + "input_layernorm.weight"), attention=attention,
            post_attention_norm=floats(prefix + "post_attention_layernorm.weight"), mlp=mlp)

    embed = arrays["model.embed_tokens.weight"]
    # A tied embedding is the head: the lookup reads the head's panels or quantized codes.
    embed_is_head = config.tie_word_embeddings and (
        panels or int8 or isinstance(embed, QuantizedTensor))
    return ModelWeights(
        embed=linear(embed) if embed_is_head else convert(dense(embed)),
        layers=[layer(i) for i in range(config.num_layers)],
        final_norm=floats("model.norm.weight"),
        lm_head=None if config.tie_word_embeddings else linear(arrays["lm_head.weight"]))


def int8_linear(weight: np.ndarray, bias=None) -> Int8Linear:
    """weight [out, in] quantized to int8 per output channel (quantize_int8_per_channel) and
    packed for the int8 matmul."""
    quantized = quantize_int8_per_channel(weight)
    codes, scales = pack_int8(quantized.codes, quantized.scales[:, 0])
    return Int8Linear(jnp.asarray(codes), jnp.asarray(scales), *quantized.shape, bias)
