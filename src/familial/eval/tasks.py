"""Task evaluation from local JSONL: multiple choice by log-likelihood, generation by exact match.

A task file holds one JSON object per line, all of one kind:

    multiple choice   {"context": "The sky is", "choices": [" blue", " green"], "answer": 0}
    generation        {"prompt": "2 + 2 =", "answer": " 4" | [" 4", " four"],
                       "stop": ["\\n"] (optional), "max_new_tokens": 16 (optional)}

A choice is scored as the continuation of the context exactly as written (put the separator,
e.g. a leading space, in the choices), tokenised the way lm-evaluation-harness does: the
context's trailing spaces move to the continuation and the pair is encoded as one string, so
a member's numbers here and through the lm-eval adapter are the same. Reported per member:
`acc` (highest summed log-probability), `acc_norm` (divided by the choice's length in
characters, lm-eval's acc_norm) and `acc_bytes` (in UTF-8 bytes, lm-eval's acc_bytes).
Generation is greedy on the runtime's engine (familial.infer), stops at EOS, before a stop
string or after `max_new_tokens`, and matches when the output equals an answer after
stripping surrounding whitespace.

Multiple choice runs the trunk once for every member; generation runs each member on its own.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from familial import checks
from familial.config import FamilyConfig
from familial.infer.engine import Engine
from familial.infer.sampling import SamplingParams
from familial.model import FamilyModel

TOKENIZER_FILE = "tokenizer.json"


class TaskError(ValueError):
    """A task file or request is malformed; the message names the file, line and field."""


def load_tokenizer(family_dir: str | Path) -> Tokenizer:
    path = Path(family_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; task evaluation needs the family's tokenizer "
                                f"(import or save the family with its tokenizer files)")
    return Tokenizer.from_file(str(path))


def eos_ids(config: FamilyConfig) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


def prefix_token_id(config: FamilyConfig) -> int:
    """The token that stands for an empty context: BOS, else EOS (as lm-eval does)."""
    if config.bos_token_id is not None:
        return config.bos_token_id
    if eos_ids(config):
        return eos_ids(config)[0]
    raise TaskError("an empty context needs a BOS or EOS token, but family.json sets neither "
                    "bos_token_id nor eos_token_id")


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str,
                prefix_id: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split the way lm-eval's TemplateLM splits them."""
    if not context:
        ids = encode(tokenizer, continuation)
        return ([prefix_id], ids) if ids[:1] != [prefix_id] else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode(tokenizer, context)
    whole = encode(tokenizer, context + continuation)
    return context_ids, whole[len(context_ids):]


@torch.inference_mode()
def score_continuations(model: FamilyModel, exits: list[int], pairs: list[tuple[list[int], list[int]]],
                        batch_size: int = 8, max_length: int | None = None,
                        ) -> dict[int, list[tuple[float, bool]]]:
    """{exit: [(sum log p(continuation | context), continuation is the greedy path)]}.

    One trunk pass per batch serves every exit. Rows are right-padded, which causal attention
    makes harmless (real tokens never see the pads); contexts are cut on the left to fit.
    """
    max_length = max_length or model.config.max_position_embeddings
    rows = []
    for index, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise TaskError(f"request {index}: context and continuation need at least one token "
                            f"each (an empty context is scored after the prefix token)")
        if len(continuation) > max_length:
            raise TaskError(f"request {index}: continuation of {len(continuation)} tokens is longer "
                            f"than the {max_length} positions the model attends over")
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        rows.append((whole[:-1], list(continuation)))
    results: dict[int, list] = {e: [None] * len(rows) for e in exits}
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = len(rows[batch[0]][0])
        input_ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        for r, i in enumerate(batch):
            input_ids[r, :len(rows[i][0])] = torch.tensor(rows[i][0])
        hidden = model(input_ids, exits=exits, return_hidden=True)
        # (rows, positions) whose outputs predict the continuation tokens.
        where = [(r, len(rows[i][0]) - len(rows[i][1]), len(rows[i][0])) for r, i in enumerate(batch)]
        targets = torch.tensor([t for i in batch for t in rows[i][1]], device=device)
        for e in exits:
            picked = torch.cat([hidden[e][r, a:b] for r, a, b in where])
            log_probs = torch.log_softmax(model.exit_head(e)(picked).float(), dim=-1)
            token_lp = log_probs.gather(1, targets[:, None]).squeeze(1)
            greedy = log_probs.argmax(-1) == targets
            offset = 0
            for (_, a, b), i in zip(where, batch):
                n = b - a
                results[e][i] = (float(token_lp[offset:offset + n].double().sum()),
                                 bool(greedy[offset:offset + n].all()))
                offset += n
    return results


