"""Decode speed of the family runtime, measured against baselines in the same run.

Two families: a synthetic one trained here in seconds on a Markov-chain language (its members
agree almost always, so speculation is at its best), and a trained one (--family; else
runs/demo or bench/out/demo when `familial demo` trained one there; with --quick and neither,
the quick demo family, trained once into bench/out/demo-quick and reused). For each:
1. Members: our greedy decoding (batch 1) against transformers `generate` on the member
   exported as a stock Qwen3 checkpoint (same tokens required).
2. Per prompt: the full member with self-speculative decoding (the smallest member drafts) and
   with the cascade (the draft policy may pick any smaller member, or several in a chain),
   against plain greedy decoding, at identical output, with the acceptance rates.
3. Continuous batching: mixed-member requests served together against one at a time.
4. Memory: the family's weights loaded once against every member loaded separately.
Adaptive exit ("auto") has its own bench, bench/adaptive.py.
Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import timing
from familial.checkpoint_io import export_member, load_family, save_family
from familial.config import FamilyConfig
from familial.infer import Engine, SamplingParams
from familial.model import FamilyModel

OUT = Path(__file__).parent / "out"
PROMPT_TEXTS = ["import os\n\n\ndef main():\n    ", "class Parser:\n    def __init__(self, ",
                "    def __repr__(self):\n        return ", "for key, value in sorted(",
                "# Copyright 2001 Python Software Foundation\n"]
clock = timing.CLOCKS["cpu"]


def markov_batch(transitions: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.empty(batch, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, transitions.shape[0], (batch,), generator=generator)
    for t in range(1, length):
        ids[:, t] = torch.multinomial(transitions[ids[:, t - 1]], 1, generator=generator)[:, 0]
    return ids


def markov_chain(vocab: int = 128) -> torch.Tensor:
    """Transition matrix of a random peaked bigram language (a few likely successors per token)."""
    return torch.softmax(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 4, -1)


def train_tiny_family(steps: int) -> FamilyModel:
    """Exits [1, 3, 5] of a 6-layer family trained with a loss at every exit on text from
    `markov_chain`, so small members agree with the full one as in trained families."""
    torch.manual_seed(0)
    transitions = markov_chain()
    vocab = transitions.shape[0]
    generator = torch.Generator().manual_seed(1)
    config = FamilyConfig(vocab_size=vocab, hidden_size=96, intermediate_size=256, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=2, exits=[1, 3, 5],
                          max_position_embeddings=512, rope_theta=10000.0)
    model = FamilyModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        ids = markov_batch(transitions, 16, 48, generator)
        outputs = model(ids[:, :-1])
        loss = sum(torch.nn.functional.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten())
                   for out in outputs.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def race(contenders: dict, tokens: int, repeats: int) -> dict[str, tuple[float, object]]:
    """Best tokens/s of each contender, run in turns so that a busy spell hits all alike."""
    return {name: (tokens / seconds, result) for name, (seconds, result) in timing.race(contenders, repeats, clock).items()}


def find_family(directory: Path) -> Path | None:
    """A family checkpoint: `directory` itself, or the latest one a demo/training run saved."""
    if (directory / "family.json").exists():
        return directory
    if (directory / "run" / "family" / "family.json").exists():
        return directory / "run" / "family"
    saved = sorted(directory.glob("run/checkpoints/step-*/family/family.json"))
    return saved[-1].parent if saved else None


def trained_family(args) -> tuple[Path, str]:
    """The trained family to measure, and where it came from."""
    if args.family:
        found = find_family(Path(args.family))
        if found is None:
            raise SystemExit(f"--family {args.family}: no family.json there or in a run under it")
        return found, str(found)
    for candidate in (Path("runs/demo"), OUT / "demo"):
        found = find_family(candidate)
        if found is not None:
            return found, f"{found} (trained by `familial demo`)"
    quick = OUT / "demo-quick"
    found = find_family(quick)
    if found is not None:
        return found, f"{found} (the quick demo family, cached from an earlier run)"
    if not args.quick:
        raise SystemExit("no trained family: run `familial demo --threads 1 --output bench/out/demo` "
                         "(about 3 minutes) or pass --family DIR")
    print("training the quick demo family into bench/out/demo-quick (once; later runs reuse it)", flush=True)
    subprocess.run([sys.executable, "-m", "familial.cli", "demo", "--quick", "--threads", "1",
                    "--output", str(quick)], check=True, stdout=subprocess.DEVNULL)
    return find_family(quick), f"{find_family(quick)} (the quick demo family, trained in this run)"


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def measure_family(family_dir: Path, source: str, prompts_wanted: int, new_tokens: int, repeats: int,
                   work: Path, quick: bool) -> dict:
    print(f"\n== family: {source}")
    model = load_family(family_dir)
    config = model.config
    tokenizer = None
    if (family_dir / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(family_dir / "tokenizer.json"))
    engine = Engine(model, tokenizer=tokenizer, max_batch_size=8, max_seq_len=new_tokens + 64)
    # Every run decodes exactly new_tokens (here and in transformers), so speeds compare.
    engine.eos = set()
    greedy = SamplingParams(max_new_tokens=new_tokens, greedy=True)
    if tokenizer is not None:
        prompts = [tokenizer.encode(text).ids for text in PROMPT_TEXTS[:prompts_wanted]]
    else:
        prompts = markov_batch(markov_chain(config.vocab_size), prompts_wanted, 8,
                               torch.Generator().manual_seed(3)).tolist()
    figures: dict = {"source": source, "members": {}}

    from transformers import AutoModelForCausalLM

    hf_bytes = 0
    full = config.exits[-1]
    for exit_layer in config.exits:
        dense_dir = export_member(family_dir, work / f"{family_dir.name}-exit-{exit_layer}", exit_layer)
        dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
        dense.generation_config.eos_token_id = None
        hf_bytes += parameter_bytes(dense)
        if quick and exit_layer not in (config.exits[0], full):
            continue
        ids = torch.tensor([prompts[0]])

        def hf_generate(dense=dense, ids=ids):
            with torch.inference_mode():
                return dense.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=0)

        timed = race({"ours": lambda e=exit_layer: engine.generate([prompts[0]], e, greedy)[0],
                      "transformers": hf_generate}, new_tokens, repeats)
        (ours, result), (theirs, reference) = timed["ours"], timed["transformers"]
        same = reference[0, len(prompts[0]):].tolist() == result.token_ids
        figures["members"][f"exit-{exit_layer}"] = {
            "tokens_per_s": round(ours, 1), "transformers_tokens_per_s": round(theirs, 1),
            "ratio": round(ours / theirs, 2), "identical": same}
        print(f"exit-{exit_layer}: {ours:.1f} tok/s vs transformers {theirs:.1f} tok/s "
              f"= {ours / theirs:.2f}x (identical tokens: {same})")
        del dense

    # The goal is stated per prompt, where plain and speculative decoding differ by a few percent
    # once drafting pauses: twice the turns, so one busy spell does not decide a prompt.
    figures["speculative"] = speculative_per_prompt(engine, prompts, full, greedy, new_tokens, 2 * repeats)

    figures["batching"] = batching(engine, prompts[0], new_tokens, repeats)
    family_bytes = parameter_bytes(model)
    figures["memory"] = {"family_weight_bytes": family_bytes, "separate_members_weight_bytes": hf_bytes,
                         "ratio": round(hf_bytes / family_bytes, 2)}
    print(f"memory: family weights {family_bytes / 2**20:.2f} MiB serve every member; loading each member "
          f"separately takes {hf_bytes / 2**20:.2f} MiB = {hf_bytes / family_bytes:.2f}x")
    return figures


def speculative_per_prompt(engine: Engine, prompts: list[list[int]], full: int, greedy: SamplingParams,
                           new_tokens: int, repeats: int) -> dict:
    """Plain, speculative and cascade decoding of the full member on each prompt."""
    chains = {"smallest_drafts": True}
    if len(engine.config.exits) > 2:
        chains["cascade"] = "cascade"
    rows = []
    for number, prompt in enumerate(prompts):
        contenders = {"plain": lambda p=prompt: engine.generate([p], full, greedy)[0]}
        contenders.update({name: lambda p=prompt, s=spec: engine.generate([p], full, greedy, speculative=s)[0]
                           for name, spec in chains.items()})
        timed = race(contenders, new_tokens, repeats)
        plain, reference = timed["plain"]
        row = {"prompt": number, "plain_tokens_per_s": round(plain, 1)}
        for name in chains:
            speed, result = timed[name]
            acceptance = result.accepted / max(1, result.drafted)
            row[name] = {"tokens_per_s": round(speed, 1), "speedup": round(speed / plain, 2),
                         "identical": result.token_ids == reference.token_ids, "drafted": result.drafted,
                         "acceptance": round(acceptance, 3)}
        rows.append(row)
        print(f"prompt {number}: plain {plain:.1f} tok/s; " + "; ".join(
            f"{name.replace('_', ' ')} {row[name]['speedup']:.2f}x ({row[name]['drafted']} drafted, "
            f"{row[name]['acceptance']:.0%} accepted, identical: {row[name]['identical']})" for name in chains))
    summary = {name: min(row[name]["speedup"] for row in rows) for name in chains}
    print("slowest prompt against plain decoding: " + ", ".join(f"{n.replace('_', ' ')} {s:.2f}x"
                                                                for n, s in summary.items()))
    return {"chains": {name: engine.draft_candidates(full, spec) for name, spec in chains.items()},
            "prompts": rows, "min_speedup": summary}


def batching(engine: Engine, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    config = engine.config
    batch_prompts = [prompt[: 3 + i % 5] for i in range(8)]
    members = [config.exits[i % len(config.exits)] for i in range(8)]
    short = SamplingParams(max_new_tokens=new_tokens // 2, greedy=True)

    def batched():
        handles = [engine.submit(p, m, short) for p, m in zip(batch_prompts, members)]
        with engine._drive:
            while not all(h.done for h in handles):
                engine._step()
        return [[e.token_id for e in h if e.token_id is not None] for h in handles]

    def one_by_one():
        return [engine.generate([p], m, short)[0].token_ids for p, m in zip(batch_prompts, members)]

    timed = race({"batched": batched, "one_by_one": one_by_one}, 8 * short.max_new_tokens, repeats)
    (together, together_tokens), (alone, alone_tokens) = timed["batched"], timed["one_by_one"]
    print(f"continuous batching (8 requests, members {sorted(set(members))}): {together:.1f} tok/s vs "
          f"one by one {alone:.1f} = {together / alone:.2f}x (identical: {together_tokens == alone_tokens})")
    return {"mixed_members_tokens_per_s": round(together, 1), "one_by_one_tokens_per_s": round(alone, 1),
            "ratio": round(together / alone, 2), "identical": together_tokens == alone_tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts, short generations (CI)")
    parser.add_argument("--family", help="trained family checkpoint directory (or a demo's output directory)")
    parser.add_argument("--tokens", type=int, help="new tokens per generation")
    parser.add_argument("--prompts", type=int, help="prompts per family for the speculative comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    timing.add_clock_argument(parser)
    args = parser.parse_args()
    global clock
    clock = timing.CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    new_tokens = args.tokens or (48 if args.quick else 160)
    prompts = args.prompts or (2 if args.quick else len(PROMPT_TEXTS))
    repeats = 2 if args.quick else 5
    work = Path(tempfile.mkdtemp(prefix="familial-bench-"))
    print(f"tokens/s by {args.clock} time with {args.threads} thread(s), best of {repeats} (of {2 * repeats} per "
          f"prompt for speculation), {new_tokens} new tokens, batch 1 unless said")
    trained_dir, trained_source = trained_family(args)
    synthetic_dir = work / "synthetic"
    save_family(train_tiny_family(150 if args.quick else 400), synthetic_dir)
    figures = {"threads": args.threads, "clock": args.clock, "new_tokens": new_tokens, "families": {}}
    figures["families"]["synthetic"] = measure_family(
        synthetic_dir, "tiny family trained in this run on a synthetic Markov language", prompts, new_tokens,
        repeats, work, args.quick)
    figures["families"]["trained"] = measure_family(trained_dir, trained_source, prompts, new_tokens, repeats,
                                                    work, args.quick)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
