"""Whatever a client sends, it gets an OpenAI-style JSON error and the server keeps serving."""

from __future__ import annotations

import json
import os
import signal

import pytest

from familial.infer.process import EngineProcess

COMPLETION = {"model": "exit-1", "prompt": "Once", "max_tokens": 2}
CHAT = {"model": "exit-3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

# (name, path, body, expected status, expected error param, expected code)
CASES = [
    ("not json", "/v1/completions", "{bad", 400, None, None),
    ("json list", "/v1/completions", "[]", 400, None, None),
    ("no model", "/v1/completions", {"prompt": "x"}, 400, "model", None),
    ("prompt number", "/v1/completions", {**COMPLETION, "prompt": 5}, 400, "prompt", None),
    ("empty prompt", "/v1/completions", {**COMPLETION, "prompt": ""}, 400, "prompt", None),
    ("negative token id", "/v1/completions", {**COMPLETION, "prompt": [1, -1]}, 400, "prompt", None),
    ("token id past vocab", "/v1/completions", {**COMPLETION, "prompt": [1, 10**6]}, 400, "prompt", None),
    ("negative max_tokens", "/v1/completions", {**COMPLETION, "max_tokens": -1}, 400, "max_tokens", None),
    ("max_tokens as text", "/v1/completions", {**COMPLETION, "max_tokens": "5"}, 400, "max_tokens", None),
    ("huge max_tokens", "/v1/completions", {**COMPLETION, "max_tokens": 10**12}, 400, "max_tokens", None),
    ("absurd temperature", "/v1/completions", {**COMPLETION, "temperature": 1e30}, 400, "temperature", None),
    ("zero top_p", "/v1/completions", {**COMPLETION, "top_p": 0}, 400, "top_p", None),
    ("negative seed", "/v1/completions", {**COMPLETION, "seed": -1}, 400, "seed", None),
    ("n of 2", "/v1/completions", {**COMPLETION, "n": 2}, 400, "n", None),
    ("five stops", "/v1/completions", {**COMPLETION, "stop": list("abcde")}, 400, "stop", None),
    ("unsupported field", "/v1/completions", {**COMPLETION, "logprobs": 3}, 400, "logprobs", None),
    ("budget over 1", "/v1/completions", {**COMPLETION, "budget": 2}, 400, "budget", None),
    ("target over 1", "/v1/completions", {**COMPLETION, "target": 1.5}, 400, "target", None),
    ("target as text", "/v1/completions", {**COMPLETION, "target": "0.9"}, 400, "target", None),
    ("target without calibration", "/v1/completions", {**COMPLETION, "model": "auto", "target": 0.9},
     400, None, None),
    ("prompt over context", "/v1/completions", {**COMPLETION, "prompt": [1] * 300}, 400, "prompt",
     "context_length_exceeded"),
    ("answer over context", "/v1/completions", {**COMPLETION, "max_tokens": 255}, 400, "max_tokens",
     "context_length_exceeded"),
    ("unknown model", "/v1/completions", {**COMPLETION, "model": "exit-2"}, 404, "model", "model_not_found"),
    ("no drafter for the smallest", "/v1/completions", {**COMPLETION, "speculative": True}, 400, None, None),
    ("no messages", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", None),
    ("unknown role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
     400, "messages", None),
    ("content number", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]},
     400, "messages", None),
    ("image part", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     400, "messages", None),
    ("lone surrogate", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]},
     400, "messages", None),
    ("two max tokens", "/v1/chat/completions", {**CHAT, "max_tokens": 3, "max_completion_tokens": 4},
     400, "max_completion_tokens", None),
]


@pytest.mark.parametrize("name, path, body, status, param, code", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_a_json_error(live, http, name, path, body, status, param, code):
    got, reply = http.post(live.url, path, body)
    assert got == status, reply
    error = reply["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert error["param"] == param
    assert error["code"] == code


def test_oversized_body_and_wrong_methods_get_json_errors(live, http):
    status, reply = http.post(live.url, "/v1/completions", b"x" * (9 * 2**20))
    assert status == 413 and "bytes" in reply["error"]["message"]
    status, reply = http.get(live.url, "/v1/completions")
    assert status == 405 and reply["error"]["type"] == "invalid_request_error"
    status, reply = http.get(live.url, "/v1/nothing")
    assert status == 404 and reply["error"]["type"] == "not_found_error"
    status, reply = http.post(live.url, "/v1/completions", '{"model": "exit-1", "prompt": "x"}', "text/plain")
    assert status == 400 and "error" in reply


def test_server_keeps_serving_after_bad_requests(live, http):
    for _, path, body, *_ in CASES:
        http.post(live.url, path, body)
    status, reply = http.post(live.url, "/v1/completions", COMPLETION)
    assert status == 200 and reply["usage"]["completion_tokens"] == 2
    status, health = http.get(live.url, "/health")
    assert status == 200 and health["ok"] and health["running"] == 0 and health["queue_depth"] == 0


def test_a_dead_engine_process_gets_503_on_streams_requests_and_health(family_dir, serve, http):
    engine = EngineProcess(family_dir, threads=1, max_batch_size=2, max_queue=4)
    with serve(engine) as server:
        # Thousands of tokens from a tiny model: the kill lands mid-stream.
        connection, stream = http.open_stream(server.url, "/v1/completions", {**COMPLETION, "max_tokens": 4000})
        assert stream.status == 200 and stream.readline().startswith(b"data: {")
        os.kill(engine._process.pid, signal.SIGKILL)
        events = [json.loads(line[6:]) for line in stream if line.startswith(b"data: {")]
        connection.close()
        assert events[-1]["error"]["code"] == "cancelled"
        assert "the engine process ended" in events[-1]["error"]["message"]
        status, reply = http.post(server.url, "/v1/completions", COMPLETION)
        assert status == 503 and reply["error"]["code"] == "engine_unavailable"
        status, health = http.get(server.url, "/health")
        assert status == 503 and health["ok"] is False
        # Nothing is served any more, and the list of models says so (it answered 200).
        status, reply = http.get(server.url, "/v1/models")
        assert status == 503 and reply["error"]["code"] == "engine_unavailable"
        assert "the engine process ended" in reply["error"]["message"]
