"""The post-training recipe end to end, at toy scale on the demo corpus (docs/recipe.md).

    python examples/recipe/run.py [--work runs/recipe] [--threads 2]

CPT -> SFT (general, then domain with replay) -> expand the small member -> train its new
blocks (rest frozen) -> GRPO on small sums -> SVD-LLM v2 compression -> dense export, then a
table per member and stage: parameters, held-out LM loss on the demo corpus, and exact-answer
accuracy on sums (held-out and training problems). Each step is the `familial` command or
the TOML next to this file; the runner only prepares data and evaluates between steps.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import sys
import time
import tomllib
from pathlib import Path

import torch
from tokenizers import Tokenizer

from familial.checkpoint_io import load_family
from familial.cli import main as familial
from familial.config import FamilyConfig
from familial.data.demo_corpus import TOKENIZER_PATH, demo_documents, prepare_demo_data
from familial.data.shards import TokenShards
from familial.eval.perplexity import evaluate_held_out
from familial.posttrain.expand import frozen_parameter_patterns
from familial.posttrain.grpo import GRPOConfig, load_config
from familial.posttrain.rewards import arithmetic_reward, split_problems, sum_problems
from familial.posttrain.rollout import RolloutEngine
from familial.summary import summarize
from familial.train.config import TrainConfig, load_config as load_train_config
from familial.train.loop import Trainer

RECIPE = Path(__file__).resolve().parent
QUESTION = "What is {a} + {b}?"


def general_conversations(limit: int, seed: int = 0) -> list[dict]:
    """Stage-I 'general' chat: questions about stdlib functions answered by their docstrings."""
    rng = random.Random(seed)
    train, _ = demo_documents(600_000)
    conversations = []
    for text in train:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node):
                answer = ast.get_docstring(node).split("\n\n")[0].strip()[:300]
                kind = "function" if isinstance(node, ast.FunctionDef) else "class"
                question = rng.choice(["What does the {k} `{n}` do?", "Explain `{n}`.",
                                       "Describe the {k} {n} in one sentence."])
                conversations.append({"messages": [
                    {"role": "user", "content": question.format(k=kind, n=node.name)},
                    {"role": "assistant", "content": answer}]})
    rng.shuffle(conversations)
    return conversations[:limit]


def sum_conversations(problems: list[tuple[str, str]], count: int, seed: int = 0) -> list[dict]:
    """Stage-II domain chat: sums of digits answered as 'a + b = c' (training problems only)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        prompt, answer = rng.choice(problems)
        a, b = prompt.rstrip("=").split("+")
        out.append({"messages": [{"role": "user", "content": QUESTION.format(a=a, b=b)},
                                 {"role": "assistant", "content": f"{a} + {b} = {answer}"}]})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepare_data(work: Path, grpo: GRPOConfig) -> None:
    (work / "data" / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TOKENIZER_PATH, work / "data" / "tokenizer" / "tokenizer.json")
    prepare_demo_data(work / "data" / "demo", limit_bytes=600_000, overwrite=True)
    # The same seeded split as GRPO's: the held-out problems never appear in SFT data.
    train_sums, _ = split_problems(sum_problems(grpo.task.max_operand), grpo.task.held_out, grpo.seed)
    tokenizer = str(work / "data" / "tokenizer" / "tokenizer.json")
    for name, records in (("general", general_conversations(3000)),
                          ("sums", sum_conversations(train_sums, 3000))):
        source = write_jsonl(work / "data" / f"chat_{name}.jsonl", records)
        run(["data", "prepare", str(source), "--tokenizer", tokenizer, "--format", "chat",
             "--out", str(work / "data" / f"chat_{name}"), "--held-out", "0.05", "--overwrite"])


def run(argv: list[str]) -> None:
    print("$ familial " + " ".join(argv), flush=True)
    code = familial(argv)
    if code:
        raise SystemExit(f"familial {argv[0]} failed with exit code {code}")


def train(config: str, family_out: str, scale: float) -> None:
    print(f"$ familial train examples/recipe/{config}", flush=True)
    trainer = Trainer(scaled_config(RECIPE / config, scale))
    trainer.run()
    shutil.copytree(trainer.final_family(), family_out, dirs_exist_ok=True)


def scaled_config(path: Path, scale: float) -> TrainConfig:
    """A training config with every stage's steps multiplied by `scale` (smoke runs)."""
    data = tomllib.loads(path.read_text())
    for table in [data] + data.get("stages", []):
        if "steps" in table:
            table["steps"] = max(1, round(table["steps"] * scale))
    return load_train_config(data=data)


