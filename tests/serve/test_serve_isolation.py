"""Whatever one request asks for, it cannot fail another, and no input gets a 5xx.

The hostile requests are the exact ones of issue 12: sampling parameters inside the accepted
ranges whose arithmetic overflows (temperature 1e-38 with repetition penalty 0.01 while four
normal streams run; top_p 1e-300, temperature 1e-45, top_p 1e-300 with top_k 1 alone). Each
is answered (200) or refused with a 4xx or an error event; the normal streams finish.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from familial.infer.engine import Engine, TokenEvent

NORMAL = {"model": "exit-3", "prompt": "Once upon a time", "max_tokens": 96, "temperature": 0}
HOSTILE_WITH_OTHERS = {"model": "exit-3", "max_tokens": 80, "temperature": 1e-38, "repetition_penalty": 0.01}
HOSTILE_ALONE = [{"top_p": 1e-300}, {"temperature": 1e-45}, {"top_p": 1e-300, "top_k": 1}]


def read_events(response) -> list[dict | str]:
    """The stream's `data:` payloads, parsed; '[DONE]' kept as a string."""
    events = []
    for line in response:
        if line.startswith(b"data: "):
            payload = line[6:].strip().decode()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def finished_normally(events: list) -> bool:
    chunks = [e for e in events if isinstance(e, dict)]
    return (events[-1] == "[DONE]" and not any("error" in c for c in chunks)
            and chunks[-1]["choices"][0]["finish_reason"] == "length")


def answered_or_refused(status: int, reply) -> bool:
    return status == 200 or (400 <= status < 500 and bool(reply["error"]["message"]))


@pytest.fixture(scope="module")
def roomy(family_dir, serve):
    # Five slots: the hostile request shares the decode batch with the four streams.
    engine = Engine.from_checkpoint(family_dir, max_batch_size=5, max_queue=8, max_seq_len=256)
    with serve(engine) as running:
        yield running


def prompt_that_overflows_late(engine: Engine) -> list[int]:
    """Token ids whose own logits at the last position are all negative. With repetition
    penalty 0.01 and temperature 1e-38 such a prompt samples its first token fine; the overflow
    (a seen token's positive logit x100 / 1e-38) comes at a later step, in the decode batch
    the normal streams share, as in issue 12 (there after 50 tokens)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(1000):
            ids = torch.randint(0, engine.config.vocab_size, (4,), generator=generator).tolist()
            logits = engine.model(torch.tensor([ids]))[3][0, -1]
            if logits[ids].max() < 0:
                return ids
    raise AssertionError("no prompt with negative logits for all its tokens")


def test_one_hostile_request_does_not_end_four_normal_streams(roomy, http):
    hostile = {**HOSTILE_WITH_OTHERS, "prompt": prompt_that_overflows_late(roomy.engine)}
    status, reply = http.post(roomy.url, "/v1/completions", NORMAL)
    assert status == 200
    normal = reply["choices"][0]["text"]
    streams = [http.open_stream(roomy.url, "/v1/completions", NORMAL) for _ in range(4)]
    first_events = []
    for _, response in streams:
        assert response.status == 200
        first = response.readline()
        assert first.startswith(b"data: {")  # running: the first token is out
        first_events.append(json.loads(first[6:]))
    status, reply = http.post(roomy.url, "/v1/completions", hostile)
    assert answered_or_refused(status, reply), (status, reply)
    for (connection, response), first in zip(streams, first_events):
        events = [first, *read_events(response)]
        connection.close()
        assert finished_normally(events), events[-3:]
        # Greedy: each stream sharing the batch with the hostile request says what it says alone.
        assert "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict)) == normal
    assert http.post(roomy.url, "/v1/completions", NORMAL)[1]["choices"][0]["text"] == normal


@pytest.mark.parametrize("sampling", HOSTILE_ALONE, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_degenerate_sampling_alone_gets_no_5xx(roomy, http, sampling):
    body = {"model": "exit-3", "prompt": "Once upon a time", "max_tokens": 24, **sampling}
    status, reply = http.post(roomy.url, "/v1/completions", body)
    assert answered_or_refused(status, reply), (status, reply)
    connection, response = http.open_stream(roomy.url, "/v1/chat/completions", {
        "model": "exit-1", "max_tokens": 24, "messages": [{"role": "user", "content": "hi"}], **sampling})
    events = read_events(response)
    connection.close()
    assert response.status == 200 and events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert any("error" in c or any(x.get("finish_reason") for x in c["choices"]) for c in chunks)


class FailedHandle:
    """What the engine hands back for a request whose own step failed: one token, then an
    event with finish_reason 'error' (the engine's per-request failure signal)."""

    prompt_tokens, completion_tokens = 4, 1

    def __init__(self) -> None:
        self.events = [TokenEvent(7, "x", 3), TokenEvent(None, "", None, True, "error", "RuntimeError: boom")]

    def listen(self, callback) -> None:
        pass  # every event is there from the start

    def drain(self) -> list[TokenEvent]:
        events, self.events = self.events, []
        return events

    def cancel(self) -> None:
        pass


def test_a_request_the_engine_fails_gets_400_or_an_error_event(family_dir, serve, http):
    engine = Engine.from_checkpoint(family_dir, max_batch_size=1, max_queue=2, max_seq_len=128)
    engine.submit = lambda *args, **kwargs: FailedHandle()
    with serve(engine) as live:
        status, reply = http.post(live.url, "/v1/completions", {"model": "exit-3", "prompt": "hi"})
        assert status == 400 and reply["error"]["code"] == "generation_failed"
        assert "boom" in reply["error"]["message"]
        connection, response = http.open_stream(live.url, "/v1/completions", {"model": "exit-3", "prompt": "hi"})
        events = read_events(response)
        connection.close()
        assert response.status == 200 and events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "generation_failed"


def test_concurrent_hostile_and_normal_chat_all_finish(roomy, http):
    results: dict[str, tuple[int, dict]] = {}

    def send(name: str, body: dict) -> None:
        results[name] = http.post(roomy.url, "/v1/chat/completions", body)

    chat = {"model": "exit-3", "max_tokens": 32, "messages": [{"role": "user", "content": "hello"}]}
    bodies = {"normal": {**chat, "temperature": 0},
              **{f"hostile-{i}": {**chat, **s} for i, s in enumerate(HOSTILE_ALONE)},
              "hostile-overflow": {**chat, "temperature": 1e-38, "repetition_penalty": 0.01}}
    threads = [threading.Thread(target=send, args=item) for item in bodies.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["normal"][0] == 200 and results["normal"][1]["usage"]["completion_tokens"] > 0
    for name, (status, reply) in results.items():
        assert answered_or_refused(status, reply), (name, status, reply)
