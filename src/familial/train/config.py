"""The training config: typed dataclasses loaded from TOML with `--key.sub value` overrides.

A config without `[[stages]]` is one stage made of the top-level `steps`, `data`, `lr`,
`freeze` and `loss`; each `[[stages]]` entry may override any of those and inherits the rest.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from familial import checks
from familial.config import ConfigError, FamilyConfig, from_dict


@dataclass
class WeightSchedule:
    # constant: `value`; linear/cosine: `start` -> `end` over [start_step, end_step];
    # warm_decay: `start` held until start_step, then geometric decay to `end` at end_step.
    # Steps count from the start of the stage.
    kind: Literal["constant", "linear", "cosine", "warm_decay"] = "constant"
    value: float = 1.0
    start: float = 1.0
    end: float = 1.0
    start_step: int = 0
    end_step: int = 0


@dataclass
class LossConfig:
    # lambda_k per exit, keyed by exit index or alias; a number is a constant weight.
    lambdas: dict[str, float | WeightSchedule] = field(default_factory=dict)
    # weight of exits missing from `lambdas`.
    default_lambda: float = 1.0
    # self-distillation weight per shallower exit (KL from the deepest exit); none if absent.
    distill: dict[str, float | WeightSchedule] = field(default_factory=dict)
    # tokens per head chunk: bounds the (chunk, vocab) logits held at any time.
    chunk_size: int = 1024

    def validate(self, where: str, prefix: str = "") -> None:
        checks.positive_int(checks.field(where, f"{prefix}loss.chunk_size"), self.chunk_size, error=ConfigError)


@dataclass
class LRConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 0
    # cosine: warmup then cosine to min_lr; wsd: warmup, stable, decay; constant.
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    # wsd: share of the stage's steps spent decaying, and the decay's shape.
    decay_fraction: float = 0.2
    decay_shape: Literal["cosine", "linear"] = "linear"

    def validate(self, where: str, prefix: str = "") -> None:
        def name(key: str) -> str:
            return checks.field(where, f"{prefix}lr.{key}")

        checks.finite_number(name("min_lr"), self.min_lr, f"between 0 and lr ({self.lr})", minimum=0,
                             maximum=self.lr, error=ConfigError)
        checks.non_negative_int(name("warmup_steps"), self.warmup_steps, error=ConfigError)
        checks.probability(name("decay_fraction"), self.decay_fraction, error=ConfigError)


@dataclass
class OptimConfig:
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # max global gradient norm; 0 disables clipping.
    grad_clip: float = 1.0


@dataclass
class SourceConfig:
    # a token shards directory written by `familial data prepare`, or the path prefix of a
    # Megatron indexed dataset (PREFIX.bin + PREFIX.idx), read as it is.
    path: str
    # sampling weight in the mixture (normalised over sources).
    weight: float = 1.0
    # stream: windows of the token stream (pre-training); documents: whole documents per
    # row, padded (SFT); auto: documents when the shards carry a loss mask.
    packing: Literal["auto", "stream", "documents"] = "auto"


@dataclass
class DataConfig:
    sources: list[SourceConfig]
    seq_len: int = 256
    # sequences per micro-batch, and micro-batches per optimizer step.
    batch_size: int = 8
    grad_accum: int = 1

    def validate(self, where: str, prefix: str = "") -> None:
        def name(key: str) -> str:
            return checks.field(where, f"{prefix}data.{key}")

        checks.require(bool(self.sources), name("sources"), self.sources,
                       "expected at least one token shards directory", error=ConfigError)
        for j, source in enumerate(self.sources):
            checks.positive_number(name(f"sources[{j}].weight"), source.weight, error=ConfigError)
        for key in ("seq_len", "batch_size", "grad_accum"):
            checks.positive_int(name(key), getattr(self, key), error=ConfigError)


@dataclass
class StageConfig:
    steps: int
    name: str = ""
    # None: inherit the top-level value.
    data: DataConfig | None = None
    lr: LRConfig | None = None
    loss: LossConfig | None = None
    # parameter-name patterns (fnmatch, or "re:" + regex) kept frozen in this stage.
    freeze: list[str] | None = None

    def validate(self, where: str, prefix: str = "") -> None:
        """A resolved stage (`TrainConfig.resolved_stages`): every inherited table is filled in."""
        checks.positive_int(checks.field(where, f"{prefix}steps"), self.steps, "a positive number of steps",
                            error=ConfigError)
        checks.require(self.data is not None, checks.field(where, f"{prefix}data"), None,
                       "no data: give a [data] table", error=ConfigError)
        self.data.validate(where, prefix)
        self.lr.validate(where, prefix)
        self.loss.validate(where, prefix)


@dataclass
class InitConfig:
    # exactly one of: an existing family checkpoint, a dense HF Qwen3 checkpoint to import
    # with `exits`, or `model` (a FamilyConfig table) for random initialisation.
    family: str | None = None
    hf: str | None = None
    exits: list[int] | None = None
    branch_layers: int = 1
    shared_head: bool = False
    member_names: dict[str, int] = field(default_factory=dict)
    model: FamilyConfig | None = None
    # tokenizer files copied into every saved family checkpoint (so exports are usable).
    tokenizer: str | None = None

    def validate(self, where: str) -> None:
        sources = [n for n in ("family", "hf", "model") if getattr(self, n) is not None]
        checks.require(len(sources) == 1, checks.field(where, "init"), sources,
                       "set exactly one of init.family, init.hf, init.model", error=ConfigError)
        checks.require(self.hf is None or bool(self.exits), checks.field(where, "init.exits"), self.exits,
                       "importing a dense checkpoint needs exits", error=ConfigError)


@dataclass
class CheckpointConfig:
    # save every N optimizer steps (0: only at the end of each stage), keeping the newest `keep`
    # checkpoints of either kind (step-N of one process, dcp-N of a parallel run).
    every: int = 0
    keep: int = 2
    # parallel runs: write distributed checkpoints in a background thread while training goes on
    # (a save is published only once complete; one process always saves synchronously).
    async_save: bool = False

    def validate(self, where: str) -> None:
        checks.non_negative_int(checks.field(where, "checkpoint.every"), self.every, error=ConfigError)
        checks.positive_int(checks.field(where, "checkpoint.keep"), self.keep, error=ConfigError)


@dataclass
class LogConfig:
    every: int = 1
    tensorboard: bool = True
    progress: bool = True

    def validate(self, where: str) -> None:
        checks.positive_int(checks.field(where, "log.every"), self.every, error=ConfigError)


# Mesh dimensions, outermost first: pipeline stages exchange least, tensor-parallel ranks most.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class ParallelConfig:
    """Ranks per mesh dimension, outermost first; their product is the world size.

    One process is the 1 x 1 x 1 x 1 mesh. `dp_shard = -1` takes the ranks the other
    dimensions leave, so a plain `torchrun --nproc-per-node N` run is FSDP over N ranks.
    """

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp_schedule: Literal["1F1B", "GPipe", "Interleaved1F1B"] = "1F1B"
    # pipeline micro-batches per accumulation micro-batch; default: the number of stages.
    microbatches: int | None = None
    # shard the residual stream along the sequence between tensor-parallel blocks.
    sequence_parallel: bool = False
    # explicit pipeline stage boundaries [0, ..., L]; default: balanced by cost.
    stage_boundaries: list[int] | None = None
    # with pp > 1 and FSDP: free each layer's gathered weights after its forward and its
    # backward in every micro-batch (two all-gathers per layer per micro-batch) instead of
    # keeping the stage gathered for the whole step (one all-gather per layer per step).
    pp_reshard: bool = False

    def validate(self, where: str | None = None) -> None:
        """Each field on its own; `where` (a file, "train config") prefixes the field's name."""
        def name(key: str) -> str:
            return _parallel_name(where, key)

        for key in ("dp_replicate", "tp", "pp"):
            checks.integer(name(key), getattr(self, key), "an integer >= 1", minimum=1, error=ConfigError)
        checks.require(checks.is_integer(self.dp_shard) and (self.dp_shard >= 1 or self.dp_shard == -1),
                       name("dp_shard"), self.dp_shard, "expected an integer >= 1, or -1 for the ranks left over",
                       error=ConfigError)
        if self.microbatches is not None:
            checks.positive_int(name("microbatches"), self.microbatches, error=ConfigError)
        checks.require(not self.sequence_parallel or self.tp > 1, name("sequence_parallel"),
                       self.sequence_parallel, "needs tp > 1", error=ConfigError)

    def resolve(self, world_size: int, where: str | None = None) -> ParallelConfig:
        """A copy with dp_shard filled in, checked against the world size."""
        self.validate(where)
        if world_size == 1:
            for key, ranks in self.dims().items():
                checks.require(ranks in (1, -1), _parallel_name(where, key), ranks,
                               "one process runs the 1 x 1 x 1 x 1 mesh: launch with torchrun "
                               "--nproc-per-node N (N = pp x dp_replicate x dp_shard x tp) for more",
                               error=ConfigError)
        fixed = self.dp_replicate * self.tp * self.pp
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise ConfigError(f"world size {world_size} is not divisible by dp_replicate*tp*pp = {fixed}")
            dp_shard = world_size // fixed
        if dp_shard * fixed != world_size:
            raise ConfigError(f"parallel config pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard="
                              f"{dp_shard} x tp={self.tp} needs {dp_shard * fixed} ranks, but the world size "
                              f"is {world_size}")
        return dataclasses.replace(self, dp_shard=dp_shard)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def dims(self) -> dict[str, int]:
        """Ranks per named mesh dimension, outermost first (the DeviceMesh's order)."""
        return {name: getattr(self, name) for name in MESH_DIMS}

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Parameters sharded or replicated by FSDP2 (any data-parallel dimension)."""
        return self.dp > 1


def _parallel_name(where: str | None, key: str) -> str:
    """A parallel field's name: within a file or config where one is given, else on its own."""
    return checks.field(where, f"parallel.{key}") if where else f"parallel.{key}"


