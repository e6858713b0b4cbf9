"""SVD-LLM v2 decomposition: activation-aware low-rank factors with per-matrix rank allocation.

For a linear layer y = W x (W is m x n) with calibration inputs X (n x N tokens) and
covariance C = X X^T, the rank-k matrix W' that minimises ||W X - W' X||_F is
U_k U_k^T W, U_k the top-k left singular vectors of W X. Its error is the theoretical
minimum sqrt(sum_{i>k} sigma_i(W X)^2). We get U_k without inverting C: with C = Q L Q^T
(eigendecomposition, negative rounding noise clamped to zero), W X and W Q L^{1/2} have the
same left singular vectors and values, so rank-deficient calibration data is fine
(method "eigen", the default). "cholesky" is the classic SVD-LLM whitening (needs C positive
definite, or `damping`), "svd" plain truncated SVD of W (the baseline). The factors are
stored as `LowRankLinear`: up (m x k) = U_k, down (k x n) = U_k^T W.

Rank allocation within a group of same-type matrices (all q_proj, all down_proj, ...): the
truncation loss L_i of each matrix at the uniform target ratio R gives a score s_i, and
r_i = |G| R s_i / sum_j s_j (the paper's formula, which keeps the mean ratio at R; matrices in a
group have one shape, so this keeps the parameter budget). The paper's s_i = 1/log(L_i) needs
every L_i > 1; when some L_i <= 1 (tiny models, small calibration sets) we use
s_i = 1/log(1 + L_i / mean_G(L)), which is scale-free, always positive and, like the paper's,
decreasing in L_i, so larger-loss matrices keep more rank. Ratios are capped so every matrix
keeps rank >= 1; the excess is redistributed over the others (water-filling).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from familial.config import ConfigError
from familial.model import FamilyModel, LowRankLinear

Method = Literal["eigen", "cholesky", "svd"]


# Calibration statistics.

@dataclass
class Covariance:
    """Sum over calibration tokens of x x^T for one linear layer's input (float64)."""

    matrix: torch.Tensor
    tokens: int


def collect_covariances(model: FamilyModel, member: int | str, names: list[str],
                        batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]
                        ) -> dict[str, Covariance]:
    """Run `member` on (input_ids, attention_mask) batches; accumulate X^T X per target linear.

    Padding positions (attention_mask 0) are left out. Accumulated in float64 on the
    module's device, batch by batch, so memory is n x n per target whatever the data size.
    """
    exit_layer = model.config.resolve_member(member)
    stats: dict[str, Covariance] = {}
    valid: list[torch.Tensor] = []
    handles = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            rows = x[valid[0]].reshape(-1, x.shape[-1]).double()  # (N_valid, n)
            stat = stats.get(name)
            if stat is None:
                stat = stats[name] = Covariance(
                    torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device), 0)
            stat.matrix.addmm_(rows.T, rows)
            stat.tokens += rows.shape[0]
        return record

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for input_ids, attention_mask in batches:
                mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                        else attention_mask.bool())
                valid[:] = [mask]
                model(input_ids, attention_mask=attention_mask, exits=[exit_layer])
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in stats]
    if missing:
        raise ConfigError(f"calibration never reached {missing[:3]}: they are not on member "
                          f"{exit_layer}'s path, or the calibration data is empty")
    return stats


