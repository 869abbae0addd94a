"""Incremental detokenization against tokenizer.decode, on the real SmolLM2 tokenizer."""

import os

import pytest

from folojax.tokenizer import IncrementalDetokenizer
from folojax.weights.loader import embedded_model_path

TEXTS = ["Hello, world!", "naïve café — 東京タワー 🍣🍣 done", "emoji 👩‍👩‍👧 family",
         "  spaced\n\nlines\t"]


@pytest.mark.real_model
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode(smollm2, text):
    tokenizer = smollm2.get_tokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add(token) for token in ids] + [detokenizer.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == detokenizer.text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.real_model
def test_held_back_partial_character_is_flushed(smollm2):
    tokenizer = smollm2.get_tokenizer()
    ids = tokenizer.encode("🍣", add_special_tokens=False)
    assert len(ids) > 1  # the emoji's bytes span several tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.add(ids[0]) == ""  # an incomplete character is held back
    assert detokenizer.flush() == tokenizer.decode(ids[:1])


@pytest.mark.real_model
def test_gguf_tokenizer_matches_transformers_own_gguf_route(smollm2):
    """We build the GGUF tokenizer without torch; it must equal AutoTokenizer(gguf_file=...)."""
    from transformers import AutoTokenizer

    path = embedded_model_path()
    reference = AutoTokenizer.from_pretrained(os.path.dirname(path),
                                              gguf_file=os.path.basename(path))
    ours = smollm2.get_tokenizer()
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert ours(text).input_ids == reference(text).input_ids
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert (ours.eos_token, ours.bos_token, ours.all_special_ids) == (
        reference.eos_token, reference.bos_token, reference.all_special_ids)