@dataclass
class TrainConfig:
    init: InitConfig
    run_dir: str = "runs/train"
    data: DataConfig | None = None
    steps: int = 0
    lr: LRConfig = field(default_factory=LRConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    freeze: list[str] = field(default_factory=list)
    stages: list[StageConfig] = field(default_factory=list)
    seed: int = 0
    # compute dtype; master weights, gradients reductions and optimizer state are always float32.
    # auto: bf16 on CUDA, fp32 on CPU. Applied by FSDP2's MixedPrecisionPolicy where parameters
    # are sharded over data-parallel ranks, by autocast where they are not.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # per decoder block: none; full (recompute the block in backward); selective (keep matmul
    # and attention outputs, recompute norms, activations and rotary).
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # torch.compile each decoder block (trunk and branches), in every layout.
    compile: bool = False
    # auto: one GPU per local rank when CUDA exists, else cpu; or "cpu", "cuda", "cuda:N".
    device: str = "auto"
    # consecutive non-finite steps (skipped) before the run aborts.
    max_bad_steps: int = 5
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def resolved_stages(self) -> list[StageConfig]:
        """Stages with every inherited field filled in."""
        stages = self.stages or [StageConfig(steps=self.steps, name="main")]
        out = []
        for i, stage in enumerate(stages):
            out.append(StageConfig(
                steps=stage.steps, name=stage.name or f"stage-{i}",
                data=stage.data or self.data, lr=stage.lr or self.lr,
                loss=stage.loss or self.loss,
                freeze=self.freeze if stage.freeze is None else stage.freeze))
        return out

    def validate(self, where: str = "train config") -> None:
        """Each table validates its own fields; the stages are checked as they resolve."""
        self.init.validate(where)
        checks.require(not (self.stages and self.steps), checks.field(where, "steps"), self.steps,
                       "with [[stages]], give steps per stage instead", error=ConfigError)
        checks.positive_int(checks.field(where, "max_bad_steps"), self.max_bad_steps, error=ConfigError)
        self.log.validate(where)
        self.checkpoint.validate(where)
        checks.require(self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device) is not None,
                       checks.field(where, "device"), self.device, "expected auto, cpu, cuda or cuda:N",
                       error=ConfigError)
        self.parallel.resolve(int(os.environ.get("WORLD_SIZE", "1")), where)
        for i, stage in enumerate(self.resolved_stages()):
            stage.validate(where, f"stages[{i}]." if self.stages else "")

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))


