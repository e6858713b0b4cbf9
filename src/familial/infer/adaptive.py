"""Adaptive early exit: each token of each sequence stops at the first exit confident enough.

A decision measure gives every token a score at every early exit; the token leaves at the first
exit whose score reaches that exit's threshold (a threshold of 1 or more turns the exit off).
The measures are CALM's (Schuster et al. 2022, "Confident Adaptive Language Modeling"):
- "top1", "margin": softmax response at the exit (top-1 probability, or the gap between the two
  most likely tokens). They need the exit's branch and full-vocabulary head, so with a stored
  classifier they are computed only where its screen passes (`screen`, per exit): a token the
  classifier finds hopeless continues without running the branch.
- "saturation": cosine similarity of the token's trunk state entering this exit with its state
  entering the previous exit (the embedding, before the first): the state stopped moving.
- "classifier": a small MLP per exit on the trunk state entering the exit, trained by
  `familial calibrate` to predict agreement with the full member; the score is its probability.
The last two read the trunk state before the exit's branch runs, so a token that goes on pays
a few small operations per exit, not a decoder layer and a head.

Calibrated families keep, in `config.runtime["early_exit"]` (see familial.infer.calibrate):
    {"metric": "classifier", "thresholds": {"<exit>": 0.93, ...}, "screen": {...},
     "leave": {"<exit>": 0.31, ...}, "target": 0.95, "delta": 0.05, "classifier": {"file": ..., "hidden": 64},
     "points": [the measure's calibrated rules, conservative first], ...}
`thresholds` is the operating point for `target`; a request may ask for its own target, which
picks its point from `points`. Uncalibrated families use DEFAULT_THRESHOLD of "top1".
A request's depth budget (a cap on average depth as a fraction of the layers) caps each token's
exit whenever going deeper would lift the running average above the cap.

Sequences decoding together leave an exit together, when every one's token may leave there
(familial.infer.runner): a token that could leave beside one that cannot goes on to the exit
where the batch leaves. Every token that leaves early is one its measure lets leave there, at
an exit no earlier than alone; calibration describes a sequence alone. A calibrated rule also
knows, per exit, the share of tokens reaching it that leave there (`leave`); a batch of
several sequences checks an exit only when the chance that all of them leave (the product of
their shares), times the layers leaving would save, outweighs the check's own cost
(`check_cost`, in decoder layers). Eight sequences at a 30% exit all leave 1 time in 15,000:
checking costs more than it can save, so the batch runs like the full member.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from familial import checks
from familial.config import ConfigError, FamilyConfig

MEASURES = ("top1", "margin", "saturation", "classifier")
# A check's cost in decoder layers, where it runs no branch: a few small operations against a
# layer's ~25 (decoding is dispatch-bound). Measured inside batch-1 decoding of the demo family
# on CPU, where a layer costs ~0.3 ms and each operation finds caches cold: the classifier
# with the exit's bookkeeping ~0.09 ms, saturation ~0.03 ms. A softmax check adds its branch
# and head. Calibration turns off exits whose checks cost more than they save.
CHECK_COST = {"classifier": 0.3, "saturation": 0.1, "top1": 0.0, "margin": 0.0}
# Measures that need the exit's branch and head (the others read the trunk state).
SOFTMAX = ("top1", "margin")
DEFAULT_THRESHOLD = 0.9
UNCALIBRATED = (f"this family is not calibrated: adaptive exit uses the default rule (top-1 "
                f"probability >= {DEFAULT_THRESHOLD} at each early exit), which an uncalibrated "
                f"family seldom meets, so most tokens run the full member; run familial calibrate")
# The classifier's RMS norm epsilon.
CLASSIFIER_EPS = 1e-6
_SQRT_HALF = math.sqrt(0.5)
# Exits reach no score at or above this: a threshold here turns the exit off.
OFF = 1.0
WHERE = "family.json: runtime.early_exit"


def softmax_score(logits: torch.Tensor, measure: str) -> torch.Tensor:
    """(..., vocab) logits -> (...) top-1 probability or top-2 margin."""
    probs = torch.softmax(logits.float(), dim=-1)
    if measure == "top1":
        return probs.max(dim=-1).values
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def log_odds(probability: float) -> float:
    """The classifier output (log-odds) at which its probability reaches `probability`."""
    if probability <= 0:
        return -math.inf
    if probability >= 1:
        return math.inf
    return math.log(probability / (1 - probability))


def saturation(state: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """(n, H) trunk states at this exit and the previous one -> (n,) cosine similarity."""
    return F.cosine_similarity(state.float(), previous.float(), dim=-1)


class ExitClassifier:
    """Per early exit, an MLP (H -> hidden -> 1) on the RMS-normalised trunk state entering the
    exit; sigmoid of its output estimates P(the exit's token = the full member's)."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = {k: v.float() for k, v in weights.items()}
        self.exits = sorted({int(k.split(".")[0]) for k in weights})
        # Per exit, the weights as a lone CPU token's check reads them (see log_odds): w1 in
        # NumPy, b1 and w2 / 2 as lists of numbers, b2 a number.
        self._single = {e: (self.weights[f"{e}.hidden.weight"].numpy(), self.weights[f"{e}.hidden.bias"].tolist(),
                            (self.weights[f"{e}.out.weight"][0] / 2).tolist(), float(self.weights[f"{e}.out.bias"][0]))
                        for e in self.exits if all(k in self.weights for k in self.keys(e))
                        and self.weights[f"{e}.hidden.weight"].device.type == "cpu"}

    @staticmethod
    def keys(exit_layer: int) -> list[str]:
        return [f"{exit_layer}.{name}" for name in ("hidden.weight", "hidden.bias", "out.weight", "out.bias")]

    def logit(self, exit_layer: int, states: torch.Tensor) -> torch.Tensor:
        """(n, H) states -> (n,) log-odds of agreement."""
        w1, b1, w2, b2 = (self.weights[k] for k in self.keys(exit_layer))
        x = states.float()
        x = F.rms_norm(x, x.shape[-1:], eps=CLASSIFIER_EPS)
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)[..., 0]

    def log_odds(self, exit_layer: int, states: torch.Tensor) -> list[float]:
        """(n, H) states -> each one's log-odds of agreement, as numbers. A lone token on the CPU
        (batch-1 decoding) takes two NumPy products and a loop over the hidden units: inside
        a decoding step each library call finds its caches cold (~10 us), so these few cost
        a fraction of `logit`'s dozen torch kernels (the same function, its tail in float64)."""
        if states.shape[0] != 1 or exit_layer not in self._single or states.device.type != "cpu":
            return self.logit(exit_layer, states).tolist()
        w1, b1, half_w2, b2 = self._single[exit_layer]
        x = states[0].float().numpy()
        # rms_norm(x) @ w1.T: the norm is one number, applied after the product.
        scale = 1.0 / math.sqrt(float(x @ x) / x.shape[0] + CLASSIFIER_EPS)
        out = b2
        for h, b, w in zip((w1 @ x).tolist(), b1, half_w2):
            h = h * scale + b
            out += w * h * (1.0 + math.erf(h * _SQRT_HALF))
        return [out]

    def probability(self, exit_layer: int, states: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(exit_layer, states))

    def to(self, device: torch.device) -> ExitClassifier:
        return ExitClassifier({k: v.to(device) for k, v in self.weights.items()})

    def check(self, config: FamilyConfig, where: str) -> None:
        for e in config.exits[:-1]:
            missing = [k for k in self.keys(e) if k not in self.weights]
            if missing:
                raise ConfigError(f"{where}: tensor '{missing[0]}' is missing (the classifier of exit {e})")
            if self.weights[f"{e}.hidden.weight"].shape[1] != config.hidden_size:
                raise ConfigError(f"{where}: '{e}.hidden.weight' has shape "
                                  f"{list(self.weights[f'{e}.hidden.weight'].shape)}, expected "
                                  f"[hidden, {config.hidden_size}]")


