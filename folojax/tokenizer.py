"""Host-side text: tokenizer loading, chat templates, and incremental detokenization."""

import os


def load_tokenizer(path: str):
    """A transformers tokenizer from a model directory or a .gguf file."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".",
                                             gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        chat_template: str | None = None, **kwargs) -> list[int]:
    """Token ids of a conversation rendered by the model's chat template."""
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template; pass chat_template=...")
    text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template,
                                         add_generation_prompt=add_generation_prompt, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one delta at a time.

    A token can end in the middle of a multi-byte character; its text is held back (decode gives
    U+FFFD there) until the character completes. The deltas concatenate to tokenizer.decode(ids).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # decoding starts here, so merges across the boundary are right
        self._read_offset = 0  # tokens before this are already in self.text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Appends one token; returns the newly completed text (possibly empty)."""
        self.token_ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of a sequence: emits any text still held back."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        ids = self.token_ids
        prefix_text = self._decode(ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""
        delta = full_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        self.text += delta
        return delta
