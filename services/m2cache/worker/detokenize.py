"""Incremental detokenisation with stop strings. Each new token yields the text
it adds; text is held back while it ends mid-character or could be the start of
a stop string. Only the last few tokens are decoded per step (a prefix window,
as SentencePiece/BPE decoding depends on the previous token), so a long
generation costs O(1) decoding per token."""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids=(), stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        # Decode windows start inside the prompt so the first token's leading
        # space / byte-fallback pieces come out as they do in the whole text.
        self.ids: list[int] = list(prompt_ids)[-4:]
        self.prefix_offset = 0  # window start: ids[prefix_offset:read_offset] is decoded text already counted
        self.read_offset = len(self.ids)
        self.text = ""  # generated text so far (emitted + held back)
        self.sent = 0  # characters of self.text already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token -> (new text to emit, whether a stop string was reached)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # complete characters arrived
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        for s in self.stop:
            cut = self.text.find(s, max(0, self.sent - len(s)))
            if cut >= 0:
                out = self.text[self.sent : cut] if cut > self.sent else ""
                self.sent = max(self.sent, cut)
                return out, True
        end = self._safe_end(len(self.text))
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out, False

    def _safe_end(self, end: int) -> int:
        """Hold back a tail that is a prefix of a stop string."""
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if self.text[end - k : end] == s[:k]:
                    return end - k
        return end

    def flush(self) -> str:
        """Text still held back (at the end of generation without a stop)."""
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out
