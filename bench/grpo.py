"""GRPO steps per second and peak memory: familial against TRL's GRPOTrainer, same settings.

One run builds a random family on the demo tokenizer (vocabulary 2048), exports its small
member as a dense Hugging Face checkpoint, and trains that member with GRPO on the sums task
("a+b=", arithmetic reward) on both sides with the same group size, prompts per step,
completion length, temperature, beta (so both keep a reference), learning rate and trainable
parameters (the member's own branch layer, final norm and head; everything else frozen).
Each side runs in a subprocess of its own, alternately (best of `--rounds`), on the same
number of threads; the first step is a warm-up and is not timed.

Figures (last line, one JSON object):
- step_rate_ratio: familial steps/s over TRL's (target >= 1.5);
- peak_rss_ratio: familial's peak resident memory over TRL's;
- reference_memory_ratio: familial's peak resident memory over its own with beta = 0 (the
  policy alone, no reference) (target <= 1.1), and reference_state_ratio: parameter +
  gradient + optimiser + reference bytes over the same without the reference, where TRL's
  reference is a whole copy of the member and familial's only the trainable parameters'
  initial values.

    python bench/grpo.py [--quick] [--rounds 3] [--steps 8] [--threads 1]

TRL is a peer, not a dependency: `pip install -e ".[bench]"` (trl 1.16; it adds accelerate
and psutil next to transformers and leaves torch as installed).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FAMILY = dict(num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, exits=[2, 5],
              max_position_embeddings=256)
MEMBER = 2
# The small member's own parameters, in the family and in its dense export (layer 2 = its branch).
FAMILY_TRAINABLE = ["branches.2.*"]
DENSE_TRAINABLE = ["model.layers.2.*", "model.norm.*", "lm_head.*"]


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 2 ms)."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakRSS:
        self.peak = self.now()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def state_bytes(parameters, optimizer, extra=()) -> int:
    """Bytes of the member's parameters, their gradients, the optimiser's state and `extra`
    tensors (a reference), each storage once."""
    parameters = list(parameters)
    tensors = parameters + [p.grad for p in parameters if p.grad is not None] + list(extra)
    tensors += [v for state in optimizer.state.values() for v in state.values() if hasattr(v, "numel")]
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(unique.values())


def prepare(work: Path, hidden: int) -> None:
    import torch

    from familial.checkpoint_io import export_member, save_family
    from familial.config import FamilyConfig
    from familial.data.demo_corpus import DEMO_VOCAB_SIZE, TOKENIZER_PATH, token_id
    from familial.model import FamilyModel

    torch.manual_seed(0)
    from tokenizers import Tokenizer

    eos = token_id(Tokenizer.from_file(str(TOKENIZER_PATH)), "<|endoftext|>", str(TOKENIZER_PATH))
    config = FamilyConfig(vocab_size=DEMO_VOCAB_SIZE, eos_token_id=eos, pad_token_id=eos, hidden_size=hidden,
                          intermediate_size=3 * hidden, **FAMILY)
    save_family(FamilyModel(config), work / "family", tokenizer_source=TOKENIZER_PATH.parent)
    export_member(work / "family", work / "member", MEMBER)


def problems(args) -> list[tuple[str, str]]:
    from familial.posttrain.rewards import sum_problems

    return sum_problems(9)


def run_familial(args, work: Path, beta: float) -> dict:
    from tokenizers import Tokenizer

    from familial.checkpoint_io import load_family
    from familial.posttrain.grpo import GRPOConfig, GRPOTrainer

    model = load_family(work / "family")
    config = GRPOConfig(family="", output="", member=MEMBER, trainable=FAMILY_TRAINABLE,
                        prompts_per_step=args.prompts, group_size=args.group, max_new_tokens=args.tokens,
                        learning_rate=1e-4, beta=beta, seed=0, device="cpu")
    trainer = GRPOTrainer(model, Tokenizer.from_file(str(work / "family" / "tokenizer.json")), "arithmetic",
                          problems(args), config)
    trainer.step()  # warm-up: the engine's cache, the optimiser's state
    records, times, cpu = [], [], []
    with PeakRSS() as rss:
        for _ in range(args.steps):
            started, started_cpu = time.perf_counter(), time.thread_time()
            records.append(trainer.step())
            times.append(time.perf_counter() - started)
            cpu.append(time.thread_time() - started_cpu)
    state = state_bytes(trainer.policy.parameters(), trainer.optimizer, trainer.reference or ())
    return {"step_s": times, "step_cpu_s": cpu, "peak_rss": rss.peak, "state_bytes": state,
            "completion_tokens": sum(r["completion_tokens"] for r in records) / len(records),
            "reward": sum(r["reward"] for r in records) / len(records)}


def run_trl(args, work: Path, beta: float) -> dict:
    import logging

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from familial.posttrain.rewards import arithmetic_reward

    logging.disable(logging.WARNING)
    model = AutoModelForCausalLM.from_pretrained(work / "member", dtype=torch.float32)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(fnmatch.fnmatch(name, p) for p in DENSE_TRAINABLE))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(work / "member")
    tokenizer.padding_side = "left"
    data = problems(args)
    dataset = Dataset.from_list([{"prompt": p, "answer": a} for p, a in data] * 50)

    def reward(prompts, completions, answer, **_):
        return [arithmetic_reward(p, c, a) for p, c, a in zip(prompts, completions, answer)]

    timing = {"step_s": [], "step_cpu_s": []}

    class Clock(TrainerCallback):
        """Times steps 2..N (the first one warms up), with the peak RSS over them."""

        def on_step_begin(self, targs, state, control, **kw):
            timing["start"], timing["start_cpu"] = time.perf_counter(), time.thread_time()
            if state.global_step == 1:
                timing["rss"] = PeakRSS().__enter__()

        def on_step_end(self, targs, state, control, **kw):
            if state.global_step > 1:
                timing["step_s"].append(time.perf_counter() - timing["start"])
                timing["step_cpu_s"].append(time.thread_time() - timing["start_cpu"])

        def on_train_end(self, targs, state, control, **kw):
            timing["rss"].__exit__(None, None, None)

    config = GRPOConfig(output_dir=str(work / "trl"), use_cpu=True, bf16=False, report_to=[],
                        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
                        num_generations=args.group, max_completion_length=args.tokens, temperature=1.0,
                        learning_rate=1e-4, beta=beta, epsilon=0.2, num_iterations=1, loss_type="dapo",
                        max_steps=args.steps + 1, save_strategy="no", logging_steps=1, seed=0,
                        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta2=0.99,
                        max_grad_norm=1.0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    logs = [r for r in trainer.state.log_history if "reward" in r][1:]
    reference = []
    if getattr(trainer, "ref_model", None) is not None:
        reference = list(trainer.ref_model.parameters())
    state = state_bytes(trainer.model.parameters(), trainer.optimizer, reference)
    return {"step_s": timing["step_s"], "step_cpu_s": timing["step_cpu_s"], "peak_rss": timing["rss"].peak, "state_bytes": state,
            "completion_tokens": sum(r["completions/mean_length"] for r in logs) / max(len(logs), 1),
            "reward": sum(r["reward"] for r in logs) / max(len(logs), 1)}


def side(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run = {"familial": run_familial, "trl": run_trl}[args.side]
    print(json.dumps(run(args, Path(args.work), args.beta)), flush=True)


def launch(args, work: Path, name: str, beta: float) -> dict:
    command = [sys.executable, __file__, "--side", name, "--work", str(work), "--beta", str(beta),
               "--steps", str(args.steps), "--prompts", str(args.prompts), "--group", str(args.group),
               "--tokens", str(args.tokens), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{name} side failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of 3 timed steps (under a minute)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side and round")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--tokens", type=int, default=16, help="max completion tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256, help="the family's hidden size (MLP: 3x)")
    parser.add_argument("--side", choices=("familial", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, default=0.04, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side(args)
        return
    if args.quick:
        args.rounds, args.steps = 1, 3
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.hidden)
        runs = {"familial": [], "trl": [], "policy_alone": []}
        for _ in range(args.rounds):
            runs["familial"].append(launch(args, work, "familial", 0.04))
            runs["trl"].append(launch(args, work, "trl", 0.04))
            runs["policy_alone"].append(launch(args, work, "familial", 0.0))
    # A side's speed: its steps' median CPU time on the training thread (every side computes on
    # that one thread, so a busy machine delays the steps but barely changes this), and its
    # fastest wall-clock step (load only slows steps) as a check.
    cpu = {name: statistics.median(t for x in r for t in x["step_cpu_s"]) for name, r in runs.items()}
    fastest = {name: min(t for x in r for t in x["step_s"]) for name, r in runs.items()}
    peak = {name: min(x["peak_rss"] for x in r) for name, r in runs.items()}
    last = {name: r[-1] for name, r in runs.items()}
    for name in ("familial", "trl"):
        b = last[name]
        print(f"{name:>9}: {1 / cpu[name]:.3f} steps/s (median step {cpu[name]:.3f} s CPU, fastest "
              f"{fastest[name]:.3f} s wall), peak RSS {peak[name] / 2**20:.0f} MiB, state {b['state_bytes'] / 2**20:.1f} "
              f"MiB, completion {b['completion_tokens']:.1f} tokens, reward {b['reward']:.3f}")
    print(f"familial, beta 0 (policy alone): peak RSS {peak['policy_alone'] / 2**20:.0f} MiB, "
          f"state {last['policy_alone']['state_bytes'] / 2**20:.1f} MiB")
    result = {
        "step_rate_ratio": round(cpu["trl"] / cpu["familial"], 3),
        "wall_step_rate_ratio": round(fastest["trl"] / fastest["familial"], 3),
        "peak_rss_ratio": round(peak["familial"] / peak["trl"], 3),
        "reference_memory_ratio": round(peak["familial"] / peak["policy_alone"], 3),
        "reference_state_ratio": round(last["familial"]["state_bytes"] / last["policy_alone"]["state_bytes"], 3),
        "trl_reference_state_ratio": round(last["trl"]["state_bytes"] / last["policy_alone"]["state_bytes"], 3),
        "familial_steps_per_s": round(1 / cpu["familial"], 3),
        "trl_steps_per_s": round(1 / cpu["trl"], 3),
        "settings": {"prompts": args.prompts, "group": args.group, "tokens": args.tokens, "steps": args.steps,
                     "rounds": args.rounds, "threads": args.threads, "beta": 0.04, "hidden": args.hidden, "family": FAMILY,
                     "member": MEMBER},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
