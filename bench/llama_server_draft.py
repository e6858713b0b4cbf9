"""llama.cpp's own server decoding a member alone, and with a smaller member as its draft model.

Members of one family share the vocabulary, so `familial export --all --format gguf` gives
llama-server the target and draft files of its speculative decoding (`--model-draft`), the
device-side form of `familial generate --speculative`. For each drafter this starts
llama-server (--server, a binary built from llama.cpp's source: docs/gguf.md), sends the same
greedy completions (prompts cut from --data token shards, detokenised by the server's own
tokenizer), and reads the server's own timings: decode tokens/s, drafted and accepted tokens.
The target alone runs first and between drafters, and the bench checks every drafter's
output equals the target's. Needs no familial code at run time beyond the exported files.
Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


class Server:
    def __init__(self, binary: str, model: Path, draft: Path | None, threads: int, draft_tokens: int) -> None:
        self.port = free_port()
        command = [binary, "-m", str(model), "--port", str(self.port), "-t", str(threads), "-c", "1024",
                   "--parallel", "1", "--no-webui"]
        if draft is not None:
            command += ["--model-draft", str(draft), "--spec-type", "draft-simple",
                        "--spec-draft-n-max", str(draft_tokens), "--spec-draft-p-min", "0"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            if self.process.poll() is not None:
                raise SystemExit(f"llama-server exited {self.process.returncode}: {self.process.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise SystemExit("llama-server did not come up in 5 minutes")

    def complete(self, prompt: list[int], tokens: int) -> dict:
        return post(f"{self.url}/completion", {"prompt": prompt, "n_predict": tokens, "temperature": 0,
                                                "top_k": 1, "repeat_penalty": 1.0, "cache_prompt": False,
                                                "return_tokens": True})

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


def run(server: Server, prompts: list[list[int]], tokens: int) -> dict:
    outputs, seconds, produced, drafted, accepted = [], 0.0, 0, 0, 0
    for prompt in prompts:
        answer = server.complete(prompt, tokens)
        timings = answer["timings"]
        outputs.append(answer["tokens"])
        produced += timings["predicted_n"]
        seconds += timings["predicted_ms"] / 1000
        drafted += timings.get("draft_n", 0)
        accepted += timings.get("draft_n_accepted", 0)
    return {"outputs": outputs, "tokens_per_s": produced / seconds, "drafted": drafted, "accepted": accepted}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 prompts of 16 new tokens")
    parser.add_argument("--server", required=True, help="the llama-server binary")
    parser.add_argument("--members", required=True, help="directory of MEMBER.gguf files (familial export --all)")
    parser.add_argument("--target", required=True, help="the target member's name (its file MEMBER.gguf)")
    parser.add_argument("--drafters", required=True, help="comma-separated drafting members")
    parser.add_argument("--data", required=True, help="token shards to cut prompts from")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per completion")
    parser.add_argument("--draft-tokens", type=int, default=4, help="--spec-draft-n-max")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.tokens = 2, 16
    from familial.data.shards import TokenShards

    ids = TokenShards(args.data).tokens
    starts = np.linspace(0, len(ids) - args.prompt_tokens - 1, args.prompts).astype(int)
    prompts = [np.asarray(ids[s:s + args.prompt_tokens], dtype=np.int64).tolist() for s in starts]
    members = Path(args.members)
    figures: dict = {"threads": args.threads, "prompts": args.prompts, "new_tokens": args.tokens,
                     "draft_tokens": args.draft_tokens, "drafters": {}}
    alone_speeds = []

    def target_alone() -> dict:
        server = Server(args.server, members / f"{args.target}.gguf", None, args.threads, args.draft_tokens)
        try:
            result = run(server, prompts, args.tokens)
        finally:
            server.close()
        alone_speeds.append(result["tokens_per_s"])
        return result

    alone = target_alone()
    for drafter in args.drafters.split(","):
        server = Server(args.server, members / f"{args.target}.gguf", members / f"{drafter}.gguf", args.threads,
                        args.draft_tokens)
        try:
            paired = run(server, prompts, args.tokens)
        finally:
            server.close()
        baseline = (alone_speeds[-1] + target_alone()["tokens_per_s"]) / 2
        figures["drafters"][drafter] = {
            "tokens_per_s": round(paired["tokens_per_s"], 2), "speedup": round(paired["tokens_per_s"] / baseline, 3),
            "drafted": paired["drafted"], "acceptance": round(paired["accepted"] / max(paired["drafted"], 1), 4),
            "identical_outputs": sum(a == b for a, b in zip(paired["outputs"], alone["outputs"]))}
        print(f"{drafter} drafting for {args.target}: {figures['drafters'][drafter]['speedup']:.2f}x the target "
              f"alone, {figures['drafters'][drafter]['acceptance']:.1%} of {paired['drafted']} drafts accepted",
              file=sys.stderr)
    figures["target_tokens_per_s"] = [round(s, 2) for s in alone_speeds]
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
