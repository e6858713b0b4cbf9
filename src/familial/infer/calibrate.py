"""Calibrate early exit on held-out tokens with a stated guarantee, and store it in the checkpoint.

1. Features, teacher-forced (every exit sees the true prefix, which is what the runtime's exact
   KV gives): one pass of the family over held-out windows yields, per token and early exit,
   the trunk state entering the exit, the exit's softmax response (top1, margin), the
   saturation (cosine with the state at the previous exit), and the label: does the exit's
   top-1 token equal the full member's?
2. Windows alternate between a fit half and a calibration half.
3. Fit half: the classifier (an MLP per exit on the normalised state, binary cross-entropy on
   the agreement labels) and, for each one-number measure, a logistic map per exit from its
   score to the probability of agreement. So every measure estimates p_e, the probability that
   leaving at exit e agrees with the full member.
4. A path of rules, from every exit off to every token leaving at the first exit: at step k in
   [0, 1], exit e accepts p_e >= 1 - k * saved_e / saved_first, where saved_e is the layers
   saved by leaving at e (the Lagrangian of expected layers against expected disagreement:
   exits that save more take less certain tokens). Each step is stored as raw-score thresholds
   of its measure (the maps are monotone), exactly what the runtime compares. Softmax measures
   also get, per exit, a classifier screen that keeps 99% of the tokens the step accepts there
   (on the fit half), so the branch and head run only for tokens that may leave. A check is
   not free (familial.infer.adaptive.CHECK_COST, in decoder layers): each step then turns off,
   on the fit half, every exit whose checks cost the tokens reaching it more layers than its
   leaving tokens save (`paying`), so a step whose exit takes few tokens does not tax the rest.
5. The guarantee (Learn-then-Test with fixed-sequence testing, as in CALM): on the calibration
   half, steps are tested in order, each with the p-value exp(-n KL(observed || 1 - target))
   of "its disagreement rate is at least 1 - target" (Chernoff's bound on the binomial tail),
   and accepted while p <= delta. The operating point is the last accepted step. With
   probability at least 1 - delta over the calibration tokens, taken as independent draws of
   the tokens the family will see, the operating point's token agreement with the full member
   is at least `target`. Tokens of one document are not independent, so read it as the usual
   large-sample statement, not a proof for correlated text. Each step stores its agreement
   lower bound at that confidence, so a request's own target picks its step from the same
   table (familial.infer.adaptive.EarlyExit.for_target) without new data.
Reported per step and per exit: the share of tokens leaving there, their agreement and the
layers per token the exit's checks cost; per step: agreement, its lower bound, decoder layers
per token and the layer-count speedup, without and with the checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from familial import checks
from familial.config import FAMILY_CONFIG_NAME, ConfigError, FamilyConfig
from familial.infer.adaptive import (
    CHECK_COST,
    MEASURES,
    OFF,
    SOFTMAX,
    EarlyExit,
    ExitClassifier,
    ExitRule,
    operating_point,
    saturation,
    softmax_score,
)
from familial.model import FamilyModel, embed_inputs
from familial.staging import write_bytes_atomically, write_text_atomically

CLASSIFIER_PREFIX = "exit_classifier-"
# Steps of the path (k = 0, 0.01, ..., 1).
STEPS = 101
# Share of the tokens a softmax step accepts at an exit that its classifier screen keeps.
SCREEN_RECALL = 0.99


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


@dataclass
class Features:
    """Per early exit, (N,) tensors over N teacher-forced tokens (window after window)."""

    states: dict[int, torch.Tensor]      # (N, hidden) entering the exit
    scores: dict[str, dict[int, torch.Tensor]]   # measure -> exit -> score (no classifier)
    agree: dict[int, torch.Tensor]       # exit's top-1 == the full member's
    tokens: dict[int, torch.Tensor]      # every exit's top-1 (the last exit's too)

    def take(self, index: torch.Tensor) -> Features:
        return Features({e: s[index] for e, s in self.states.items()},
                        {m: {e: s[index] for e, s in by.items()} for m, by in self.scores.items()},
                        {e: a[index] for e, a in self.agree.items()},
                        {e: t[index] for e, t in self.tokens.items()})


@torch.inference_mode()
def exit_features(model: FamilyModel, windows: torch.Tensor, batch_size: int = 8) -> Features:
    """Features of every token of `windows` (B, T), computed as the runtime computes them."""
    config = model.config
    early = config.exits[:-1]
    states = {e: [] for e in early}
    scores = {m: {e: [] for e in early} for m in ("top1", "margin", "saturation")}
    tops = {e: [] for e in config.exits}
    for begin in range(0, len(windows), batch_size):
        ids = windows[begin:begin + batch_size]
        x, rotary, _ = embed_inputs(model.model.embed_tokens, model.model.rotary_emb, ids, None, None)
        # The state entering the previous early exit (the embeddings before the first).
        previous = x

        def at_exit(i: int, branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            nonlocal previous
            logits = model.exit_head(i)(model.exit_norm(i)(branch))
            states[i].append(x.flatten(0, 1).float())
            scores["saturation"][i].append(saturation(x.flatten(0, 1), previous.flatten(0, 1)))
            for measure in SOFTMAX:
                scores[measure][i].append(softmax_score(logits, measure).flatten())
            tops[i].append(logits.argmax(-1).flatten())
            previous = x
            return x

        x = model.walk(x, rotary, 0, config.num_hidden_layers, early, at_exit)
        tops[config.exits[-1]].append(model.lm_head(model.model.norm(x)).argmax(-1).flatten())
    tokens = {e: torch.cat(t) for e, t in tops.items()}
    return Features({e: torch.cat(s) for e, s in states.items()},
                    {m: {e: torch.cat(s) for e, s in by.items()} for m, by in scores.items()},
                    {e: tokens[e] == tokens[config.exits[-1]] for e in early}, tokens)


def train_classifier(features: Features, hidden: int = 64, steps: int = 200, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per exit, an MLP on the RMS-normalised state predicting agreement (the runtime's
    ExitClassifier), fitted by L-BFGS on binary cross-entropy with a little weight decay."""
    weights = {}
    generator = torch.Generator().manual_seed(seed)
    for e, states in features.states.items():
        x = F.rms_norm(states.float(), states.shape[-1:], eps=1e-6)
        mean, scale = x.mean(0), x.std(0) + 1e-6
        w1, b1, w2, b2 = _fit_mlp((x - mean) / scale, features.agree[e].float(), hidden, steps, generator)
        # Fold the standardisation into the first layer: the runtime feeds normalised states.
        folded = w1 / scale
        weights.update(zip(ExitClassifier.keys(e), (folded, b1 - folded @ mean, w2, b2)))
    return weights


