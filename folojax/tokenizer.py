"""Host-side text: tokenizer loading, chat templates, and incremental detokenization."""

import os

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str, gguf_reader=None):
    """A transformers tokenizer from a model directory or a .gguf file (`gguf_reader`: that file,
    already opened)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if path.endswith(".gguf"):
        return load_gguf_tokenizer(path, gguf_reader)
    # transformers 5 quietly builds an empty tokenizer for a directory with none of these.
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name))
                                       for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); pass tokenizer=PATH, "
            "or skip_tokenizer_init=True and prompt_token_ids"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"{path}: no usable tokenizer ({type(e).__name__}); pass tokenizer=PATH, or "
            "skip_tokenizer_init=True and prompt_token_ids"
        ) from None


# GGUF special-token names -> the tokenizer's keyword arguments.
_GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                        "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def load_gguf_tokenizer(path: str, reader=None):
    """The tokenizer a GGUF file describes, built as transformers builds it, without torch.

    transformers' own route (AutoTokenizer(gguf_file=...)) reads the metadata with a reader that
    imports torch, a test-only dependency here; we read it with the `gguf` package and hand it to
    transformers' converter. Tests check the result encodes exactly like transformers' route.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # other transformers versions: their public route (needs torch)
        return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".",
                                             gguf_file=os.path.basename(path))

    from folojax.weights.gguf import field, open_gguf

    reader = reader if reader is not None else open_gguf(path)
    groups = {
        group: {ours: field(reader, f"tokenizer.{theirs}") for theirs, ours in names.items()
                if f"tokenizer.{theirs}" in reader.fields}
        for group, names in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":  # sentencepiece: llama.cpp adds BOS
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _GGUF_SPECIAL_TOKENS.items():
        token_id = field(reader, f"tokenizer.ggml.{key}")
        tokenizer_config[name] = None if token_id is None else tokenizer_dict["tokens"][token_id]
    backend, extra = convert_gguf_tokenizer(field(reader, "general.architecture"), tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def normalize_messages(messages) -> list[dict]:
    """Checks a conversation and flattens OpenAI-style content parts ([{"type": "text", "text":
    ...}, ...], joined by newlines) into strings; raises ValueError naming the bad message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a conversation is a non-empty list of {'role', 'content'} messages")
    normalized = []
    for index, message in enumerate(messages):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be a dict with 'role' and 'content', got "
                             f"{type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"{where} has no 'role' string (e.g. 'user')")
        if "content" not in message:
            raise ValueError(f"{where} ({message['role']}) has no 'content'")
        content = message["content"]
        if isinstance(content, (list, tuple)):
            texts = []
            for part_index, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                        part.get("text"), str):
                    raise ValueError(f"{where} content part {part_index} must be "
                                     "{'type': 'text', 'text': str} (only text is supported)")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"{where} content must be a string or a list of text parts, got "
                             f"{type(content).__name__}")
        normalized.append({**message, "content": content})
    return normalized


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        chat_template: str | None = None, **kwargs) -> list[int]:
    """Token ids of a conversation rendered by the model's chat template."""
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template; pass chat_template=...")
    messages = normalize_messages(messages)
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
