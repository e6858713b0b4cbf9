"""Evidence that a family learned: members against count baselines and each other, on held-out text.

`familial compare FAMILY --train TRAIN_SHARDS --held-out HELD_OUT_SHARDS [--seq-len N]` prints it
(`familial.commands.eval.compare`).

`collect` gathers, per unit of held-out text, every member's summed cross-entropy (one trunk
pass for all of them, `familial.eval.perplexity`), the same sums for the unigram and
Kneser-Ney bigram fitted to the training shards (`familial.eval.ngram`), and how many of each
member's greedy next tokens equal the full member's. A unit is a held-out document; when the
evaluated windows cover fewer than MIN_DOCUMENTS documents, too few to resample, it is a block
of consecutive windows of about BLOCK_TOKENS tokens instead.

`PairedBootstrap` resamples units with replacement, with the same draws for every statistic,
so a difference of two rows (a member and the bigram, two consecutive members, one member
before and after DaE) gets the interval of the paired difference: documents that are hard
for one model are hard for the other, and that shared part cancels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from familial.data.shards import TokenShards
from familial.eval.ngram import Bigram, Unigram, stream
from familial.eval.perplexity import HeldOut, evaluate_held_out, window_count
from familial.model import FamilyModel

MIN_DOCUMENTS = 20
BLOCK_TOKENS = 1024
BASELINES = {"unigram": "unigram (add-one)", "bigram": "bigram (Kneser-Ney)"}


@dataclass
class UnitSums:
    unit: str                        # what one resampled unit is ("document", "1024-token block")
    counts: np.ndarray               # (U,) target tokens per unit
    loss: dict[str, np.ndarray]      # row name -> (U,) summed nats per unit
    matches: dict[str, np.ndarray]   # member name -> (U,) tokens whose greedy pick is the full member's


def window_units(shards: TokenShards, seq_len: int, windows: int) -> tuple[np.ndarray, str]:
    """The unit of each evaluated window: the document of its first target, or a block."""
    first_target = int(shards.documents[0]) + 1 + np.arange(windows) * seq_len
    document = np.searchsorted(shards.documents, first_target, side="right") - 1
    documents = np.unique(document)
    if len(documents) >= MIN_DOCUMENTS:
        return np.searchsorted(documents, document), "document"
    per_block = max(1, BLOCK_TOKENS // seq_len)
    return np.arange(windows) // per_block, f"{per_block * seq_len}-token block"


def to_units(per_window: np.ndarray, units: np.ndarray) -> np.ndarray:
    return np.bincount(units, weights=per_window, minlength=int(units.max()) + 1)


def baseline_window_sums(baseline: Unigram | Bigram, shards: TokenShards, seq_len: int,
                         windows: int) -> np.ndarray:
    """(W,) summed nats of a count model over the same windows and targets as the members."""
    start = int(shards.documents[0])
    ids = np.asarray(shards.tokens[start:start + windows * seq_len + 1], dtype=np.int64)
    nll = baseline.nll(ids[:-1], ids[1:])
    if shards.loss_mask is not None:
        nll = nll * shards.loss_mask[start + 1:start + windows * seq_len + 1]
    return nll.reshape(windows, seq_len).sum(1)


def member_rows(result: HeldOut, units: np.ndarray, prefix: str = "") -> tuple[dict, dict]:
    loss = {prefix + n: to_units(result.loss_sums[k], units) for k, n in enumerate(result.names)}
    matches = {prefix + n: to_units(result.matches[k], units) for k, n in enumerate(result.names)}
    return loss, matches


def collect(model: FamilyModel, train: TokenShards, held_out: TokenShards, seq_len: int,
            max_tokens: int | None = None, batch_size: int = 8) -> UnitSums:
    """Members and count baselines on the first held-out windows (at most `max_tokens`)."""
    result = evaluate_held_out(model, held_out, seq_len, max_tokens, batch_size)
    windows = window_count(held_out, seq_len, max_tokens)
    units, unit = window_units(held_out, seq_len, windows)
    loss, matches = member_rows(result, units)
    tokens = stream(train)
    vocab = max(train.vocab_size, held_out.vocab_size)
    for name, kind in (("unigram", Unigram), ("bigram", Bigram)):
        loss[name] = to_units(baseline_window_sums(kind(tokens, vocab), held_out, seq_len, windows), units)
    return UnitSums(unit, to_units(result.counts, units), loss, matches)


@dataclass
class Estimate:
    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


class PairedBootstrap:
    """Percentile intervals over units drawn with replacement, one set of draws for all."""

    def __init__(self, counts: np.ndarray, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> None:
        if not 0 < level < 1 or resamples < 1:
            raise ValueError(f"bootstrap: level {level} must be in (0, 1) and resamples "
                             f"{resamples} positive")
        self.counts = counts
        self.draws = np.random.default_rng(seed).integers(0, len(counts), size=(resamples, len(counts)))
        self.quantiles = [(1 - level) / 2, (1 + level) / 2]

    def _estimate(self, value: float, samples: np.ndarray) -> Estimate:
        low, high = np.quantile(samples, self.quantiles)
        return Estimate(float(value), float(low), float(high))

    def per_token(self, sums: np.ndarray) -> Estimate:
        """sum(sums) / sum(tokens): a loss, a loss difference or an agreement rate."""
        samples = sums[self.draws].sum(1) / np.maximum(self.counts[self.draws].sum(1), 1)
        return self._estimate(sums.sum() / max(self.counts.sum(), 1), samples)

    def ratio(self, numerator: np.ndarray, denominator: np.ndarray) -> Estimate:
        """sum(numerator) / sum(denominator), e.g. a relative loss reduction."""
        samples = numerator[self.draws].sum(1) / denominator[self.draws].sum(1)
        return self._estimate(numerator.sum() / denominator.sum(), samples)


def family_report(sums: UnitSums, names: list[str], boot: PairedBootstrap) -> dict:
    """Per member: loss, loss minus each baseline, gap to the previous member, agreement."""
    bigram = sums.loss["bigram"]
    members = []
    for k, name in enumerate(names):
        loss = sums.loss[name]
        row = {"name": name, "loss": asdict(boot.per_token(loss)),
               "minus_unigram": asdict(boot.per_token(loss - sums.loss["unigram"])),
               "minus_bigram": asdict(boot.per_token(loss - bigram)),
               "agreement": asdict(boot.per_token(sums.matches[name]))}
        if k:
            row["minus_previous"] = asdict(boot.per_token(loss - sums.loss[names[k - 1]]))
        members.append(row)
    smallest, full = sums.loss[names[0]], sums.loss[names[-1]]
    return {"unit": sums.unit, "units": len(sums.counts), "tokens": int(sums.counts.sum()),
            "members": members,
            "baselines": {n: asdict(boot.per_token(sums.loss[n])) for n in BASELINES},
            "full_below_smallest": asdict(boot.ratio(smallest - full, smallest))}


def _ci(e: dict, digits: int = 3, sign: bool = False) -> str:
    f = f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}"
    return f"{f.format(e['value'])} [{f.format(e['low'])}, {f.format(e['high'])}]"


def format_report(report: dict, layers: dict[str, int] | None = None) -> str:
    """The report as a fixed-width table (nats per token; 95% paired intervals in brackets)."""
    lines = [(f"{'member':<8} {'layers':>6}  {'loss':<22}  {'minus bigram':<25}  "
             f"{'minus previous member':<25}  {'greedy = full member':<22}")]
    for row in report["members"]:
        previous = _ci(row["minus_previous"], sign=True) if "minus_previous" in row else "-"
        agreement = row["agreement"]
        lines.append(f"{row['name']:<8} {(layers or {}).get(row['name'], ''):>6}  {_ci(row['loss']):<22}  "
                     f"{_ci(row['minus_bigram'], sign=True):<25}  {previous:<25}  "
                     f"{agreement['value']:.1%} [{agreement['low']:.1%}, {agreement['high']:.1%}]")
    for name, label in BASELINES.items():
        lines.append(f"{label:<17}{_ci(report['baselines'][name]):>24}")
    drop = report["full_below_smallest"]
    lines.append(f"full member below the smallest: {drop['value']:.1%} [{drop['low']:.1%}, {drop['high']:.1%}]")
    return "\n".join(lines)