class Evaluator:
    def __init__(self, work: Path, grpo: GRPOConfig) -> None:
        self.held_out = TokenShards(work / "data" / "demo" / "held_out")
        self.tokenizer = Tokenizer.from_file(str(work / "data" / "tokenizer" / "tokenizer.json"))
        # The same seeded split as GRPO's (and the SFT data's): same order, same seed.
        train_sums, held_sums = split_problems(sum_problems(grpo.task.max_operand, grpo.task.template),
                                               grpo.task.held_out, grpo.seed)
        self.sums = {"held-out": held_sums, "train": train_sums}
        self.rows: list[dict] = []

    @torch.no_grad()
    def accuracy(self, model, exit_layer: int, problems) -> float:
        prompts = [self.tokenizer.encode(p, add_special_tokens=False).ids for p, _ in problems]
        engine = RolloutEngine(model, exit_layer, len(prompts), max(map(len, prompts)) + 13, {0, 2},
                               torch.device("cpu"))
        correct = 0
        for (_, answer), completion in zip(problems, engine.greedy(prompts, 12).completions):
            text = self.tokenizer.decode([t for t in completion if t not in (0, 2)], skip_special_tokens=True)
            correct += arithmetic_reward("", text, answer)
        return correct / len(problems)

    def __call__(self, stage: str, family: str) -> None:
        model = load_family(family).eval()
        held = evaluate_held_out(model, self.held_out, 128, max_tokens=8192)
        sizes = {m.exit: m.parameters for m in summarize(FamilyConfig.load(family)).members}
        for k, e in enumerate(held.exits):
            self.rows.append({
                "stage": stage, "member": model.config.member_name(e), "params": sizes[e],
                "layers": model.config.member_layers(e),
                "held_out_loss": float(held.loss_sums[k].sum() / held.counts.sum()),
                "sums_acc_held_out": self.accuracy(model, e, self.sums["held-out"]),
                "sums_acc_train": self.accuracy(model, e, self.sums["train"])})
        last = self.rows[-len(held.exits):]
        print("  " + "; ".join(f"{r['member']}: loss {r['held_out_loss']:.3f}, sums "
                               f"{r['sums_acc_held_out']:.2f}/{r['sums_acc_train']:.2f}" for r in last),
              flush=True)

    def table(self) -> str:
        lines = ["| stage | member | layers | params | held-out loss | sums acc. held-out "
                 "| sums acc. train |",
                 "|---|---|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            lines.append(f"| {r['stage']} | {r['member']} | {r['layers']} | {r['params']:,} | "
                         f"{r['held_out_loss']:.3f} | {r['sums_acc_held_out']:.2f} | "
                         f"{r['sums_acc_train']:.2f} |")
        return "\n".join(lines)


def check_export(family: str, export: str, exit_layer: int) -> float:
    """Max |logit difference| between the exported dense model in transformers and the family."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(export).eval()
    model = load_family(family).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((dense(ids).logits - model(ids, exits=[exit_layer])[exit_layer]).abs().max())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/recipe", help="work directory (replaced)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every stage's steps (e.g. 0.05 for a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    os.chdir(work)
    started = time.perf_counter()
    grpo = load_config(RECIPE / "grpo.toml")
    prepare_data(work, grpo)
    evaluate = Evaluator(work, grpo)
    train("cpt.toml", "families/cpt", args.scale)
    evaluate("1 CPT", "families/cpt")
    train("sft.toml", "families/sft", args.scale)
    evaluate("2 SFT I+II", "families/sft")
    run(["expand", "families/sft", "families/expanded", "--member", "small", "--blocks", "2"])
    evaluate("3 expanded (init)", "families/expanded")
    expected = frozen_parameter_patterns(FamilyConfig.load("families/expanded"), "small")
    if load_train_config(RECIPE / "expand_train.toml").freeze != expected:
        raise SystemExit(f"expand_train.toml's freeze list is stale; expected {expected}")
    train("expand_train.toml", "families/expanded_trained", args.scale)
    evaluate("4 new blocks trained", "families/expanded_trained")
    run(["grpo", str(RECIPE / "grpo.toml"), "--steps", str(max(2, round(grpo.steps * args.scale)))])
    log = Path(grpo.output, "grpo.jsonl").read_text().splitlines()
    rewards = [json.loads(line)["reward"] for line in log]
    evaluate("5 GRPO", f"{grpo.output}/family")
    run(["compress", f"{grpo.output}/family", "families/compressed", "--member", "small",
         "--ratio", "0.4", "--calibration", "data/chat_sums/train", "--samples", "128",
         "--seq-len", "128"])
    evaluate("6 compressed 40%", "families/compressed")
    run(["export", "families/compressed", "exports/small", "--member", "small"])
    difference = check_export("families/compressed", "exports/small", 1)
    table = evaluate.table()
    window = max(1, len(rewards) // 5)
    summary = {"grpo_reward_first": sum(rewards[:window]) / window,
               "grpo_reward_last": sum(rewards[-window:]) / window,
               "export_max_logit_difference": difference,
               "seconds": round(time.perf_counter() - started, 1)}
    (work / "report.md").write_text(table + "\n\n" + json.dumps(summary) + "\n")
    print(table)
    print(f"exported small member (transformers) vs family: max |logit diff| {difference:.2e}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1:])
