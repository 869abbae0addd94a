"""Perplexity (folojax/perplexity.py) from the engine's prompt logprobs, against torch."""

import math

import numpy as np
import pytest
import torch

import folojax
from folojax.cli import main
from folojax.perplexity import (
    PerplexityResult,
    folojax_perplexity,
    format_perplexity,
    windows,
)


def test_windows_are_consecutive_and_a_lone_last_token_is_dropped():
    assert windows(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]  # [6] scores nothing
    assert windows(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ValueError, match="context_len must be >= 2"):
        windows([1, 2, 3], 1)
    with pytest.raises(ValueError, match="the text has 1 token"):
        windows([5], 4)


def test_perplexity_equals_torch_on_the_same_windows(tiny_qwen3):
    token_ids = np.random.default_rng(2).integers(3, 320, 100).tolist()
    token_windows = windows(token_ids, 40)  # 40, 40, 20 tokens
    llm = folojax.LLM(tiny_qwen3.path, skip_tokenizer_init=True, dtype="float32",
                      max_model_len=41)
    ours = folojax_perplexity(llm, token_windows)
    nll = 0.0
    for window in token_windows:
        with torch.no_grad():
            logits = tiny_qwen3.torch_model(torch.tensor([window])).logits[0, :-1].double()
        nll -= torch.log_softmax(logits, -1).gather(-1, torch.tensor(window[1:])[:, None]).sum()
    assert ours.num_scored_tokens == 39 + 39 + 19
    assert ours.perplexity == pytest.approx(math.exp(float(nll) / 97), rel=1e-5)


def test_the_table_compares_each_engine_with_transformers_and_the_first():
    results = [PerplexityResult("folojax [none]", 10.0, 5, 1.0),
               PerplexityResult("folojax [int8]", 10.5, 5, 1.0),
               PerplexityResult("transformers", 10.0, 5, 2.0)]
    table = format_perplexity(results)
    assert "folojax [int8] / transformers: perplexity +5.00%" in table
    assert "folojax [int8] / folojax [none]: perplexity +5.00%" in table


@pytest.mark.parametrize("argv, message", [
    (["perplexity", "--text", "/no/such/file.txt"], "No such file"),
    (["perplexity", "--text", "x", "--context-len", "1"], "--context-len must be >= 2"),
    (["perplexity", "--text", "x", "--quantization", "q2"], "--quantization 'q2'")])
def test_bad_perplexity_arguments_are_rejected_before_the_model_loads(argv, message, capsys,
                                                                      monkeypatch):
    import folojax.weights.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(argv) == 2
    assert message in capsys.readouterr().err
