"""`familial demo`: train a family on the Python standard library on CPU, and show it worked.

No download: the corpus is the interpreter's own stdlib source, the tokenizer is fitted to
it in about a second. One run trains every member at once, then the demo measures its own
evidence on held-out files: each member against unigram and bigram models fitted to the
same training tokens, the gap between consecutive members and how often each member's
greedy next token is the full member's, all with paired bootstrap intervals. Then the
paper's post-training story on the smallest member (expand with DaE blocks, train only them,
compress them with SVD-LLM v2), samples from every member for one prompt and seed, and
every member exported as a dense Qwen3 checkpoint. The last line names the trained family.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from familial.checkpoint_io import export_all, load_family
from familial.commands import arguments
from familial.data.shards import TokenShards
from familial.demo import report
from familial.demo.corpus import prepare_corpus
from familial.demo.recipe import FULL, QUICK, DemoPlan, train_config
from familial.eval.evidence import PairedBootstrap, collect, family_report
from familial.summary import summarize
from familial.text import counted
from familial.threads import pick_threads
from familial.train.config import load_config
from familial.train.loop import Trainer

PROMPTS = ["def ", "class ", "import "]
# Tiny models gain little from more intra-op threads than this.
MAX_THREADS = 8


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a much smaller version, for tests")
    parser.add_argument("--steps", type=int, help="joint training steps (overrides the recipe)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the idle CPUs)")
    parser.add_argument("--seed", type=int, default=0)


def choose_threads(requested: int | None) -> tuple[int, str]:
    """Intra-op threads, and why: one per core other processes leave idle (see
    `familial.threads`; the demo's model, small as it is, trains 25% faster on two idle
    cores than on one), at most MAX_THREADS."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads {requested}: expected a positive integer")
        return requested, "--threads"
    threads, why = pick_threads()
    return min(threads, MAX_THREADS), f"{why}; --threads N to choose"


@arguments(_demo_arguments)
def demo(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    print(f"threads: {threads} ({why})")
    plan = QUICK if args.quick else FULL
    if args.steps:
        plan = replace(plan, steps=args.steps)
    output = Path(args.output)
    started = time.perf_counter()
    tokenizer_dir, data_dir = prepare_corpus(plan, output)
    train_shards, held_out = TokenShards(data_dir / "train"), TokenShards(data_dir / "held_out")
    print(f"corpus: Python {'.'.join(map(str, sys.version_info[:3]))} standard library, "
          f"{train_shards.num_documents} training files ({train_shards.num_tokens:,} tokens), "
          f"{held_out.num_documents} held-out files ({held_out.num_tokens:,} tokens); byte-level "
          f"BPE of {plan.vocab_size} ids fitted to the training files ({tokenizer_dir})")

    # Each demo is a fresh run; the tokenizer and the tokenised corpus above are reused.
    for stale in ("run", "dae", "members"):
        shutil.rmtree(output / stale, ignore_errors=True)
    family_dir, summary, seconds = _train(plan, data_dir, output, tokenizer_dir, args.seed, threads)
    model = load_family(family_dir).eval()
    layers = {m.name: m.layers for m in summary.members}
    names = [m.name for m in summary.members]

    sums = collect(model, train_shards, held_out, plan.seq_len, plan.eval_tokens)
    boot = PairedBootstrap(sums.counts, plan.bootstrap, args.seed)
    evidence = family_report(sums, names, boot)
    print(report.family_section(evidence, layers, plan))

    from familial.demo.dae import run_dae

    dae = run_dae(plan, family_dir, data_dir, output / "dae", args.seed)
    dae_evidence = report.dae_report(dae, sums, names, boot)
    print(report.dae_section(dae_evidence, dae, plan, layers))

    exported = export_all(family_dir, output / "members", overwrite=True)
    print(f"\nexported {len(exported)} members as dense Qwen3 checkpoints under {output / 'members'}")

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    samples_path = report.samples(model, dae, tokenizer, names, plan, args.seed, PROMPTS, output / "run")
    (output / "run" / "evidence.json").write_text(json.dumps(
        {"plan": asdict(plan), "threads": threads, "train_seconds": seconds, "family": evidence,
         "dae": dae_evidence}, indent=2) + "\n")
    print(f"\ndone in {time.perf_counter() - started:.0f}s; evidence in {output / 'run' / 'evidence.json'}, "
          f"samples in {samples_path}; `familial plot {output / 'run'}` draws the loss curves")
    print(f"trained family: {family_dir}")
    return 0


def _train(plan: DemoPlan, data_dir: Path, output: Path, tokenizer_dir: Path, seed: int, threads: int):
    """Train every member at once, printing the family and the speed; -> (the family's
    directory, its summary, the seconds the training took)."""
    trainer = Trainer(load_config(data=train_config(plan, data_dir, output / "run", tokenizer_dir, seed)))
    summary = summarize(trainer.model.config)
    print(f"family: {summary.family_parameters / 1e6:.1f}M parameters; members "
          + ", ".join(f"{m.name} ({counted(m.layers, 'layer')}, {m.parameters / 1e6:.1f}M)" for m in summary.members))
    trained_at = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - trained_at
    tokens = plan.steps * plan.batch_size * plan.seq_len
    print(f"trained {plan.steps} steps ({tokens:,} tokens) in {seconds:.0f}s: {plan.steps / seconds:.2f} "
          f"steps/s, {tokens / seconds:,.0f} tokens/s on {threads} thread(s)")
    return trainer.finish(), summary, seconds
