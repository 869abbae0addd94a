"""Turns named checkpoint tensors into the params pytree, checking names and shapes exactly."""

from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

from folojax.config import ModelConfig
from folojax.errors import CheckpointError


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


# Our name within a layer <- the Hugging Face suffix after "model.layers.{i}.".
_LAYER_NAMES = {
    "input_norm": "input_layernorm.weight",
    "post_attention_norm": "post_attention_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
}

# Present in some checkpoints but derived, not learned: skipped without complaint.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_params(
    config: ModelConfig,
    tensor_names: list[str],
    load: Callable[[str], np.ndarray],
    convert: Callable[[np.ndarray], object],
    source: str,
    progress: bool = False,
) -> dict:
    """Checks every expected tensor is present exactly once with the right shape, then loads each.

    `load(name)` returns the tensor as numpy; `convert` turns it into a device array. Nothing is
    converted before every name has been checked, so a bad checkpoint fails fast and whole.
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
    params = {
        "embed": convert(arrays["model.embed_tokens.weight"]),
        "final_norm": convert(arrays["model.norm.weight"]),
        "layers": [],
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = convert(arrays["lm_head.weight"])
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        params["layers"].append({
            ours: convert(arrays[prefix + theirs])
            for ours, theirs in _LAYER_NAMES.items() if prefix + theirs in arrays
        })
    return params
