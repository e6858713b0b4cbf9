"""Output processing: a token the engine committed -> the event its request's caller reads.

Apart from scheduling and the model (as vLLM v1's output processor): whether the token ends
the request (eos or one of its stop tokens, its length, the cache's length, a stop string) and
its newly detokenised text (familial.infer.detokenize holds back text while a stop string may
be forming).
"""

from __future__ import annotations

from familial.infer.requests import TokenEvent


class OutputProcessor:
    def __init__(self, eos: set[int], max_seq_len: int) -> None:
        self.eos, self.max_seq_len = eos, max_seq_len

    def event(self, sequence, token: int, exit_layer: int) -> TokenEvent:
        """The event of `token`, just appended to `sequence.generated`."""
        reason = None
        end = token in self.eos or token in sequence.params.stop_token_ids
        if end:
            reason = "stop"
        elif len(sequence.generated) >= sequence.params.max_new_tokens \
                or sequence.length + 1 >= self.max_seq_len:
            reason = "length"
        text = ""
        if sequence.text is not None:
            text, stopped = sequence.text.add(None if end else token, final=reason is not None)
            reason = "stop" if stopped else reason
        return TokenEvent(token, text, exit_layer, reason is not None, reason)
