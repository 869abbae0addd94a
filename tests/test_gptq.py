"""GPTQ checkpoints (folojax/weights/gptq.py): packed here, as GPTQ writers pack them, from a
known integer quantization of a random model; folojax's logits must equal torch's on that model
with the dequantized float weights (exact math: the usual float32 tolerance)."""

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import folojax
from folojax.errors import CheckpointError, UnsupportedModelError
from folojax.model.weights import QuantLinear
from tests.conftest import make_tiny_checkpoint
from tests.reference.test_hf_equivalence import assert_close, torch_logits

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def pack_along_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """[in, out] values -> int32 [in * bits / 32, out]: 32 / bits consecutive rows per word."""
    per_word = 32 // bits
    grouped = values.reshape(-1, per_word, values.shape[1]).astype(np.uint32)
    words = sum(grouped[:, j] << np.uint32(bits * j) for j in range(per_word))
    return words.astype(np.uint32).view(np.int32)


def pack_along_columns(values: np.ndarray, bits: int) -> np.ndarray:
    return pack_along_rows(values.T, bits).T.copy()


def quantize_linear(weight: np.ndarray, bits: int, group_size: int, order: np.ndarray | None,
                    sym: bool, v1: bool, rng) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A known integer quantization of weight [out, in]: (its GPTQ tensors, the float weight
    they stand for). `order`: act-order's input order (None: in order)."""
    out, inner = weight.shape
    group_size = inner if group_size == -1 else group_size
    maxq = 2 ** bits - 1
    g_idx = np.arange(inner) // group_size
    if order is not None:  # act-order: input order[j] lands in group j // group_size
        g_idx = np.empty(inner, np.int64)
        g_idx[order] = np.arange(inner) // group_size
    num_groups = -(-inner // group_size)  # the last group may be partial
    scales = np.zeros((num_groups, out), np.float16)
    for g in range(num_groups):
        scales[g] = (np.abs(weight[:, g_idx == g]).max(axis=1) / (maxq / 2)).astype(np.float16)
    if sym:
        zeros = np.full((num_groups, out), 2 ** (bits - 1))
    else:  # v1 cannot store a zero point of 0 (it stores z - 1)
        zeros = rng.integers(1 if v1 else 0, maxq + 1, (num_groups, out))
    scale_k = scales.astype(np.float32)[g_idx]  # [in, out]
    zero_k = zeros[g_idx]
    codes = np.clip(np.rint(weight.T / scale_k + zero_k), 0, maxq).astype(np.int64)
    dequantized = ((codes - zero_k) * scale_k).T.astype(np.float32)
    tensors = {"qweight": pack_along_rows(codes, bits),
               "qzeros": pack_along_columns(zeros - 1 if v1 else zeros, bits),
               "scales": scales, "g_idx": g_idx.astype(np.int32)}
    return tensors, dequantized


def write_gptq_checkpoint(tiny, directory: str, bits=4, group_size=32, desc_act=False, sym=True,
                          checkpoint_format="gptq", seed=0, edit=None):
    """The tiny model's linears quantized and packed; returns the torch twin holding the
    dequantized float weights. `edit(tensors)` may break the tensors before they are written."""
    rng = np.random.default_rng(seed)
    twin = copy.deepcopy(tiny.torch_model)
    state = {name: t.numpy().copy() for name, t in twin.state_dict().items()}
    tensors, orders = {}, {}
    for name, array in state.items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.split(".", 3)[-1] in LINEARS:
            # Projections of the same input share act-order's order (the same Hessian).
            shared = prefix.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace(
                "up_proj", "gate_proj")
            if desc_act and shared not in orders:
                orders[shared] = rng.permutation(array.shape[1])
            packed, dequantized = quantize_linear(array, bits, group_size, orders.get(shared),
                                                  sym, checkpoint_format == "gptq", rng)
            tensors.update({f"{prefix}.{part}": value for part, value in packed.items()})
            tensors[f"{prefix}.bias"] = np.zeros(array.shape[0], np.float16)  # as writers add
            twin.state_dict()[name].copy_(torch.from_numpy(dequantized))
        else:
            tensors[name] = array
    if edit is not None:
        edit(tensors)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(tiny.path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits,
                                     "group_size": group_size, "desc_act": desc_act, "sym": sym,
                                     "checkpoint_format": checkpoint_format}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return twin


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_checkpoint("llama_mqa", str(tmp_path_factory.mktemp("gptq-base")))


@pytest.mark.parametrize("bits, group_size, desc_act, sym, checkpoint_format", [
    (4, 32, False, True, "gptq"), (4, 32, True, False, "gptq"), (4, 64, False, False, "gptq_v2"),
    (4, -1, True, True, "gptq_v2"), (8, 32, False, False, "gptq"), (8, -1, False, True, "gptq"),
    (8, 64, True, False, "gptq_v2"), (4, 48, False, False, "gptq"), (8, 48, True, True, "gptq")])
def test_gptq_logits_equal_torch_with_the_dequantized_weights(tiny_llama, tmp_path, bits,
                                                              group_size, desc_act, sym,
                                                              checkpoint_format):
    twin = write_gptq_checkpoint(tiny_llama, str(tmp_path), bits, group_size, desc_act, sym,
                                 checkpoint_format)
    model = folojax.load_model(str(tmp_path), dtype="float32", load_tokenizer=False,
                               progress=False)
    qkv = model.params.layers[0].attention.qkv
    assert isinstance(qkv, QuantLinear) and qkv.bits == bits and qkv.zero_points
    down = model.params.layers[0].mlp.down
    # act-order reorders inputs unless one group holds them all (q/k/v read 64, down 128);
    # groups of 48 (the last partial) are held as groups of gcd(48, inputs) = 16
    assert (qkv.input_order is not None) == (desc_act and 0 < group_size < 64)
    assert (down.input_order is not None) == (desc_act and 0 < group_size < 128)
    assert down.scales.shape[1] == {-1: 1, 32: 4, 64: 2, 48: 8}[group_size]
    ids = np.random.default_rng(1).integers(3, 320, (2, 19)).tolist()
    reference = torch_logits(type("Twin", (), {"torch_model": twin}), ids)
    assert_close(folojax.forward(model.params, model.config, ids), reference)
    dense = folojax.load_model(str(tmp_path), dtype="float32", load_tokenizer=False,
                               progress=False, quantization="none")
    assert not isinstance(dense.params.layers[0].attention.qkv, QuantLinear)
    assert_close(folojax.forward(dense.params, dense.config, ids), reference)


def test_an_llm_generates_from_a_gptq_checkpoint(tiny_llama, tmp_path):
    twin = write_gptq_checkpoint(tiny_llama, str(tmp_path), 4, 32, True, False)
    llm = folojax.LLM(str(tmp_path), skip_tokenizer_init=True, dtype="float32")
    prompt = [5, 17, 42, 99, 7]
    [output] = llm.generate({"prompt_token_ids": prompt},
                            folojax.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)
    with torch.no_grad():
        reference = twin.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    assert output.outputs[0].token_ids == reference[0, len(prompt):].tolist()


def _remove_g_idx(tensors):
    del tensors["model.layers.0.self_attn.q_proj.g_idx"]


def _short_qweight(tensors):
    name = "model.layers.1.mlp.down_proj.qweight"
    tensors[name] = tensors[name][:-1]


@pytest.mark.parametrize("settings, edit, error, message", [
    (dict(bits=3), None, UnsupportedModelError, "bits=3 is not supported"),
    (dict(desc_act=True), _remove_g_idx, CheckpointError,
     "q_proj.g_idx: missing, and desc_act"),
    (dict(), _short_qweight, CheckpointError,
     r"down_proj.g_idx: expected \[120\] group ids in \[0, 4\), got shape \[128\]"),
    (dict(checkpoint_format="marlin"), None, UnsupportedModelError, "'marlin' is not supported"),
])
def test_a_bad_gptq_layout_names_the_tensor_and_the_rule(tiny_llama, tmp_path, settings, edit,
                                                         error, message):
    bits = settings.get("bits", 4)
    layout = {**dict(bits=4), **settings, "bits": 4 if bits == 3 else bits}
    write_gptq_checkpoint(tiny_llama, str(tmp_path), edit=edit, **layout)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"].update(settings)
    config_path.write_text(json.dumps(config))
    with pytest.raises(error, match=message):
        folojax.load_model(str(tmp_path), load_tokenizer=False, progress=False)


def test_quantize_config_json_is_read_too(tiny_llama, tmp_path):
    twin = write_gptq_checkpoint(tiny_llama, str(tmp_path), 8, 32, False, True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "quantize_config.json").write_text(json.dumps(config.pop("quantization_config")))
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = folojax.load_model(str(tmp_path), dtype="float32", load_tokenizer=False,
                               progress=False)
    assert isinstance(model.params.layers[1].mlp.down, QuantLinear)
    ids = [[3, 4, 5, 6]]
    assert_close(folojax.forward(model.params, model.config, ids),
                 torch_logits(type("Twin", (), {"torch_model": twin}), ids))
    shutil.rmtree(tmp_path)