def calibration_batches(source: str | Path | torch.Tensor, samples: int, seq_len: int,
                        batch_size: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches of up to `samples` sequences of <= seq_len tokens.

    `source` is a token shard directory (the first `samples` documents, each cut to seq_len
    and right-padded), a .pt/.npy file holding a (S, T) id tensor, or such a tensor.
    """
    sequences = _calibration_sequences(source, samples, seq_len)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, sequence in enumerate(chunk):
            ids[row, :len(sequence)] = sequence
            mask[row, :len(sequence)] = 1
        yield ids, mask


def _calibration_sequences(source, samples: int, seq_len: int) -> list[torch.Tensor]:
    if samples < 1 or seq_len < 1:
        raise ConfigError(f"calibration: samples = {samples} and seq_len = {seq_len} must be >= 1")
    if isinstance(source, torch.Tensor):
        ids = source
    else:
        path = Path(source)
        if path.is_dir():
            from familial.data.shards import TokenShards

            shards = TokenShards(path)
            count = min(samples, shards.num_documents)
            return [torch.from_numpy(np.asarray(shards.document(i)[:seq_len], dtype=np.int64))
                    for i in range(count)]
        if path.suffix == ".pt":
            ids = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".npy":
            ids = torch.from_numpy(np.load(path).astype(np.int64))
        else:
            raise ConfigError(f"{path}: expected a token shard directory, a .pt or a .npy file "
                              f"of token ids")
        if not isinstance(ids, torch.Tensor):
            raise ConfigError(f"{path}: expected a tensor of token ids, got {type(ids).__name__}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point():
        raise ConfigError(f"calibration ids: expected a non-empty (samples, length) integer "
                          f"tensor, got shape {tuple(ids.shape)} {ids.dtype}")
    return [row[:seq_len].long() for row in ids[:samples]]


# Truncation of one matrix.

def whitened_spectrum(weight: torch.Tensor, covariance: torch.Tensor,
                      damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors U (m x min) and singular values of W X, from W and C = X X^T."""
    c = _damped(covariance.double(), damping)
    eigenvalues, q = torch.linalg.eigh(c)
    root = q * eigenvalues.clamp(min=0).sqrt()  # C = root root^T
    u, sigma, _ = torch.linalg.svd(weight.double() @ root, full_matrices=False)
    return u, sigma


def truncation_loss(sigma: torch.Tensor, rank: int) -> float:
    """The theoretical minimum ||W X - W' X||_F over rank-`rank` W'."""
    return float(sigma[rank:].pow(2).sum().sqrt())


def truncate(weight: torch.Tensor, covariance: torch.Tensor | None, rank: int,
             method: Method = "eigen", damping: float = 0.0,
             name: str = "matrix") -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors (up m x k, down k x n) of `weight`, computed in float64."""
    w = weight.double()
    if method == "svd":
        u, _, _ = torch.linalg.svd(w, full_matrices=False)
    elif method == "eigen":
        u, _ = whitened_spectrum(w, covariance, damping)
    elif method == "cholesky":
        c = _damped(covariance.double(), damping)
        root, info = torch.linalg.cholesky_ex(c)
        if int(info):
            raise ConfigError(
                f"{name}: the calibration covariance is singular (not positive definite) so "
                f"Cholesky whitening cannot invert it; pass a damping (e.g. --damping 0.01, "
                f"a fraction of the mean diagonal added to it) or use --method eigen, which "
                f"needs no inversion")
        u, sigma, vh = torch.linalg.svd(w @ root, full_matrices=False)
        # down = S_k V_k^T root^{-1}, by a triangular solve instead of an explicit inverse.
        scaled = sigma[:rank, None] * vh[:rank]
        down = torch.linalg.solve_triangular(root, scaled, upper=False, left=False)
        return u[:, :rank], down
    else:
        raise ConfigError(f"method = {method!r}: expected eigen, cholesky or svd")
    up = u[:, :rank]
    return up, up.T @ w


def _damped(c: torch.Tensor, damping: float) -> torch.Tensor:
    if damping < 0:
        raise ConfigError(f"damping = {damping}: expected a number >= 0")
    if damping == 0:
        return c
    scale = c.diagonal().mean().clamp(min=1e-12)
    return c + damping * scale * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


# Rank allocation.

def rank_for_ratio(rows: int, cols: int, ratio: float) -> int:
    """k = floor((1 - r) m n / (m + n)): the rank whose two factors hold (1 - r) m n params."""
    return max(1, math.floor((1 - ratio) * rows * cols / (rows + cols)))


def max_ratio(rows: int, cols: int) -> float:
    """The ratio that leaves rank 1."""
    return 1 - (rows + cols) / (rows * cols)


def allocation_scores(losses: list[float]) -> list[float]:
    """s_i: the paper's 1/log(L_i) when every L_i > 1, else 1/log(1 + L_i / mean(L))."""
    if all(loss > 1 for loss in losses):
        return [1 / math.log(loss) for loss in losses]
    mean = sum(losses) / len(losses)
    if mean <= 0:
        return [1.0] * len(losses)
    return [1 / math.log1p(max(loss / mean, 1e-12)) for loss in losses]


def allocate_ratios(losses: list[float], ratio: float, cap: float) -> list[float]:
    """r_i = |G| R s_i / sum_j s_j, capped at `cap` with the excess given to the others."""
    scores = allocation_scores(losses)
    budget = len(losses) * ratio
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(len(losses)) if i not in fixed]
        if not free:
            return [fixed[i] for i in range(len(losses))]
        left = budget - sum(fixed.values())
        total = sum(scores[i] for i in free)
        ratios = {i: left * scores[i] / total for i in free}
        over = [i for i in free if ratios[i] > cap]
        if not over:
            ratios.update(fixed)
            return [ratios[i] for i in range(len(losses))]
        for i in over:
            fixed[i] = cap


