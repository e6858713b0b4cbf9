"""Streaming text of a growing answer: incremental detokenisation and stop strings.

Each new token decodes only a short window (the tokens since the last complete piece of
text), so a long answer costs the same per token as a short one. Text is released only when
it is final: not an incomplete UTF-8 character, and not the start of a stop string that the
next tokens may complete. A stop string ends the answer before it.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.longest = max(map(len, stops), default=0)
        self.ids: list[int] = []
        # ids[prefix:read] decode to the text just before ids[read:]; decoding from a token
        # before `read` keeps the spacing the tokenizer derives from the previous token.
        self.prefix = self.read = 0
        self.text = ""
        self.sent = 0

    def add(self, token: int | None, final: bool) -> tuple[str, bool]:
        """Append a token (None: an end token, not part of the text); return the text newly
        released and whether a stop string ended the answer."""
        if token is not None:
            self.ids.append(token)
            before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
            after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
            complete = len(after) > len(before) and not after.endswith("\ufffd")
            if complete or final:
                self.text += after[len(before):]
                self.prefix, self.read = self.read, len(self.ids)
        start = max(0, self.sent - self.longest + 1)
        hits = [at for at in (self.text.find(stop, start) for stop in self.stops) if at >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._release(len(self.text)), True
        safe = len(self.text)
        if not final:
            for stop in self.stops:
                for n in range(min(len(stop) - 1, safe - self.sent), 0, -1):
                    if self.text.endswith(stop[:n]):
                        safe = min(safe, len(self.text) - n)
                        break
        return self._release(safe), False

    def _release(self, end: int) -> str:
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta
