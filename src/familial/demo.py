"""`familial demo`: train a small family on the Python standard library, on CPU, in minutes.

No download: the corpus is the interpreter's own stdlib source and the tokenizer ships with
the package. One run trains every member at once (exits 1, 3, 5, 7 of an 8-layer trunk),
then the demo prints each member's held-out loss, exports every member as a dense Qwen3
checkpoint and prints a sample from each through the family runtime.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from familial.checkpoint_io import export_all, load_family
from familial.data import TokenShards, eval_batches
from familial.infer.engine import Engine
from familial.infer.sampling import SamplingParams
from familial.model import FamilyModel
from familial.summary import summarize
from familial.train.config import load_config
from familial.train.losses import family_loss_sums
from familial.train.loop import Trainer


@dataclass
class DemoPlan:
    # bytes of stdlib source to tokenise (the held-out split is 1 file in 20).
    corpus_bytes: int
    steps: int
    batch_size: int
    seq_len: int
    hidden_size: int
    intermediate_size: int
    eval_batches: int
    sample_tokens: int


FULL = DemoPlan(corpus_bytes=2_000_000, steps=300, batch_size=8, seq_len=128, hidden_size=128,
                intermediate_size=384, eval_batches=24, sample_tokens=40)
QUICK = DemoPlan(corpus_bytes=400_000, steps=30, batch_size=8, seq_len=64, hidden_size=96,
                 intermediate_size=256, eval_batches=6, sample_tokens=16)
PROMPTS = ["def ", "import os\n", "class "]


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute version (smaller model, fewer steps)")
    parser.add_argument("--steps", type=int, help="training steps (overrides the preset)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)


def train_config(plan: DemoPlan, data_dir: Path, run_dir: Path, tokenizer: str, seed: int) -> dict:
    return {
        "run_dir": str(run_dir),
        "steps": plan.steps,
        "seed": seed,
        "init": {"tokenizer": tokenizer, "model": {
            "vocab_size": 2048, "hidden_size": plan.hidden_size,
            "intermediate_size": plan.intermediate_size, "num_hidden_layers": 8,
            "num_attention_heads": 4, "num_key_value_heads": 2, "exits": [1, 3, 5, 7],
            "max_position_embeddings": 1024, "rope_theta": 10000.0,
            "eos_token_id": 0, "pad_token_id": 0,
            "member_names": {"tiny": 1, "small": 3, "medium": 5, "full": 7}}},
        "data": {"sources": [{"path": str(data_dir / "train")}], "seq_len": plan.seq_len,
                 "batch_size": plan.batch_size},
        # 2e-3 reached 4.74 (full) after 300 steps where 6e-3 stalled near 5.2: with
        # 1k-token batches, a higher rate mostly adds noise.
        "lr": {"lr": 2e-3, "min_lr": 1e-4, "warmup_steps": max(plan.steps // 20, 1), "kind": "wsd"},
        "optim": {"weight_decay": 0.05},
        # Warm deep supervision: shallow exits pull hard early, then fade so they stop
        # competing with the deeper members near the end.
        "loss": {"chunk_size": 512, "lambdas": {
            "tiny": {"kind": "warm_decay", "start": 1.0, "end": 0.3,
                     "start_step": plan.steps // 4, "end_step": plan.steps},
            "small": {"kind": "warm_decay", "start": 1.0, "end": 0.5,
                      "start_step": plan.steps // 4, "end_step": plan.steps}}},
        "checkpoint": {"keep": 1},
        "log": {"tensorboard": False},
    }


@torch.no_grad()
def held_out_losses(model: FamilyModel, shards: TokenShards, plan: DemoPlan) -> dict[int, float]:
    """Mean cross-entropy per exit over the first `plan.eval_batches` held-out batches."""
    sums = {e: 0.0 for e in model.config.exits}
    count = 0
    batches = eval_batches(shards, plan.batch_size, plan.seq_len)
    for batch in tqdm(itertools.islice(batches, plan.eval_batches), total=plan.eval_batches,
                      desc="held-out loss", unit="batch"):
        for e, loss in family_loss_sums(model, batch["input_ids"], batch["labels"]).items():
            sums[e] += loss.ce_sum.item()
        count += int((batch["labels"] != -100).sum())
    return {e: total / max(count, 1) for e, total in sums.items()}


def run(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from familial.data.demo_corpus import TOKENIZER_PATH, prepare_demo_data

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    if args.steps:
        plan = DemoPlan(**{**plan.__dict__, "steps": args.steps})
    output = Path(args.output)
    started = time.perf_counter()
    data_dir = output / f"data-{plan.corpus_bytes}"
    if (data_dir / "train" / "manifest.json").is_file() and (data_dir / "held_out" / "manifest.json").is_file():
        held_out = TokenShards(data_dir / "held_out")
    else:
        _, held_out = prepare_demo_data(data_dir, limit_bytes=plan.corpus_bytes, overwrite=True)
    train_tokens = TokenShards(data_dir / "train").num_tokens
    print(f"corpus: Python {'.'.join(map(str, sys.version_info[:3]))} standard library, "
          f"{train_tokens:,} training tokens, {held_out.num_tokens:,} held-out tokens")

    config = load_config(data=train_config(plan, data_dir, output / "run", str(TOKENIZER_PATH.parent),
                                           args.seed))
    # Each demo is a fresh run; only the tokenised corpus above is reused.
    shutil.rmtree(output / "run", ignore_errors=True)
    trainer = Trainer(config)
    summary = summarize(trainer.model.config)
    print(f"family: {summary.family_parameters / 1e6:.1f}M parameters, members "
          + ", ".join(f"{m.name} ({m.layers} layers, {m.parameters / 1e6:.1f}M)" for m in summary.members))
    trainer.run()
    family_dir = trainer.final_family()
    model = load_family(family_dir).eval()

    losses = held_out_losses(model, held_out, plan)
    print("\nheld-out loss per member (Python stdlib files never seen in training)")
    print(f"{'member':<8} {'exit':>4} {'layers':>6} {'params':>8} {'loss':>7} {'ppl':>8}")
    for member in summary.members:
        loss = losses[member.exit]
        print(f"{member.name:<8} {member.exit:>4} {member.layers:>6} {member.parameters / 1e6:>7.2f}M "
              f"{loss:>7.3f} {math.exp(loss):>8.1f}")

    exported = export_all(family_dir, output / "members", overwrite=True)
    print(f"\nexported {len(exported)} members as dense Qwen3 checkpoints under {output / 'members'}")

    tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
    prompt = PROMPTS[args.seed % len(PROMPTS)]
    ids = tokenizer.encode(prompt).ids
    # One engine serves every member from the same weights; a mild repetition penalty keeps
    # a few-minute model from looping on its most frequent token.
    engine = Engine(model, tokenizer)
    params = SamplingParams(max_new_tokens=plan.sample_tokens, temperature=0.7, top_k=40,
                            repetition_penalty=1.2, seed=args.seed)
    print(f"\nsamples (temperature 0.7, top-k 40), prompt {prompt!r}:")
    for member in tqdm(summary.members, desc="sampling", unit="member", leave=False):
        text = engine.generate([ids], member=member.exit, params=params)[0].text
        tqdm.write(f"--- {member.name} (exit {member.exit}) ---\n{prompt}{text}")
    print(f"\ndone in {time.perf_counter() - started:.0f}s; run directory {output / 'run'} "
          f"(`familial plot {output / 'run'}` draws the loss curves)")
    return 0
