"""The embedded SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers+torch on the same file."""

import os

import jax
import numpy as np
import pytest
import torch
import transformers

import folojax
from folojax.model.weights import PanelLinear, QuantLinear
from folojax.weights.loader import embedded_model_path
from tests.test_decode_steps import count_decode_steps

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def hf_smollm2():
    path = embedded_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def test_greedy_chat_answer_names_paris(smollm2):
    outputs = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}],
                           folojax.SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    completion = outputs[0].outputs[0]
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop" and completion.token_ids[-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in completion.text


def test_greedy_token_ids_equal_transformers_on_the_same_gguf(smollm2, hf_smollm2):
    tokenizer = smollm2.get_tokenizer()
    prompts = ["Once upon a time, in a small village,", "def fibonacci(n):",
               "The three primary colors are"]
    sampling = folojax.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = smollm2.generate(prompts, sampling, use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = tokenizer(prompt).input_ids
        assert output.prompt_token_ids == ids
        with torch.no_grad():
            reference = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=24,
                                            do_sample=False, eos_token_id=None, pad_token_id=2)
        assert output.outputs[0].token_ids == reference[0, len(ids):].tolist(), prompt
        assert output.outputs[0].text == tokenizer.decode(output.outputs[0].token_ids,
                                                          skip_special_tokens=True)


def test_stop_string_cuts_the_text(smollm2):
    sampling = folojax.SamplingParams(temperature=0, max_tokens=40, stop=["five"])
    completion = smollm2.generate(["Count: one, two,"], sampling, use_tqdm=False)[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == "five"
    assert completion.text == " three, four, "
    with_stop = smollm2.generate(["Count: one, two,"], folojax.SamplingParams(
        temperature=0, max_tokens=40, stop=["five"], include_stop_str_in_output=True),
        use_tqdm=False)[0].outputs[0]
    assert with_stop.text == " three, four, five"


def test_stop_token_ids_and_min_tokens(smollm2):
    tokenizer = smollm2.get_tokenizer()
    comma = tokenizer.encode(",")[0]
    completion = smollm2.generate(["Count: one, two,"], folojax.SamplingParams(
        temperature=0, max_tokens=40, stop_token_ids=[comma]), use_tqdm=False)[0].outputs[0]
    assert completion.token_ids[-1] == comma and completion.stop_reason == comma
    assert completion.token_ids.count(comma) == 1
    min_tokens = len(completion.token_ids) + 1
    longer = smollm2.generate(["Count: one, two,"], folojax.SamplingParams(
        temperature=0, max_tokens=40, stop_token_ids=[comma], min_tokens=min_tokens),
        use_tqdm=False)[0].outputs[0]
    assert comma not in longer.token_ids[:min_tokens]  # banned until min_tokens
    assert len(longer.token_ids) > min_tokens and longer.token_ids[-1] == comma


def test_n_completions_and_seeds(smollm2):
    # ignore_eos: after this prompt EOS has probability 0.46, and the texts must differ.
    sampling = folojax.SamplingParams(temperature=1.0, max_tokens=12, seed=7, n=3,
                                      ignore_eos=True)
    outputs = smollm2.generate(["Tell me a story about a cat."], sampling, use_tqdm=False)[0]
    texts = [c.text for c in outputs.outputs]
    assert [c.index for c in outputs.outputs] == [0, 1, 2] and len(set(texts)) == 3
    single = smollm2.generate(["Tell me a story about a cat."], folojax.SamplingParams(
        temperature=1.0, max_tokens=12, seed=7, ignore_eos=True), use_tqdm=False)[0]
    assert single.outputs[0].token_ids == outputs.outputs[0].token_ids


def test_the_embedded_gguf_stays_quantized_and_equals_its_dequantized_logits(smollm2):
    """Its Q4_1 linears stay 4-bit and its tied Q8_0 embedding (the head) 8-bit; the logits equal
    the dequantized model's up to the order of float32 sums."""
    params = smollm2.model.params
    assert isinstance(params.embed, QuantLinear) and params.embed.bits == 8
    assert params.lm_head is None and params.head is params.embed
    assert all(isinstance(layer.mlp.gate_up, QuantLinear) and layer.mlp.gate_up.bits == 4
               for layer in params.layers)
    dequantized = folojax.load_model(quantization="none", load_tokenizer=False, progress=False)
    assert isinstance(dequantized.params.embed, jax.Array | PanelLinear)
    ids = [smollm2.get_tokenizer()("The capital of France is Paris, and").input_ids]
    ours = np.asarray(folojax.forward(params, smollm2.model.config, ids))
    reference = np.asarray(folojax.forward(dequantized.params, dequantized.config, ids))
    assert np.abs(ours - reference).max() <= 2e-5 * np.abs(reference).max()


def test_perplexity_on_the_embedded_gguf_equals_transformers():
    from folojax.perplexity import run_perplexity

    text = " ".join(["The capital of France is Paris, and the capital of Italy is Rome."] * 8)
    ours, reference = run_perplexity(None, text, context_len=64, compare_hf=True)
    assert ours.num_scored_tokens == reference.num_scored_tokens > 100
    assert 1 < ours.perplexity < 50  # a repeated sentence is easy to predict
    assert ours.perplexity == pytest.approx(reference.perplexity, rel=1e-4)


def test_multi_step_decode_gives_the_same_texts(smollm2, monkeypatch):
    """4 tokens per dispatch against single steps on the real model and tokenizer: a stop
    string met inside a dispatch (text cut, the tokens after it dropped), seeded sampling with
    n=2, and a chat answer."""
    multi = folojax.LLM.from_model(smollm2.model, max_model_len=2048, num_scheduler_steps=4)
    prompts = ["Count: one, two,", "Tell me a story about a cat.", "Name three colours."]
    samplings = [folojax.SamplingParams(temperature=0, max_tokens=40, stop=["five"]),
                 folojax.SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=30),
                 folojax.SamplingParams(temperature=0, max_tokens=23)]

    def texts(llm):
        return [[(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs]
                for o in llm.generate(prompts, samplings, use_tqdm=False)]

    single = texts(smollm2)
    steps = count_decode_steps(monkeypatch)
    assert texts(multi) == single
    assert 4 in steps
    assert single[0][0][0] == " three, four, " and single[0][0][2] == "stop"