def greedy_texts(engine: Engine, exit_layer: int,
                 requests: list[tuple[list[int], int, list[str]]]) -> list[str]:
    """Greedy output text of one member per (prompt ids, max new tokens, stop strings).

    Runs on the runtime's engine, batched over requests with the same limits; the text ends
    before the first stop string, at EOS or at the token limit. Prompts are cut on the left
    so prompt and output fit the engine's sequence length.
    """
    groups: dict[tuple[int, tuple[str, ...]], list[int]] = defaultdict(list)
    for index, (_, limit, stop) in enumerate(requests):
        groups[(limit, tuple(s for s in stop if s))].append(index)
    texts = [""] * len(requests)
    for (limit, stop), indices in groups.items():
        room = engine.max_seq_len - limit
        if room < 1:
            raise TaskError(f"max_new_tokens {limit} leaves no room for a prompt within the "
                            f"{engine.max_seq_len} positions of the model")
        params = SamplingParams(max_new_tokens=limit, greedy=True, stop=list(stop))
        results = engine.generate([requests[i][0][-room:] for i in indices], exit_layer, params)
        for i, result in zip(indices, results):
            if result.error:
                raise RuntimeError(f"generation failed for request {i}: {result.error}")
            texts[i] = result.text
    return texts


# Task files.

@dataclass
class MultipleChoice:
    context: str
    choices: list[str]
    answer: int


@dataclass
class Generation:
    prompt: str
    answers: list[str]
    stop: list[str] = field(default_factory=list)
    max_new_tokens: int | None = None


@dataclass
class Task:
    name: str
    kind: str   # "multiple_choice" or "generation"
    items: list


def _string_list(value, where: str, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise TaskError(f"{where}: field '{name}' = {value!r}: expected a string or a non-empty "
                        f"list of strings")
    return value


def _parse_item(record, where: str):
    if not isinstance(record, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "choices" in record:
        context, choices, answer = record.get("context"), record["choices"], record.get("answer")
        if not isinstance(context, str):
            raise TaskError(f"{where}: field 'context' = {context!r}: expected a string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(
                isinstance(c, str) and c for c in choices):
            raise TaskError(f"{where}: field 'choices' = {choices!r}: expected a list of at least "
                            f"two non-empty strings")
        checks.integer(f"{where}: field 'answer'", answer, f"the index of the right choice, 0..{len(choices) - 1}",
                       minimum=0, maximum=len(choices) - 1, error=TaskError)
        return MultipleChoice(context, choices, answer)
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise TaskError(f"{where}: field 'prompt' = {prompt!r}: expected a non-empty string")
        if "answer" not in record:
            raise TaskError(f"{where}: field 'answer' is missing (the expected output)")
        stop = _string_list(record["stop"], where, "stop") if "stop" in record else []
        limit = record.get("max_new_tokens")
        if limit is not None:
            checks.positive_int(f"{where}: field 'max_new_tokens'", limit, error=TaskError)
        return Generation(prompt, _string_list(record["answer"], where, "answer"), stop, limit)
    raise TaskError(f"{where}: expected 'context'/'choices'/'answer' (multiple choice) or "
                    f"'prompt'/'answer' (generation), got fields {sorted(record)}")


def read_task(path: str | Path) -> Task:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: task file not found")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TaskError(f"{where}: not valid JSON ({error.msg})") from None
        items.append(_parse_item(record, where))
        if type(items[-1]) is not type(items[0]):
            raise TaskError(f"{where}: mixes multiple-choice and generation items; keep one kind "
                            f"per file")
    if not items:
        raise TaskError(f"{path}: no items")
    kind = "multiple_choice" if isinstance(items[0], MultipleChoice) else "generation"
    return Task(path.stem, kind, items)


def evaluate_task(model: FamilyModel, tokenizer: Tokenizer, task: Task, exits: list[int],
                  batch_size: int = 8, max_new_tokens: int = 64) -> dict[int, dict[str, float]]:
    """{exit: metrics} for one task."""
    if task.kind == "multiple_choice":
        return _multiple_choice(model, tokenizer, task.items, exits, batch_size)
    return _generation(model, tokenizer, task.items, exits, batch_size, max_new_tokens)


def _multiple_choice(model, tokenizer, items: list[MultipleChoice], exits, batch_size):
    prefix = prefix_token_id(model.config) if any(not it.context for it in items) else -1
    pairs = [encode_pair(tokenizer, it.context, c, prefix) for it in items for c in it.choices]
    scores = score_continuations(model, exits, pairs, batch_size)
    out = {}
    for e in exits:
        hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
        offset = 0
        for it in items:
            lls = np.array([s for s, _ in scores[e][offset:offset + len(it.choices)]])
            offset += len(it.choices)
            chars = np.array([len(c) for c in it.choices], dtype=float)
            size = np.array([len(c.encode("utf-8")) for c in it.choices], dtype=float)
            hits["acc"] += int(np.argmax(lls) == it.answer)
            hits["acc_norm"] += int(np.argmax(lls / chars) == it.answer)
            hits["acc_bytes"] += int(np.argmax(lls / size) == it.answer)
        out[e] = {k: v / len(items) for k, v in hits.items()} | {"n": len(items)}
    return out


def _generation(model, tokenizer, items: list[Generation], exits, batch_size, max_new_tokens):
    engine = Engine(model, tokenizer, max_batch_size=batch_size,
                    device=next(model.parameters()).device)
    requests = [(encode(tokenizer, it.prompt), it.max_new_tokens or max_new_tokens, it.stop)
                for it in items]
    out = {}
    for e in exits:
        texts = greedy_texts(engine, e, requests)
        matches = sum(any(text.strip() == a.strip() for a in it.answers)
                      for text, it in zip(texts, items))
        out[e] = {"exact_match": matches / len(items), "n": len(items)}
    return out
