"""The official openai client against the live server: answers equal the runtime's own."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from familial.chat_template import ChatTemplate
from familial.infer.sampling import SamplingParams

PROMPT = "Once upon a time"


def runtime_answer(live, prompt_ids, member, max_tokens):
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0)
    return live.engine.generate([prompt_ids], member=member, params=params)[0]


def test_models_lists_every_member_with_aliases_and_auto(client):
    models = {m.id: m.familial for m in client.models.list().data}
    assert list(models) == ["exit-1", "exit-3", "auto"]
    assert models["exit-1"] == {"exit": 1, "layers": 2, "aliases": ["small"]}
    assert models["exit-3"] == {"exit": 3, "layers": 4, "aliases": []}
    assert models["auto"]["exit"] is None


def test_completion_equals_the_runtime_with_usage_and_exits(client, live):
    response = client.completions.create(model="small", prompt=PROMPT, max_tokens=10, temperature=0)
    ids = live.engine.tokenizer.encode(PROMPT).ids
    expected = runtime_answer(live, ids, 1, 10)
    assert response.model == "exit-1"
    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens,
            response.usage.total_tokens) == (len(ids), 10, len(ids) + 10)
    assert response.familial == {"member": "exit-1", "exits": [1] * 10}


def test_token_id_prompt_answers_like_the_text_prompt(client, live):
    ids = live.engine.tokenizer.encode(PROMPT).ids
    by_text = client.completions.create(model="exit-3", prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="exit-3", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_seeded_sampling_repeats(client):
    answers = {client.completions.create(model="exit-3", prompt=PROMPT, max_tokens=8, temperature=1.0,
                                         top_p=0.9, seed=7).choices[0].text for _ in range(2)}
    assert len(answers) == 1


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model="exit-3", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="exit-3", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert [e for c in chunks for e in c.familial["exits"]] == whole.familial["exits"]
    assert all("".join(c.familial["pieces"]) == c.choices[0].text for c in with_choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert {c.id for c in chunks} == {chunks[0].id}


def test_a_chunk_carrying_several_tokens_gives_each_its_text_and_exit():
    """A client that reads slower than the engine writes gets several tokens in one chunk;
    `pieces` lets it still colour each token by its own exit (the playground does)."""
    from familial.infer.requests import TokenEvent
    from familial.serve.app import Job, _stream

    batches = [[TokenEvent(5, "Once", 1)],
               [TokenEvent(6, "", 3), TokenEvent(7, " upo", 1), TokenEvent(8, "n a", 3, True, "length")]]

    class Server:
        async def events(self, job, request):
            for batch in batches:
                job.exits += [event.exit for event in batch]
                yield batch

    async def read():
        job = Job(handle=None, model="auto", id="cmpl-1")
        return [line async for line in _stream(Server(), job, None, chat=False, usage=False)]

    lines = asyncio.run(read())
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["Once", " upon a"]
    assert [c["familial"]["pieces"] for c in chunks] == [["Once"], ["", " upo", "n a"]]
    assert [c["familial"]["exits"] for c in chunks] == [[1], [3, 1, 3]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "length"]


def test_chat_completion_uses_the_template_and_streams_the_same_answer(client, live):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    prompt = ChatTemplate().render(messages, add_generation_prompt=True)
    ids = live.engine.tokenizer.encode(prompt, add_special_tokens=False).ids
    expected = runtime_answer(live, ids, 3, 8)

    whole = client.chat.completions.create(model="exit-3", messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected.text
    assert whole.usage.prompt_tokens == len(ids)
    assert whole.familial == {"member": "exit-3", "exits": [3] * 8}

    chunks = list(client.chat.completions.create(model="exit-3", messages=messages, max_completion_tokens=8,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == len(ids) + 8


def test_stop_string_ends_the_answer_before_it(client):
    full = client.completions.create(model="exit-3", prompt=PROMPT, max_tokens=16,
                                     temperature=0).choices[0].text
    start = next(i for i in range(len(full) // 2, len(full) - 1)
                 if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2])
    stop = full[start:start + 2]
    response = client.completions.create(model="exit-3", prompt=PROMPT, max_tokens=16, temperature=0,
                                         stop=[stop])
    assert response.choices[0].text == full[:full.find(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_auto_with_a_budget_reports_the_exit_of_every_token(client):
    response = client.completions.create(model="auto", prompt=PROMPT, max_tokens=12, temperature=0,
                                         extra_body={"budget": 0.6})
    exits = response.familial["exits"]
    assert response.familial["member"] == "auto"
    assert len(exits) == response.usage.completion_tokens == 12
    # A cap of 0.6 of 4 layers cannot be met by the 4-layer member alone.
    assert set(exits) <= {1, 3} and 1 in exits


def test_a_budget_on_the_smallest_member_serves_it_whole(client):
    """exit-1 has no earlier exit to leave at: a budget there runs the member as without one
    (it failed with KeyError: 1)."""
    plain = client.completions.create(model="exit-1", prompt=PROMPT, max_tokens=8, temperature=0)
    budgeted = client.completions.create(model="exit-1", prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body={"budget": 0.5})
    assert budgeted.choices[0].text == plain.choices[0].text
    assert budgeted.familial["exits"] == [1] * 8 and budgeted.choices[0].finish_reason == "length"


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="exit-2", prompt=PROMPT, max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="exit-3", messages=[{"role": "user", "content": "hi"}], n=2)
    assert bad.value.body["param"] == "n"


def test_health_and_openapi_describe_the_server(live, http):
    status, health = http.get(live.url, "/health")
    assert status == 200
    assert health == {"ok": True, "queue_depth": 0, "running": 0, "max_batch_size": 4, "max_queue": 16}
    status, spec = http.get(live.url, "/openapi.json")
    assert status == 200
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health"} <= set(spec["paths"])
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "422" not in responses
        for code in ("400", "404", "413", "429"):
            schema = responses[code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
        assert "text/event-stream" in responses["200"]["content"]
    for path, name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    assert spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]["messages"]["items"] == {
        "$ref": "#/components/schemas/ChatMessage"}
    request = spec["components"]["schemas"]["CompletionRequest"]
    assert request["additionalProperties"] is False
    assert request["properties"]["n"]["maximum"] == 1
    assert json.dumps(spec).count("HTTPValidationError") == 0


def test_chat_answer_is_one_turn_ending_at_end_of_turn(client, live, monkeypatch):
    """A chat model ends its turn with <|im_end|>: the server stops there, not at max_tokens."""
    end_of_turn = live.engine.tokenizer.token_to_id("<|im_end|>")
    seen = []
    submit = live.engine.submit

    def recording(*args, **kwargs):
        seen.append(kwargs["params"].stop_token_ids)
        return submit(*args, **kwargs)

    monkeypatch.setattr(live.engine, "submit", recording)
    client.chat.completions.create(model="exit-3", messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=2, temperature=0)
    client.completions.create(model="exit-3", prompt=PROMPT, max_tokens=2, temperature=0)
    assert seen == [[end_of_turn], []]