# Compressing a member.

@dataclass
class MatrixPlan:
    name: str
    group: str
    rows: int
    cols: int
    ratio: float
    # theoretical truncation loss at the uniform target ratio (what allocation used).
    loss_at_target: float
    rank: int | None  # None: kept dense (a factorisation would not shrink it)
    relative_error: float  # ||W X - W' X||_F / ||W X||_F on the calibration data

    @property
    def dense_parameters(self) -> int:
        return self.rows * self.cols

    @property
    def parameters(self) -> int:
        return self.dense_parameters if self.rank is None else self.rank * (self.rows + self.cols)

    def to_dict(self) -> dict:
        return dict(asdict(self), dense_parameters=self.dense_parameters, parameters=self.parameters)


def default_targets(model: FamilyModel, member: int | str) -> list[str]:
    """The member's expanded blocks (or its whole branch if never expanded) and its own head."""
    config = model.config
    exit_layer = config.resolve_member(member)
    if exit_layer == config.exits[-1]:
        raise ConfigError("the final member has no branch of its own; name the matrices to "
                          "compress with targets (they are shared with every other member)")
    record = config.runtime.get("expansion", {}).get(str(exit_layer))
    first = record["first_new_layer"] if record else 0
    prefix = f"branches.{exit_layer}"
    names = [f"{prefix}.layers.{i}.{kind}" for i in range(first, config.branch_depth(exit_layer))
             for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    if not config.shared_head:
        names.append(f"{prefix}.lm_head")
    return names


def resolve_targets(model: FamilyModel, member: int | str, patterns: list[str] | None) -> list[str]:
    """Dense linear layers on the member's path whose family names match a pattern."""
    if not patterns:
        return default_targets(model, member)
    exit_layer = model.config.resolve_member(member)
    on_path = {id(m) for m in model.member(exit_layer).modules()}
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and id(module) in on_path
             and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not names:
        raise ConfigError(f"target patterns {patterns} match no dense linear layer of member "
                          f"{exit_layer} (names look like branches.{exit_layer}.layers.0."
                          f"self_attn.q_proj)")
    return names


def _group(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if ".layers." in name else parts[-1]


def plan_compression(model: FamilyModel, covariances: dict[str, Covariance], ratio: float,
                     damping: float = 0.0) -> list[MatrixPlan]:
    """Ranks for every covariance's matrix so each group loses `ratio` of its parameters."""
    if not 0 < ratio < 1:
        raise ConfigError(f"ratio = {ratio}: expected a fraction of parameters to remove in (0, 1)")
    groups: dict[tuple, list[str]] = {}
    spectra = {}
    for name, stat in covariances.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"{name}: is {type(module).__name__}, not a dense linear layer "
                              f"(already compressed?)")
        if module.bias is not None:
            raise ConfigError(f"{name}: has a bias, which a LowRankLinear cannot hold")
        spectra[name] = whitened_spectrum(module.weight.detach(), stat.matrix, damping)[1]
        groups.setdefault((_group(name), tuple(module.weight.shape)), []).append(name)
    plans = []
    for (group, (rows, cols)), names in groups.items():
        uniform = rank_for_ratio(rows, cols, ratio)
        losses = [truncation_loss(spectra[n], uniform) for n in names]
        ratios = allocate_ratios(losses, ratio, max_ratio(rows, cols))
        for name, loss, r in zip(names, losses, ratios):
            rank = rank_for_ratio(rows, cols, r)
            if rank * (rows + cols) >= rows * cols:
                rank = None
            sigma = spectra[name]
            kept = len(sigma) if rank is None else rank
            total = float(sigma.pow(2).sum().sqrt())
            error = truncation_loss(sigma, kept) / total if total > 0 else 0.0
            plans.append(MatrixPlan(name, group, rows, cols, r, loss, rank, error))
    return plans


@torch.no_grad()
def apply_plan(model: FamilyModel, plans: list[MatrixPlan], covariances: dict[str, Covariance],
               method: Method = "eigen", damping: float = 0.0) -> None:
    for plan in plans:
        if plan.rank is None:
            continue
        weight = model.get_submodule(plan.name).weight
        up, down = truncate(weight.detach(), covariances[plan.name].matrix, plan.rank, method,
                            damping, plan.name)
        low_rank = model.factorize(plan.name, plan.rank)
        low_rank.to(device=weight.device, dtype=weight.dtype)
        low_rank.up.weight.copy_(up)
        low_rank.down.weight.copy_(down)


def compress_member(model: FamilyModel, member: int | str, batches, ratio: float,
                    targets: list[str] | None = None, method: Method = "eigen",
                    damping: float = 0.0) -> list[MatrixPlan]:
    """Calibrate, allocate ranks and factorise `member`'s target matrices in place."""
    names = resolve_targets(model, member, targets)
    covariances = collect_covariances(model, member, names, batches)
    plans = plan_compression(model, covariances, ratio, damping)
    apply_plan(model, plans, covariances, method, damping)
    model.config.runtime.setdefault("compression", {})[str(model.config.resolve_member(member))] = {
        "ratio": ratio, "method": method, "damping": damping,
        "dense_parameters": sum(p.dense_parameters for p in plans),
        "parameters": sum(p.parameters for p in plans)}
    return plans


@torch.no_grad()
def merge_low_rank(model: FamilyModel) -> list[str]:
    """Replace every LowRankLinear by a dense linear holding up @ down (float64 product).

    Every listed module is checked before any is replaced, and `config.low_rank` is assigned
    once at the end rather than edited while its names are walked, so a refusal leaves the
    model and its config as they were."""
    sites = []
    for name in model.config.low_rank:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        low_rank = getattr(parent, child)
        if not isinstance(low_rank, LowRankLinear):
            raise ConfigError(f"{name}: listed in config.low_rank but is {type(low_rank).__name__}")
        sites.append((parent, child, low_rank))
    for parent, child, low_rank in sites:
        weight = low_rank.up.weight.double() @ low_rank.down.weight.double()
        dense = nn.Linear(low_rank.in_features, low_rank.out_features, bias=False)
        dense.to(device=low_rank.down.weight.device, dtype=low_rank.down.weight.dtype)
        dense.weight.copy_(weight)
        setattr(parent, child, dense)
    merged = list(model.config.low_rank)
    model.config.low_rank = {}
    return merged
