"""Pick early-exit thresholds from held-out tokens and store them in the checkpoint.

For every early exit, tokens are ranked by confidence; the threshold is the lowest
confidence at which the tokens the exit would accept (confidence >= threshold) still agree
with the full member's top-1 at the target rate. An exit that never reaches the target gets
NEVER (no token exits there). Confidence and agreement are measured teacher-forced on the
held-out text (every exit sees the true prefix), which is what the runtime's exact prompt KV
gives and what its CALM-style copied KV approximates for generated tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from familial.config import FAMILY_CONFIG_NAME, FamilyConfig
from familial.infer.adaptive import METRICS, confidence
from familial.model import FamilyModel
from familial.staging import write_text_atomically

# A threshold no confidence reaches (top-1 probability and margin are at most 1).
NEVER = 1.01


def load_token_ids(path: str | Path) -> np.ndarray:
    """Token shards directory (familial data prepare), a .npy array, or whitespace-separated ids."""
    path = Path(path)
    if path.is_dir():
        from familial.data.shards import TokenShards

        return np.asarray(TokenShards(path).tokens, dtype=np.int64)
    if not path.exists():
        raise FileNotFoundError(f"{path}: calibration data not found (expected a token shards "
                                f"directory, a .npy file or a text file of token ids)")
    if path.suffix == ".npy":
        return np.load(path).astype(np.int64).reshape(-1)
    try:
        return np.array([int(t) for t in path.read_text().split()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"{path}: expected whitespace-separated integer token ids") from None


def choose_threshold(scores: torch.Tensor, agree: torch.Tensor, target: float) -> tuple[float, float]:
    """Lowest threshold whose accepted tokens agree at >= target; returns (threshold, coverage)."""
    order = scores.argsort(descending=True)
    scores, agree = scores[order], agree[order].float()
    rate = agree.cumsum(0) / torch.arange(1, len(agree) + 1)
    # Only cut between distinct scores: ties are accepted or refused together.
    boundary = torch.ones_like(scores, dtype=torch.bool)
    boundary[:-1] = scores[:-1] != scores[1:]
    ok = ((rate >= target) & boundary).nonzero().flatten()
    if len(ok) == 0:
        return NEVER, 0.0
    last = int(ok[-1])
    return float(scores[last]), (last + 1) / len(scores)


@torch.inference_mode()
def calibrate(model: FamilyModel, token_ids: np.ndarray, target: float = 0.9, metric: str = "top1",
              seq_len: int = 128, max_tokens: int = 16384, batch_size: int = 8) -> dict:
    """The `runtime.early_exit` settings for `model` measured on `token_ids`."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    if not 0 < target <= 1:
        raise ValueError(f"target {target!r}: expected an agreement rate in (0, 1]")
    config = model.config
    windows = min(len(token_ids) // seq_len, max(1, max_tokens // seq_len))
    if windows == 0:
        raise ValueError(f"calibration data has {len(token_ids)} tokens, fewer than one window of {seq_len}")
    ids = torch.as_tensor(token_ids[: windows * seq_len]).view(windows, seq_len)
    if int(ids.max()) >= config.vocab_size:
        raise ValueError(f"calibration data holds token id {int(ids.max())} >= vocab_size {config.vocab_size}")
    model.eval()
    scores = {e: [] for e in config.exits[:-1]}
    agree = {e: [] for e in config.exits[:-1]}
    for start in range(0, windows, batch_size):
        logits = model(ids[start:start + batch_size])
        full = logits[config.exits[-1]].argmax(-1).flatten()
        for e in scores:
            scores[e].append(confidence(logits[e], metric).flatten())
            agree[e].append(logits[e].argmax(-1).flatten() == full)
    thresholds, coverage = {}, {}
    for e in scores:
        threshold, covered = choose_threshold(torch.cat(scores[e]), torch.cat(agree[e]), target)
        thresholds[str(e)], coverage[str(e)] = threshold, round(covered, 4)
    return {"metric": metric, "target": target, "thresholds": thresholds, "coverage": coverage,
            "tokens": windows * seq_len}


def write_early_exit(family_dir: str | Path, settings: dict) -> Path:
    """Store `settings` as runtime.early_exit in family.json, replaced in one rename (its
    tensor checksums kept)."""
    family_dir = Path(family_dir)
    config = FamilyConfig.load(family_dir)
    config.runtime["early_exit"] = settings
    checksums = FamilyConfig.load_checksums(family_dir)
    return write_text_atomically(family_dir / FAMILY_CONFIG_NAME, config.to_json(checksums))
