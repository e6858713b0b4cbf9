"""The paper's post-training story on the demo's smallest member (SPEC section 3).

Expand: append `plan.dae_blocks` decoder blocks to the smallest member's branch, their o_proj
and down_proj at zero (the member computes exactly what it did) and q/k/v/gate/up Gaussian.
Train: only the new blocks, the member's head and its final norm, on the member's loss alone,
through the same trainer as the joint run (a `freeze` list and zero weights for other exits).
Decompose: SVD-LLM v2 on the added blocks' matrices, calibrated on training text. Heal: train
the thin matrices that replace them (with the head and norm) for `plan.heal_steps`, as
SVD-LLM's own parameter update does after truncation. Each state is evaluated on the same
held-out windows as the family, so its rows pair with the others'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from familial.checkpoint_io import load_family, save_family
from familial.data.shards import TokenShards
from familial.demo.recipe import DemoPlan, dae_config
from familial.eval.evidence import member_rows, window_units
from familial.eval.perplexity import evaluate_held_out, window_count
from familial.model import FamilyModel
from familial.posttrain.compress import calibration_batches, compress_member
from familial.posttrain.expand import (
    expand_member,
    freeze_except,
    frozen_parameter_patterns,
    trainable_parameter_patterns,
)
from familial.train.config import load_config
from familial.train.loop import Trainer


@dataclass
class DaEResult:
    member: str
    exit: int
    loss: dict[str, np.ndarray]        # state -> (U,) summed nats on the family's units
                                       # (expanded, trained, compressed, healed)
    parameters: dict[str, int]         # state -> parameters of the member
    added: int                         # parameters of the new blocks (dense)
    added_compressed: int              # the same after decomposition
    trainable: int                     # parameters the DaE stage trained
    healed: FamilyModel                # decomposed, then healed: what the member ships as
    seconds: float                     # training, decomposition, healing and the evaluations between


def member_parameters(model: FamilyModel, exit_layer: int) -> int:
    return sum(p.numel() for p in model.member(exit_layer).parameters())


def _member_units(model: FamilyModel, exit_layer: int, held_out: TokenShards, plan: DemoPlan) -> np.ndarray:
    result = evaluate_held_out(model, held_out, plan.seq_len, plan.eval_tokens, exits=[exit_layer])
    units, _ = window_units(held_out, plan.seq_len, window_count(held_out, plan.seq_len, plan.eval_tokens))
    loss, _ = member_rows(result, units)
    return loss[model.config.member_name(exit_layer)]


def run_dae(plan: DemoPlan, family_dir: Path, data_dir: Path, out_dir: Path, seed: int) -> DaEResult:
    model = load_family(family_dir)
    exit_layer = model.config.exits[0]
    name = model.config.member_name(exit_layer)
    held_out = TokenShards(data_dir / "held_out")
    before = member_parameters(model, exit_layer)
    new_blocks = expand_member(model, exit_layer, plan.dae_blocks, init="random", seed=seed)
    expanded_dir = save_family(model, out_dir / "expanded", tokenizer_source=family_dir, overwrite=True)
    expanded = member_parameters(model, exit_layer)
    untrained = _member_units(model.eval(), exit_layer, held_out, plan)
    trainable, _ = freeze_except(model, trainable_parameter_patterns(model.config, exit_layer))

    frozen = frozen_parameter_patterns(model.config, exit_layer)
    started = time.perf_counter()
    trained = _train(dae_config(plan, expanded_dir, data_dir, out_dir / "run", name, frozen, seed + 1,
                                plan.dae_steps, plan.dae_lr), f"DaE {name}")
    trained_loss = _member_units(trained, exit_layer, held_out, plan)

    compressed = load_family(out_dir / "run" / "family")
    batches = calibration_batches(data_dir / "train", plan.calibration_sequences, plan.seq_len)
    plans = compress_member(compressed, exit_layer, batches, plan.compress_ratio,
                            targets=[f"{block}.*" for block in new_blocks])
    compressed_dir = save_family(compressed, out_dir / "compressed", tokenizer_source=family_dir,
                                 overwrite=True)
    compressed_loss = _member_units(compressed.eval(), exit_layer, held_out, plan)
    healed = compressed.eval()
    if plan.heal_steps:
        # A new seed: healing should not replay the first batches the blocks trained on.
        healed = _train(dae_config(plan, compressed_dir, data_dir, out_dir / "heal", name, frozen,
                                   seed + 2, plan.heal_steps, plan.heal_lr), f"healing {name}")
    seconds = time.perf_counter() - started
    return DaEResult(
        member=name, exit=exit_layer,
        loss={"expanded": untrained, "trained": trained_loss, "compressed": compressed_loss,
              "healed": (_member_units(healed, exit_layer, held_out, plan) if plan.heal_steps
                         else compressed_loss)},
        parameters={"before": before, "expanded": expanded,
                    "compressed": member_parameters(compressed, exit_layer)},
        added=expanded - before,
        added_compressed=expanded - before - sum(p.dense_parameters - p.parameters for p in plans),
        trainable=trainable, healed=healed, seconds=seconds)


def _train(config: dict, label: str) -> FamilyModel:
    trainer = Trainer(load_config(data=config), label=label)
    trainer.run()
    return load_family(trainer.finish()).eval()
