"""Ask every member of a running `familial serve` the same chat questions (greedy) and print the
answers as Markdown, one section per question.

    familial serve runs/smollm2/family-exits --port 8011 --threads 1 &
    python examples/pretrained/chat_members.py --url http://127.0.0.1:8011
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request

QUESTIONS = ["How do I delete a whole line in Vim?",
             "How can I search for a word in Vim?",
             "What is the capital of France?"]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--question", action="append", help="a question (repeatable; default: three built in)")
    args = parser.parse_args()
    with urllib.request.urlopen(f"{args.url}/v1/models", timeout=60) as response:
        members = [m["id"] for m in json.loads(response.read())["data"] if m["id"] != "auto"]
    for question in args.question or QUESTIONS:
        print(f"\n**{question}**\n")
        print("| member | answer (greedy, at most %d tokens) |\n|---|---|" % args.max_tokens)
        for member in members:
            reply = post(f"{args.url}/v1/chat/completions",
                         {"model": member, "messages": [{"role": "user", "content": question}],
                          "max_tokens": args.max_tokens, "temperature": 0})
            text = reply["choices"][0]["message"]["content"].strip().replace("\n", " ").replace("|", "\\|")
            print(f"| {member} | {text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