@dataclass
class ExitRule:
    """One operating point: a measure and, per early exit, the score a token needs to leave
    there (>= OFF: never); `screen`, for softmax measures, the classifier probability a token
    needs before the exit's branch and head run at all."""

    measure: str
    thresholds: dict[int, float]
    screen: dict[int, float] | None = None
    # calibrated: per early exit, the share of tokens reaching it that leave there.
    leave: dict[int, float] | None = None

    def enabled(self, exit_layer: int) -> bool:
        return self.thresholds.get(exit_layer, OFF) < OFF

    def check_cost(self, config: FamilyConfig, exit_layer: int) -> float:
        """Decoder layers one check at `exit_layer` costs (a softmax check: the classifier
        screen, the exit's branch and its head, counted as a layer)."""
        if self.measure in SOFTMAX:
            screened = CHECK_COST["classifier"] if self.screen is not None else 0.0
            return screened + config.branch_depth(exit_layer) + 1
        return CHECK_COST[self.measure]

    @property
    def off(self) -> bool:
        return not any(t < OFF for t in self.thresholds.values())


def _numbers(raw, config: FamilyConfig, where: str) -> dict[int, float]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} = {raw!r}: expected an object exit -> number")
    early = config.exits[:-1]
    out = {}
    for key, value in raw.items():
        if not str(key).isdigit() or int(key) not in early:
            raise ConfigError(f"{where}: key {key!r} is not an early exit {early}")
        if not checks.is_number(value):
            raise ConfigError(f"{where}[{key}] = {value!r}: expected a number")
        out[int(key)] = float(value)
    return out


