"""Quantized weights end to end against torch: int8 per output channel, made at load time from
the random-weight checkpoints and run against int8 activations, through load_model and LLM."""

import numpy as np
import pytest

import folojax
from folojax.model.weights import Int8Linear
from tests.reference.test_hf_equivalence import hf_greedy, torch_logits

# int8 per output channel moves each weight by up to half a step (max |row| / 254): ~0.6% RMS of
# these random weights, and int8 activations (per block of 32) each input by about as much; two
# layers of large random weights amplify that to a few % of the logits at the largest (measured
# 2.8-4.5% with float activations). A wrong scale, row, block or quad is off by O(1).
INT8_TOLERANCE = 0.06


def test_int8_logits_stay_within_tolerance_of_torch_fp32(tiny):
    model = folojax.load_model(tiny.path, dtype="float32", load_tokenizer=False,
                               quantization="int8", progress=False)
    linears = [model.params.head, model.params.layers[1].attention.qkv,
               model.params.layers[0].mlp.down]
    assert all(isinstance(linear, Int8Linear) for linear in linears)
    ids = np.random.default_rng(0).integers(3, 320, (2, 19)).tolist()
    ours = np.asarray(folojax.forward(model.params, model.config, ids))
    reference = torch_logits(tiny, ids)
    assert np.abs(ours - reference).max() <= INT8_TOLERANCE * np.abs(reference).max()
    assert (ours.argmax(-1) == reference.argmax(-1)).mean() >= 0.9


def test_llm_with_int8_generates_what_its_own_forward_predicts(tiny_qwen3):
    """The engine's paged steps over int8 weights follow the dense reference over the same
    weights, token for token, and the int8 model stays close to torch's greedy tokens."""
    llm = folojax.LLM(tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32",
                      quantization="int8")
    assert isinstance(llm.model.params.head, Int8Linear)
    prompt = [5, 17, 42, 99, 7, 3, 250, 11]
    sampling = folojax.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    [output] = llm.generate({"prompt_token_ids": prompt}, sampling, use_tqdm=False)
    tokens = output.outputs[0].token_ids
    sequence = list(prompt)
    for _ in range(12):  # greedy through the dense forward over the same int8 params
        logits = folojax.forward(llm.model.params, llm.model.config, [sequence])
        sequence.append(int(np.asarray(logits)[0, -1].argmax()))
    assert tokens == sequence[len(prompt):]
    reference = hf_greedy(tiny_qwen3, prompt, 12)
    agreeing = next((i for i in range(12) if tokens[i] != reference[i]), 12)
    assert agreeing >= 3  # int8 may part from fp32's greedy path, but not at once


def test_an_unknown_quantization_fails_before_loading(tiny_qwen3):
    with pytest.raises(ValueError, match="quantization 'fp4'"):
        folojax.LLM(tiny_qwen3.path, skip_tokenizer_init=True, quantization="fp4")
