"""Chat templates rendered in worker processes, so a checkpoint's template cannot stall the server.

A chat template is code that comes with the checkpoint: a loop nest runs for hours, a string
repeated a billion times fills memory, and a thread running either can neither be stopped nor
kept from holding the GIL the event loop needs. So the server renders in small worker
processes (jinja2 and familial.chat_template, no torch: one starts in ~0.1 s), each under an
address-space limit; a render that outlasts `timeout` is ended by killing its worker, and a
fresh one takes its place. The output is bounded too (`max_chars`: beyond what fits the
context it would be refused anyway).

Protocol, one JSON object per line: the parent sends the template first and the worker
answers {"ready": true} or {"error"}; then each {"messages", "add_generation_prompt"}
gets {"text"} or {"error"}.
"""

from __future__ import annotations

import asyncio
import json
import sys

from familial.chat_template import ChatTemplate, ChatTemplateError
from familial.serve.workers import WorkerPool

# Address space of a worker: a Python process with jinja2 needs well under 100 MiB.
WORKER_MEMORY_BYTES = 2**30
# A worker's start (the interpreter, its imports, compiling the template) takes ~0.1 s idle but
# seconds on a loaded machine; it is bounded apart from `timeout`, which bounds a render (a short
# render timeout must not refuse the next conversation because its replacement worker is slow to start).
START_TIMEOUT_S = 60.0


class TemplateWorkers(WorkerPool):
    """A pool of render workers for one template (start() and close() in the server's loop)."""

    def __init__(self, template: ChatTemplate, workers: int = 2, timeout: float = 5.0,
                 max_chars: int | None = None) -> None:
        super().__init__(workers, timeout)
        self.template, self.max_chars = template, max_chars

    async def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text, or ChatTemplateError (the template's own refusal, or a limit)."""
        request = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            line = await self.ask(json.dumps(request).encode() + b"\n")
        except asyncio.TimeoutError:
            raise ChatTemplateError(f"the chat template did not finish rendering this conversation "
                                    f"within {self.timeout:g} s") from None
        if not line:
            raise ChatTemplateError("the chat template's worker ended while rendering this conversation "
                                    "(over its memory limit?)")
        reply = json.loads(line)
        if "error" in reply:
            raise ChatTemplateError(reply["error"])
        return reply["text"]

    async def _spawn(self) -> asyncio.subprocess.Process:
        # The stream limit must hold one whole reply line (a JSON-escaped prompt).
        limit = max(2**16, 16 * (self.max_chars or 2**20))
        worker = await self._launch(sys.executable, "-m", "familial.serve.templates", limit=limit)
        setup = {"source": self.template.source, "tokens": self.template.tokens, "max_chars": self.max_chars,
                 "memory": WORKER_MEMORY_BYTES}
        worker.stdin.write(json.dumps(setup).encode() + b"\n")
        # Compiling is bounded too: a template that will not compile in time is refused.
        start_s = max(self.timeout, START_TIMEOUT_S)
        try:
            reply = json.loads(await asyncio.wait_for(worker.stdout.readline(), start_s) or b"{}")
        except asyncio.TimeoutError:
            reply = {"error": f"the chat template's worker did not start and compile it within {start_s:g} s"}
        if not reply.get("ready"):
            await self._end(worker)
            raise ChatTemplateError(reply.get("error", "the chat template's worker did not start"))
        return worker


def _serve(stdin, stdout) -> None:
    """The worker: compile the template from the first line, then render one line at a time."""
    import resource

    def reply(message: dict) -> None:
        stdout.write(json.dumps(message) + "\n")
        stdout.flush()

    setup = json.loads(stdin.readline())
    resource.setrlimit(resource.RLIMIT_AS, (setup["memory"], setup["memory"]))
    try:
        template = ChatTemplate(setup["source"], special_tokens=setup["tokens"])
    except Exception as error:  # noqa: BLE001 - reported to the server, which refuses to start
        reply({"error": f"{type(error).__name__}: {error}"})
        return
    reply({"ready": True})
    for line in stdin:
        request = json.loads(line)
        try:
            text = template.render(request["messages"], request["add_generation_prompt"], setup["max_chars"])
        except ChatTemplateError as error:
            reply({"error": str(error)})
        else:
            reply({"text": text})


if __name__ == "__main__":
    _serve(sys.stdin, sys.stdout)