def uncalibrated_note(config: FamilyConfig) -> str | None:
    """What `auto` (without a budget) runs on a family `familial calibrate` has not seen."""
    return None if config.runtime.get("early_exit") else UNCALIBRATED


def _points(points, config: FamilyConfig) -> list[dict]:
    """The calibrated operating points of `runtime.early_exit.points`, checked."""
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError(f"{WHERE}.points: expected a list of calibrated rules")
    for point in points:
        _numbers(point.get("thresholds"), config, f"{WHERE}.points[].thresholds")
        for key in ("screen", "leave"):
            if point.get(key) is not None:
                _numbers(point[key], config, f"{WHERE}.points[].{key}")
        if isinstance(point.get("lower_bound"), bool) or not isinstance(point.get("lower_bound"), (int, float)):
            raise ConfigError(f"{WHERE}.points[]: no numeric 'lower_bound'")
    return points


def _check_no_classifier(settings: dict, metric: str, screen) -> None:
    """Settings that need the exit classifier, when none was loaded with them."""
    if (metric == "classifier" or screen) and settings.get("classifier"):
        file = settings["classifier"].get("file") if isinstance(settings["classifier"], dict) else None
        raise ConfigError(f"{WHERE} uses the exit classifier in {file!r}: load it with the family "
                          f"directory (Engine.from_checkpoint, or EarlyExit.load)")
    if metric == "classifier":
        raise ConfigError(f"{WHERE}.metric = 'classifier' but no classifier is stored "
                          f"(run familial calibrate)")


@dataclass
class EarlyExit:
    """A family's early-exit settings: the default rule, the calibrated operating points per
    measure (for per-request targets), and the classifier when one was trained."""

    rule: ExitRule
    target: float | None = None
    points: list[dict] = field(default_factory=list)
    classifier: ExitClassifier | None = None

    @classmethod
    def from_config(cls, config: FamilyConfig, classifier: ExitClassifier | None = None) -> EarlyExit:
        settings = config.runtime.get("early_exit") or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{WHERE} = {settings!r}: expected an object")
        metric = settings.get("metric", "top1")
        if metric not in MEASURES:
            raise ConfigError(f"{WHERE}.metric = {metric!r}: expected one of {', '.join(MEASURES)}")
        thresholds = {e: DEFAULT_THRESHOLD for e in config.exits[:-1]}
        thresholds.update(_numbers(settings.get("thresholds", {}), config, f"{WHERE}.thresholds"))
        screen = settings.get("screen")
        screen = None if screen is None else _numbers(screen, config, f"{WHERE}.screen")
        points = _points(settings.get("points", []), config)
        if classifier is None:
            _check_no_classifier(settings, metric, screen)
        leave = settings.get("leave")
        leave = None if leave is None else _numbers(leave, config, f"{WHERE}.leave")
        target = settings.get("target")
        return cls(ExitRule(metric, thresholds, screen if classifier is not None else None, leave),
                   target if isinstance(target, (int, float)) else None, points, classifier)

    @classmethod
    def load(cls, family_dir: str | Path, config: FamilyConfig | None = None) -> EarlyExit:
        """The settings of a family checkpoint, with its classifier file when it names one."""
        family_dir = Path(family_dir)
        config = config or FamilyConfig.load(family_dir)
        entry = (config.runtime.get("early_exit") or {}).get("classifier") \
            if isinstance(config.runtime.get("early_exit"), dict) else None
        classifier = None
        if entry is not None:
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                    or Path(entry["file"]).name != entry["file"]:
                raise ConfigError(f"{WHERE}.classifier = {entry!r}: expected {{\"file\": NAME}} naming a "
                                  f"file in {family_dir}")
            path = family_dir / entry["file"]
            if not path.is_file():
                raise ConfigError(f"{path}: named by {WHERE}.classifier but missing")
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                weights = load_file(path)
            except (SafetensorError, OSError, ValueError) as error:
                raise ConfigError(f"{path}: not a readable safetensors file ({error})") from None
            classifier = ExitClassifier(weights)
            classifier.check(config, str(path))
        return cls.from_config(config, classifier)

    def for_target(self, target: float) -> ExitRule:
        """The most aggressive calibrated point of the default measure whose agreement lower
        bound, and every more conservative point's, reaches `target` (fixed-sequence testing,
        so the calibration's guarantee holds); exits off when none does."""
        measure = self.rule.measure
        if not self.points:
            raise ValueError(f"target {target}: this family has no calibrated operating points "
                             f"(run familial calibrate)")
        chosen = operating_point(self.points, target)
        if chosen is None:
            return ExitRule(measure, {e: OFF for e in self.rule.thresholds})
        thresholds = {int(e): float(t) for e, t in chosen["thresholds"].items()}
        screen = chosen.get("screen")
        screen = {int(e): float(s) for e, s in screen.items()} if screen and self.classifier else None
        leave = chosen.get("leave")
        leave = {int(e): float(r) for e, r in leave.items()} if leave else None
        return ExitRule(measure, thresholds, screen, leave)


