"""Incremental detokenization against tokenizer.decode, on the real SmolLM2 tokenizer."""

import pytest

from folojax.tokenizer import IncrementalDetokenizer

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
