"""Incremental detokenization with stop strings.

Tokens are decoded in a sliding window (`ids[prefix:]` minus `ids[prefix:read]`, as in vLLM) so tokenizers whose
pieces depend on their neighbours (SentencePiece's leading space) decode the same as the whole output. Text is only
committed once it does not end in U+FFFD: with the byte-level tokenizer a non-ASCII character spans several tokens,
and its bytes stay pending until the character is complete. Committed text that could still be the start of a stop
string is held back until resolved, so the concatenation of the streamed pieces always equals the final text, and
the final text stops right before the first stop string. All state is plain Python data (picklable; the tokenizer
is passed to each call, never stored).
"""

from __future__ import annotations

from typing import Any, Optional

REPLACEMENT = "\ufffd"


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token's text for logprobs: its decoded text, or its vocabulary string when that is not whole characters
    (a lone UTF-8 byte), so that distinct tokens keep distinct keys in `top_logprobs`."""
    s = tokenizer.decode([token_id], skip_special_tokens=False)
    if not s or REPLACEMENT in s:
        s = tokenizer.convert_ids_to_tokens(token_id) or f"<token {token_id}>"
    return s


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class IncrementalDetokenizer:
    def __init__(self, stop: Optional[list[str]] = None):
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self.prefix = 0  # window start (context for the next piece)
        self.read = 0  # ids before this are committed to `text`
        self.text = ""  # committed text (truncated at a stop string once found)
        self.emitted = 0  # chars of `text` already returned
        self.stopped = False

    def add(self, tokenizer: Any, token_id: int) -> str:
        """Feed one generated token; returns the newly releasable text ("" while pending). Sets `stopped` when a stop
        string completes (the returned text then ends right before it)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix_text = decode(tokenizer, self.ids[self.prefix : self.read])
        new_text = decode(tokenizer, self.ids[self.prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.text += new_text[len(prefix_text) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self, tokenizer: Any) -> str:
        """The sequence ended (EOS / length): commit pending tokens (even an incomplete character) and release all."""
        if not self.stopped and self.read < len(self.ids):
            prefix_text = decode(tokenizer, self.ids[self.prefix : self.read])
            new_text = decode(tokenizer, self.ids[self.prefix :])
            self.text += new_text[len(prefix_text) :]
            self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self.stop:
            hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._emit(len(self.text))
        end = len(self.text)
        if not final:
            end -= self._partial_stop_len()
        return self._emit(end)

    def _partial_stop_len(self) -> int:
        """Length of the longest unreleased suffix of `text` that is a proper prefix of some stop string."""
        tail = self.text[self.emitted :]
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best

    def _emit(self, end: int) -> str:
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out

    # ---- transfer (prefill → decode replica) ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> IncrementalDetokenizer:
        d = cls()
        d.__dict__.update({k: (list(v) if isinstance(v, list) else v) for k, v in state.items()})
        return d