def operating_point(points: list[dict], target: float) -> dict | None:
    """Fixed-sequence testing along a calibrated path (conservative first): the last point of
    the run from the first whose agreement lower bounds all reach `target`; None if the first
    does not."""
    chosen = None
    for point in points:
        if point["lower_bound"] < target:
            break
        chosen = point
    return chosen


class AdaptiveState:
    """One sequence's early-exit rule, running depth (for a budget) and KV bookkeeping."""

    def __init__(self, config: FamilyConfig, rule: ExitRule, member: int, budget: float | None = None,
                 recompute: bool = True) -> None:
        if budget is not None and (not checks.is_number(budget) or not 0 < budget <= 1):
            raise ValueError(f"budget = {budget!r}: expected a fraction of the layers in (0, 1]")
        self.config, self.rule, self.member, self.budget = config, rule, member, budget
        self.depth_sum = 0
        self.tokens = 0
        # First position lacking each early exit's branch KV (see familial.infer.runner); a
        # member that is not the full one has a branch of its own, filled the same way.
        self.branch_from = {e: 0 for e in config.exits[:-1] if e <= member}
        # recompute: (first position, frontier exit) of positions whose KV stops at that exit,
        # oldest first, frontiers non-increasing; None when skipped layers' KV is copied.
        self.pending: list[tuple[int, int]] | None = [] if recompute else None

    def cap(self) -> int:
        """The deepest exit this token may reach: the member, or the first exit past which the
        budget would be exceeded."""
        exits = [e for e in self.config.exits if e <= self.member]
        if self.budget is None:
            return self.member
        cap = self.budget * self.config.num_hidden_layers
        for exit_layer, deeper in zip(exits, exits[1:]):
            if (self.depth_sum + self.config.member_layers(deeper)) / (self.tokens + 1) > cap:
                return exit_layer
        return self.member

    def record(self, exit_layer: int) -> None:
        self.depth_sum += self.config.member_layers(exit_layer)
        self.tokens += 1

    def advance(self, position: int, exit_layer: int, branches: set[int]) -> None:
        """Bookkeeping after the token at `position` left at `exit_layer`, having run `branches`
        over every position up to its own."""
        for e in branches:
            self.branch_from[e] = position + 1
        if self.pending is None:
            return
        if exit_layer == self.member:
            self.pending = []
            return
        # Pending positions behind `exit_layer` rode along up to it (familial.infer.runner).
        pending = [(p, max(f, exit_layer)) for p, f in self.pending] + [(position, exit_layer)]
        self.pending = [g for i, g in enumerate(pending) if i == 0 or g[1] != pending[i - 1][1]]