def _fit_mlp(z: torch.Tensor, y: torch.Tensor, hidden: int, steps: int,
             generator: torch.Generator) -> list[torch.Tensor]:
    params = [(torch.randn(hidden, z.shape[1], generator=generator) / math.sqrt(z.shape[1])),
              torch.zeros(hidden), torch.randn(1, hidden, generator=generator) / math.sqrt(hidden), torch.zeros(1)]
    for p in params:
        p.requires_grad_()
    w1, b1, w2, b2 = params
    optimizer = torch.optim.LBFGS(params, max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        out = F.linear(F.gelu(F.linear(z, w1, b1)), w2, b2)[:, 0]
        value = F.binary_cross_entropy_with_logits(out, y) + 1e-3 * (w1.pow(2).sum() + w2.pow(2).sum())
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return [p.detach() for p in params]


def fit_map(score: torch.Tensor, agree: torch.Tensor) -> tuple[float, float]:
    """Logistic map score -> P(agree): (slope, intercept); slope <= 0 means the score does not
    tell agreeing tokens apart at this exit."""
    s = score.double()
    mean, scale = float(s.mean()), float(s.std()) + 1e-12
    z, y = (s - mean) / scale, agree.double()
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=100, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.binary_cross_entropy_with_logits(params[0] * z + params[1], y)
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    a, b = params.detach().tolist()
    return a / scale, b - a * mean / scale


def raw_threshold(probability: float, slope: float, intercept: float) -> float:
    """The score at which the logistic map reaches `probability` (OFF: never; -1: always)."""
    if probability >= 1 or slope <= 0:
        return OFF
    if probability <= 0:
        return -1.0
    score = (math.log(probability / (1 - probability)) - intercept) / slope
    return min(max(score, -1.0), OFF)


def kl_bernoulli(p: float, q: float) -> float:
    p, q = min(max(p, 0.0), 1.0), min(max(q, 1e-15), 1 - 1e-15)
    out = 0.0
    if p > 0:
        out += p * math.log(p / q)
    if p < 1:
        out += (1 - p) * math.log((1 - p) / (1 - q))
    return out


def agreement_lower_bound(agreeing: int, n: int, delta: float) -> float:
    """The agreement rate a test at level delta cannot rule out from below: 1 - the largest
    disagreement rate eps with exp(-n KL(observed || eps)) > delta."""
    observed = 1 - agreeing / n
    low, high = observed, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if n * kl_bernoulli(observed, middle) > math.log(1 / delta):
            high = middle
        else:
            low = middle
    return 1 - high


def leave_at(config: FamilyConfig, rule: ExitRule, scores: dict[int, torch.Tensor],
             screens: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(N,) exit each token leaves at under `rule`, given its scores (and classifier screen
    probabilities) at every early exit: the runtime's decision, teacher-forced. Also, per
    exit, the tokens whose softmax check ran the exit's branch there (softmax measures)."""
    early = config.exits[:-1]
    exits = torch.full_like(next(iter(scores.values())), config.exits[-1], dtype=torch.long)
    checked = {}
    for e in reversed(early):
        if not rule.enabled(e):
            continue
        check = torch.ones_like(scores[e], dtype=torch.bool)
        if rule.screen is not None and screens is not None:
            check = screens[e] >= rule.screen[e]
        checked[e] = check
        exits = torch.where(check & (scores[e] >= rule.thresholds[e]), e, exits)
    return exits, checked


def check_layers(config: FamilyConfig, rule: ExitRule, exits: torch.Tensor,
                 checked: dict[int, torch.Tensor]) -> dict[int, float]:
    """Per enabled early exit, decoder layers per token its checks cost (CHECK_COST): every
    token reaching the exit pays a trunk-state measure (or a softmax measure's screen); a
    softmax check that ran the branch and head (counted as a layer) for a token going on pays
    those too (a token leaving there pays them as its member's own layers)."""
    costs = {}
    for e, check in checked.items():
        reach = exits >= e
        if rule.measure in SOFTMAX:
            screen = CHECK_COST["classifier"] if rule.screen is not None else 0.0
            ran = (reach & check & (exits != e)).float().mean()
            costs[e] = float(reach.float().mean()) * screen + float(ran) * (config.branch_depth(e) + 1)
        else:
            costs[e] = float(reach.float().mean()) * CHECK_COST[rule.measure]
    return costs


def member_layers(config: FamilyConfig, exits: torch.Tensor) -> float:
    """Decoder layers per token of the members the tokens leave from."""
    return sum(float((exits == e).float().mean()) * config.member_layers(e) for e in config.exits)


def expected_layers(config: FamilyConfig, rule: ExitRule, exits: torch.Tensor,
                    checked: dict[int, torch.Tensor]) -> float:
    """Decoder layers per token: each token's member, plus the checks (check_layers)."""
    return member_layers(config, exits) + sum(check_layers(config, rule, exits, checked).values())


def paying(config: FamilyConfig, rule: ExitRule, scores: dict[int, torch.Tensor],
           screens: dict[int, torch.Tensor] | None = None) -> ExitRule:
    """`rule` with its exits turned off, one at a time, while turning one off lowers the expected
    layers per token (checks included) on these tokens: an exit few tokens leave costs every
    token reaching it a check and saves little."""
    layers = expected_layers(config, rule, *leave_at(config, rule, scores, screens))
    while True:
        best = None
        for e in config.exits[:-1]:
            if rule.enabled(e):
                off = dataclasses.replace(rule, thresholds={**rule.thresholds, e: OFF})
                off_layers = expected_layers(config, off, *leave_at(config, off, scores, screens))
                if off_layers < layers:
                    best, layers = off, off_layers
        if best is None:
            return rule
        rule = best


def describe(config: FamilyConfig, rule: ExitRule, exits: torch.Tensor, checked: dict[int, torch.Tensor],
             agree: dict[int, torch.Tensor], delta: float) -> dict:
    """Agreement (and its lower bound), layers per token and per exit shares of a rule's exits."""
    n = len(exits)
    agreeing = torch.ones(n, dtype=torch.bool)
    per_exit, layers = {}, torch.zeros(n)
    for e in config.exits:
        mine = exits == e
        count = int(mine.sum())
        if e in agree:
            agreeing = torch.where(mine, agree[e], agreeing)
        per_exit[str(e)] = {"share": round(count / n, 4),
                            "agreement": round(float(agree[e][mine].float().mean()), 4)
                            if e in agree and count else 1.0 if count else None}
        layers += mine * config.member_layers(e)
        if rule.measure in SOFTMAX and e in checked:
            # A softmax check the token did not leave at still ran the exit's branch.
            layers += ((exits > e) & checked[e]) * config.branch_depth(e)
    checks = check_layers(config, rule, exits, checked)
    for e, cost in checks.items():
        per_exit[str(e)]["check_layers"] = round(cost, 4)
    agreed = int(agreeing.sum())
    mean_layers = float(layers.mean())
    # Of the tokens reaching each early exit, the share leaving there: how likely a batch of
    # sequences all leave together (familial.infer.runner asks a batch only where that pays).
    leave = {str(e): round(int((exits == e).sum()) / max(int((exits >= e).sum()), 1), 4)
             for e in config.exits[:-1]}
    return {"agreement": round(agreed / n, 5), "lower_bound": round(agreement_lower_bound(agreed, n, delta), 5),
            "layers": round(mean_layers, 3),
            "speedup": round(config.num_hidden_layers / mean_layers, 3),
            "speedup_with_checks": round(config.num_hidden_layers / (member_layers(config, exits)
                                                                      + sum(checks.values())), 3),
            "leave": leave, "exits": per_exit}


@dataclass
class Calibration:
    """Every measure's calibrated path, and the classifier's tensors."""

    config: FamilyConfig
    tables: dict[str, dict]       # measure -> {"points": [...], "maps"?}
    classifier: dict[str, torch.Tensor]
    target: float
    delta: float
    tokens: int
    hidden: int
    metric: str = "classifier"

    def settings(self, metric: str | None = None, target: float | None = None) -> dict:
        """`runtime.early_exit`: the operating point of `metric` for `target` (by default the
        calibration's own), and that measure's path for per-request targets. Stored points
        carry what a request needs (points below an agreement bound of 0.5 are left out); the
        operating point keeps its per exit figures."""
        metric = metric or self.metric
        target = self.target if target is None else target
        points = self.tables[metric]["points"]
        chosen = operating_point(points, target) or points[0]
        kept = [{k: v for k, v in p.items() if k != "exits"} for p in points if p["lower_bound"] >= 0.5]
        settings = {"metric": metric, "target": target, "delta": self.delta, "tokens": self.tokens,
                    "thresholds": chosen["thresholds"], "leave": chosen["leave"], "operating_point": chosen,
                    "classifier": {"hidden": self.hidden}, "points": kept or points[:1]}
        if chosen.get("screen"):
            settings["screen"] = chosen["screen"]
        return settings

    def early_exit(self, metric: str | None = None, target: float | None = None) -> EarlyExit:
        """The settings as the engine uses them, without writing anything."""
        probe = FamilyConfig.from_dict({**self.config.to_dict(),
                                        "runtime": {"early_exit": self.settings(metric, target)}})
        return EarlyExit.from_config(probe, ExitClassifier(self.classifier))


def calibrate(model: FamilyModel, token_ids: np.ndarray, target: float = 0.95, metric: str = "classifier",
              delta: float = 0.05, seq_len: int = 128, max_tokens: int = 32768, batch_size: int = 8,
              hidden: int = 64) -> Calibration:
    """Fit every measure on half of `token_ids`, test its path on the other half, and choose
    the operating point of `metric` for `target` (see the module docstring)."""
    if metric not in MEASURES:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(MEASURES)}")
    if not checks.is_number(target) or not 0 < target <= 1:
        raise ValueError(f"target {target!r}: expected an agreement rate in (0, 1]")
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta!r}: expected a probability in (0, 1)")
    config = model.config
    if len(config.exits) < 2:
        raise ValueError("the family has no early exit to calibrate")
    windows = min(len(token_ids) // seq_len, max(2, max_tokens // seq_len))
    if windows < 2:
        raise ValueError(f"calibration data has {len(token_ids)} tokens, fewer than two windows of {seq_len}")
    ids = torch.as_tensor(np.asarray(token_ids[: windows * seq_len], dtype=np.int64)).view(windows, seq_len)
    if int(ids.max()) >= config.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"calibration data holds token id {int(ids.max())}, outside the vocabulary "
                         f"[0, {config.vocab_size})")
    model.eval()
    features = exit_features(model, ids, batch_size)
    tokens = torch.arange(windows * seq_len)
    fit = features.take(tokens[(tokens // seq_len) % 2 == 0])
    held = features.take(tokens[(tokens // seq_len) % 2 == 1])
    weights = train_classifier(fit, hidden)
    classifier = ExitClassifier(weights)
    probability = {part: {e: classifier.probability(e, f.states[e]) for e in config.exits[:-1]}
                   for part, f in (("fit", fit), ("held", held))}
    tables = {measure: _path(config, measure, fit, held, probability, delta) for measure in MEASURES}
    return Calibration(config, tables, weights, target, delta, windows * seq_len, hidden, metric)


def _path(config: FamilyConfig, measure: str, fit: Features, held: Features, probability: dict,
          delta: float) -> dict:
    early = config.exits[:-1]
    if measure == "classifier":
        maps = None
        fit_scores, held_scores = probability["fit"], probability["held"]
    else:
        maps = {e: fit_map(fit.scores[measure][e], fit.agree[e]) for e in early}
        fit_scores, held_scores = fit.scores[measure], held.scores[measure]
    saved = {e: config.num_hidden_layers - config.member_layers(e) for e in early}
    points = []
    for k in np.linspace(0.0, 1.0, STEPS):
        wanted = {e: 1 - k * saved[e] / saved[early[0]] for e in early}
        # Stored rounded: the runtime compares with exactly the numbers tested here.
        if maps is None:
            thresholds = {e: OFF if p >= 1 else round(max(p, 0.0), 6) for e, p in wanted.items()}
        else:
            thresholds = {e: round(raw_threshold(wanted[e], *maps[e]), 6) for e in early}
        screen = None
        if measure in SOFTMAX:
            screen = {}
            for e in early:
                accepted = probability["fit"][e][fit_scores[e] >= thresholds[e]]
                screen[e] = round(float(accepted.quantile(1 - SCREEN_RECALL)), 6) if len(accepted) else OFF
        # Exits whose checks do not pay are turned off, judged on the fit half (so the path
        # is fixed before the calibration half tests it).
        rule = paying(config, ExitRule(measure, thresholds, screen), fit_scores,
                      probability["fit"] if screen else None)
        exits, checked = leave_at(config, rule, held_scores, probability["held"] if screen else None)
        point = {"k": round(float(k), 4), "thresholds": {str(e): t for e, t in rule.thresholds.items()}}
        if screen is not None:
            point["screen"] = {str(e): s for e, s in screen.items()}
        point.update(describe(config, rule, exits, checked, held.agree, delta))
        points.append(point)
    table = {"points": points}
    if maps is not None:
        table["maps"] = {str(e): list(m) for e, m in maps.items()}
    return table


def write_early_exit(family_dir: str | Path, settings: dict, classifier: dict[str, torch.Tensor] | None = None) -> Path:
    """Store `settings` as runtime.early_exit in family.json (and the classifier's tensors in a
    file named by their hash, listed in family.json's checksums). Each file is replaced in one
    rename, the classifier first, so a reader or a crash sees the old settings or the new; a
    classifier file no longer named is removed last."""
    from safetensors.torch import save

    from familial.checkpoint_io import sha256_file

    family_dir = Path(family_dir)
    config = FamilyConfig.load(family_dir)
    checksums = FamilyConfig.load_checksums(family_dir)
    settings = dict(settings)
    entry = settings.get("classifier")
    if entry is not None and not isinstance(entry, dict):
        raise ConfigError(f"early_exit.classifier = {entry!r}: expected an object")
    # Without new tensors, the file the settings name (if any) stays.
    name = (entry or {}).get("file")
    if classifier is not None:
        data = save({k: v.contiguous() for k, v in classifier.items()})
        digest = hashlib.sha256(data).hexdigest()
        name = f"{CLASSIFIER_PREFIX}{digest[:16]}.safetensors"
        write_bytes_atomically(family_dir / name, data)
        if sha256_file(family_dir / name) != digest:
            raise ConfigError(f"{family_dir / name}: written but reads back differently")
        settings["classifier"] = {**settings.get("classifier", {}), "file": name}
        if checksums is not None:
            checksums[name] = digest
    elif name is not None and not (family_dir / name).is_file():
        raise ConfigError(f"early_exit.classifier names {name!r}, which is not in {family_dir}")
    elif entry is not None and name is None:
        del settings["classifier"]
    if checksums is not None:
        checksums = {k: v for k, v in checksums.items() if not k.startswith(CLASSIFIER_PREFIX) or k == name}
    config.runtime["early_exit"] = settings
    path = write_text_atomically(family_dir / FAMILY_CONFIG_NAME, config.to_json(checksums))
    for old in family_dir.glob(f"{CLASSIFIER_PREFIX}*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return path
