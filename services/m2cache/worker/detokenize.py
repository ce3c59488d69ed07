"""Incremental detokenisation with stop strings: each new token yields the text
it adds (held back while it ends mid-character or could be the start of a
stop string)."""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted

    def _text(self) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token -> (new text to emit, whether a stop string was reached)."""
        self.ids.append(token)
        text = self._text()
        for s in self.stop:
            cut = text.find(s)
            if cut >= 0:
                out = text[self.sent : cut] if cut > self.sent else ""
                self.sent = max(self.sent, cut)
                return out, True
        end = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            end = text.rstrip("\ufffd").__len__()
        end = min(end, self._safe_end(text, end))
        out = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out, False

    def _safe_end(self, text: str, end: int) -> int:
        """Hold back a tail that is a prefix of a stop string."""
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[end - k : end] == s[:k]:
                    return end - k
        return end

    def flush(self) -> str:
        """Text still held back (at the end of generation without a stop)."""
        text = self._text()
        out = text[self.sent :]
        self.sent = len(text)
        return out
