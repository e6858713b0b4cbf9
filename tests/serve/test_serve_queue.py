"""A full queue answers 429; a client that drops its stream frees its batch slot."""

from __future__ import annotations

import openai
import pytest

from familial.infer.engine import Engine

# Long enough that the first request is still decoding while the others arrive.
LONG = {"model": "exit-3", "prompt": "Once upon a time", "max_tokens": 4000}


@pytest.fixture(scope="module")
def tight(family_dir, serve):
    engine = Engine.from_checkpoint(family_dir, max_batch_size=1, max_queue=1, max_seq_len=4096)
    with serve(engine) as running:
        yield running


def test_full_queue_answers_429_and_dropped_streams_free_their_slots(tight, http):
    running_conn, running = http.open_stream(tight.url, "/v1/completions", LONG)
    assert running.status == 200
    first = running.readline()
    assert first.startswith(b"data: {")
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
