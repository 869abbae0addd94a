"""TextStream: what a streamed completion may send next. The engine's text for a request is
cumulative and already whole characters (the detokenizer holds back a split multi-byte
character); a stop string found later truncates it. So while the request runs, the last
len(longest stop string) - 1 characters are held back: they could be the start of a stop
string, and text once sent cannot be taken back. The deltas of a stream concatenate to exactly
the finished text."""

from __future__ import annotations


class TextStream:
    def __init__(self, stop: list[str]):
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.num_sent_chars = 0
        self.num_sent_tokens = 0

    def delta(self, text: str, finished: bool) -> str:
        """The text not sent yet that is safe to send now (all of it once finished)."""
        end = len(text) if finished else max(len(text) - self.hold_back, self.num_sent_chars)
        delta = text[self.num_sent_chars:end]
        self.num_sent_chars = end
        return delta

    def new_token_ids(self, token_ids: list[int]) -> list[int]:
        new = token_ids[self.num_sent_tokens:]
        self.num_sent_tokens = len(token_ids)
        return new
