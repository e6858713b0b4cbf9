"""A full queue answers 429; a client that drops its stream frees its batch slot."""

from __future__ import annotations

import openai
import pytest

from familial.infer.engine import Engine
from gates import ForwardGate

LONG = {"model": "exit-3", "prompt": "Once upon a time", "max_tokens": 4000}


@pytest.fixture(scope="module")
def tight(family_dir, serve):
    engine = Engine.from_checkpoint(family_dir, max_batch_size=1, max_queue=1, max_seq_len=4096)
    with serve(engine) as running:
        yield running


def test_full_queue_answers_429_and_dropped_streams_free_their_slots(tight, http):
    # The first request's prefill and one decode step pass; then the engine is held, so that
    # request provably still holds the one slot while the others arrive.
    gate = ForwardGate(tight.engine.model.model.embed_tokens, allow=2)
    try:
        check_queue_while_held(tight, http, gate)
    finally:
        gate.remove()


def check_queue_while_held(tight, http, gate: ForwardGate) -> None:
    running_conn, running = http.open_stream(tight.url, "/v1/completions", LONG)
    assert running.status == 200
    first = running.readline()
    assert first.startswith(b"data: {")
    gate.wait_held()
    # The one slot is taken, so this request waits in the queue (submitted before headers come).
    waiting_conn, waiting = http.open_stream(tight.url, "/v1/chat/completions", {
        "model": "exit-3", "max_tokens": 4000, "messages": [{"role": "user", "content": "hi"}]})
    assert waiting.status == 200
    assert http.get(tight.url, "/health")[1]["queue_depth"] == 1

    status, reply = http.post(tight.url, "/v1/completions", {**LONG, "max_tokens": 2})
    assert status == 429
    assert reply["error"]["type"] == "rate_limit_error" and reply["error"]["code"] == "queue_full"
    client = openai.OpenAI(base_url=f"{tight.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="exit-1", prompt="x", max_tokens=2)

    gate.release()
    running.close()
    running_conn.close()
    http.health_until(tight.url, lambda h: h["running"] == 1 and h["queue_depth"] == 0,
                      "the queued request to take the dropped one's slot")
    waiting.close()
    waiting_conn.close()
    http.health_until(tight.url, lambda h: h["running"] == 0 and h["queue_depth"] == 0,
                      "the dropped queued request to leave")

    answer = client.completions.create(model="exit-1", prompt="Once", max_tokens=3)
    assert answer.usage.completion_tokens == 3
