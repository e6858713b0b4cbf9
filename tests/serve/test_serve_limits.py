"""Work a client or a checkpoint controls stays off the event loop and bounded: huge prompts
are refused by their length before tokenising (or before parsing), chat templates that loop
or blow up are cut off, and the server answers /health and other requests meanwhile."""

from __future__ import annotations

import json
import re
import threading

import pytest

from familial.chat_template import ChatTemplate, ChatTemplateError
from familial.infer.engine import Engine

# Checkpoint templates gone wrong, one branch per conversation: a loop nest (10^10 steps), a
# string of 10 GB, a number of a billion digits; otherwise ChatML.
HOSTILE_TEMPLATE = (
    "{% set said = messages[-1]['content'] %}"
    "{% if said == 'spin' %}{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    "{% elif said == 'huge' %}{{ 'a' * 10**10 }}"
    "{% elif said == 'power' %}{{ 9 ** (10 ** 9) }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{{ '<|im_start|>assistant\\n' }}")
# Just under the 8 MiB body limit.
BIG = 8 * 2**20 - 4096


class CountingTokenizer:
    """The server's tokenizer, counting the characters it was asked to tokenise."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.characters = tokenizer, 0

    def encode_batch(self, texts, **kwargs):
        self.characters += sum(map(len, texts))
        return self.tokenizer.encode_batch(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def hostile(family_dir, serve):
    engine = Engine.from_checkpoint(family_dir, max_batch_size=2, max_queue=8, max_seq_len=256)
    with serve(engine, ChatTemplate(HOSTILE_TEMPLATE), template_timeout=2.0) as running:
        server = running.app.state.server
        server.tokenizer = CountingTokenizer(server.tokenizer)
        yield running


def chat(content: str) -> dict:
    return {"model": "exit-1", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}


def while_polling_health(url: str, http, requests: list[tuple[str, object]]) -> tuple[list, list[int]]:
    """Send `requests` concurrently while /health is polled; their replies and the health statuses."""
    replies: list = [None] * len(requests)
    health: list[int] = []
    done = threading.Event()

    def send(index: int, path: str, body) -> None:
        replies[index] = http.post(url, path, body)

    def poll() -> None:
        while True:
            health.append(http.get(url, "/health")[0])
            if done.is_set():
                return

    threads = [threading.Thread(target=send, args=(i, *r)) for i, r in enumerate(requests)]
    poller = threading.Thread(target=poll)
    poller.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    poller.join()
    return replies, health


def test_prompts_near_the_body_limit_are_refused_untokenised(hostile, http):
    tokenizer = hostile.app.state.server.tokenizer
    requests = [("/v1/completions", {"model": "exit-1", "prompt": "ab c" * (BIG // 4 - 40)}),
                ("/v1/completions", json.dumps({"model": "exit-1", "prompt": "\u00e9" * (BIG // 2 - 40)},
                                               ensure_ascii=False).encode()),
                ("/v1/chat/completions", chat("x" * (BIG - 200))),
                # 2.8 million token ids: refused by counting the body's items, before parsing it.
                ("/v1/completions", '{"model": "exit-1", "prompt": [' + "1," * (BIG // 3) + "1]}")]
    replies, health = while_polling_health(hostile.url, http, requests)
    for status, reply in replies:
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
    assert health and set(health) == {200}
    assert tokenizer.characters == 0
    status, reply = http.post(hostile.url, "/v1/completions", {"model": "exit-1", "prompt": "Once", "max_tokens": 2})
    assert status == 200 and tokenizer.characters == len("Once")


@pytest.mark.parametrize("content, expected", [("spin", "did not finish rendering"), ("huge", "MemoryError"),
                                               ("power", "did not finish rendering|MemoryError")])
def test_a_hostile_template_is_cut_off_and_the_server_keeps_serving(hostile, http, content, expected):
    replies, health = while_polling_health(hostile.url, http, [
        ("/v1/chat/completions", chat(content)),
        ("/v1/completions", {"model": "exit-1", "prompt": "Once", "max_tokens": 2})])
    (status, reply), (completion_status, _) = replies
    assert status == 400 and re.search(expected, reply["error"]["message"]), reply
    assert completion_status == 200
    assert health and set(health) == {200}
    # The worker that rendered it was replaced: the same template renders a plain conversation.
    status, reply = http.post(hostile.url, "/v1/chat/completions", chat("hello"))
    assert status == 200 and reply["usage"]["completion_tokens"] == 2


def test_compiling_a_template_evaluates_nothing():
    # jinja2 folds constant expressions while compiling; these would hang or exhaust memory.
    for source in ("{{ 9 ** (9 ** 99) }}", "{{ 'a' * 10**12 }}", "{% set x = 'b'|center(10**12) %}{{ x }}",
                   "{% if 9 ** (9 ** 99) %}x{% endif %}"):
        ChatTemplate(source)


def test_the_template_output_is_bounded():
    template = ChatTemplate("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="exceeds 1000 characters"):
        template.render([], max_chars=1000)