def _drop_none(value: Any) -> Any:
    # TOML has no null; an absent key means the default, which is what None stands for.
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML file (or a dict), apply `--key.sub value` overrides, type-check, validate."""
    where = "train config"
    if path is not None:
        where, data = str(path), read_toml(path, "a TOML training config")
    data = copy.deepcopy(data or {})
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    config = from_dict(TrainConfig, data, where)
    config.validate(where)
    return config


def read_toml(path: str | Path, expected: str) -> dict[str, Any]:
    """A config file's TOML table, or a one-line ConfigError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {error.start}); expected "
                          f"{expected}") from None


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """['--lr.lr', '1e-3', '--seed=3'] -> [('lr.lr', '1e-3'), ('seed', '3')]."""
    out, i = [], 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) == 2:
            raise ConfigError(f"override {item!r}: expected --key.sub VALUE")
        key = item[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(items):
            value, i = items[i + 1], i + 2
        else:
            raise ConfigError(f"override {item!r}: missing a value")
        out.append((key.replace("-", "_"), value))
    return out


def set_dotted(data: dict[str, Any], key: str, text: str, root: Any = None) -> None:
    """Set `key` (dotted) in `data` to `text` parsed as the field's type in `root` (TrainConfig)."""
    parts = key.split(".")
    hint: Any = root or TrainConfig
    node: Any = data
    for depth, part in enumerate(parts):
        hint = _child_hint(hint, part, key)
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override --{key}: no list entry {part!r}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override --{key}: '{parts[depth - 1]}' is not a table")
        if last:
            node[part] = _parse_value(text, hint)
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


def _child_hint(hint: Any, part: str, key: str) -> Any:
    # list[X] / dict[K, X]: an entry of the container; X | None: each member of the union.
    if typing.get_origin(hint) in (list, dict):
        return typing.get_args(hint)[-1]
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    for option in options:
        if dataclasses.is_dataclass(option):
            hints = typing.get_type_hints(option)
            if part not in hints:
                raise ConfigError(f"override --{key}: unknown field {part!r}; known fields: "
                                  f"{', '.join(sorted(hints))}")
            return hints[part]
        origin = typing.get_origin(option)
        if origin in (list, dict):
            return typing.get_args(option)[-1]
    return Any


def _parse_value(text: str, hint: Any) -> Any:
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if options == [str]:
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def save_resolved(config: TrainConfig, run_dir: Path) -> Path:
    """The run's config with every default filled in, as JSON (the run dir keeps it)."""
    path = run_dir / "config.resolved.json"
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    temp.replace(path)
    return path
