"""Incremental detokenization with stop-string detection and hold-back of possible stop prefixes."""

from __future__ import annotations

from typing import Any, Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], **kw: Any) -> str: ...


class IncrementalText:
    """Turns a growing token list into text deltas, cutting the text before the first stop string.

    Decoding is incremental (a short window of recent tokens, as streaming detokenizers do), so a step
    costs the same however long the completion is. The tail that could still grow into a stop string,
    or is an incomplete UTF-8 sequence, is held back until it resolves.
    """

    def __init__(self, tokenizer: Decoder, stop: tuple[str, ...]) -> None:
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._prefix = 0  # start of the window re-decoded for context (merges across token boundaries)
        self._read = 0  # tokens already turned into `text`
        self.text = ""  # everything decoded so far (before stop cutting)
        self.emitted = ""
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _advance(self, ids: list[int], final: bool) -> None:
        if len(ids) <= self._read:
            return
        before = self._decode(ids[self._prefix:self._read])
        after = self._decode(ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(ids)

    def update(self, ids: list[int], final: bool = False) -> str:
        """The new text for the completion `ids`; sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        self._advance(ids, final)
        text = self.text
        if self._stop:
            search_from = max(0, len(self.emitted) - self._hold)
            cut = -1
            for s in self._stop:
                at = text.find(s, search_from)
                if at != -1 and (cut == -1 or at < cut):
                    cut = at
            if cut != -1:
                self.stopped = True
                return self._emit(text[:cut])
        if final:
            return self._emit(text)
        return self._emit(text[: max(len(text) - self._partial_stop(text), len(self.emitted))])

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        for k in range(min(self._hold, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0

    def _emit(self, text: str) -> str:
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta
