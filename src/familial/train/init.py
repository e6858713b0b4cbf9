"""Where a run's weights come from, and how each process gets only its part of them.

Every layout builds the family on the meta device (no memory), lays it out (pipeline
stages, tensor parallel, FSDP) and only then allocates, so a process allocates its own
shards and nothing else. `fill` then writes each local shard from a `WeightSource`, which
produces any rectangular region of any parameter without producing the rest:

- `RandomInit`: normal(0, initializer_range) matrices, ones for norms, zeros for biases,
  drawn in row blocks from generators seeded by (seed, parameter name, block), so the values
  do not depend on the layout: a 4-process run starts from the single-process weights;
- `CheckpointWeights`: a family checkpoint, or a dense HF Qwen3 / Ruyi2 checkpoint read in
  place through the import's name mapping (no imported copy is written). Only the region's
  rows are read from disk.

Parameters are float32 master weights whatever the checkpoint stores (a bf16 checkpoint is
upcast), so updates below bf16 resolution are never lost.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from familial.checkpoint_io import (
    SafetensorsReader,
    check_family_tensors,
    family_parameter_names,
    plan_import,
    read_import_config,
)
from familial.config import ConfigError, FamilyConfig
from familial.data import open_shards
from familial.data.provenance import (
    TokenizerMismatch,
    check_shards,
    family_tokenizer,
    tokenizer_record,
)
from familial.model import FamilyModel, RotaryEmbedding
from familial.train.config import InitConfig, StageConfig

Region = tuple[slice, ...]
# Elements per independently seeded block of a random matrix (whole rows).
RANDOM_BLOCK = 1 << 20


class WeightSource(Protocol):
    config: FamilyConfig

    def read(self, name: str, region: Region, out: torch.Tensor) -> None:
        """Write parameter `name`[region] into `out` (shaped like the region)."""


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RandomInit:
    """The family's initialisation (as FamilyModel's), drawn per (name, row block)."""

    def __init__(self, config: FamilyConfig, seed: int) -> None:
        self.config, self.seed = config, seed
        self.shapes = family_parameter_names(config)

    def read(self, name: str, region: Region, out: torch.Tensor) -> None:
        shape = self.shapes[name]
        if name.endswith(".bias"):
            out.zero_()
            return
        if len(shape) < 2:  # RMSNorm weights
            out.fill_(1.0)
            return
        per_row = math.prod(shape[1:])
        block = max(1, RANDOM_BLOCK // per_row)
        rows = region[0]
        for index in range(rows.start // block, -(-rows.stop // block)):
            first, last = index * block, min((index + 1) * block, shape[0])
            generator = torch.Generator().manual_seed(_block_seed(self.seed, name, index))
            values = torch.empty(last - first, *shape[1:]).normal_(0.0, self.config.initializer_range,
                                                                   generator=generator)
            lo, hi = max(first, rows.start), min(last, rows.stop)
            out[lo - rows.start:hi - rows.start].copy_(values[(slice(lo - first, hi - first), *region[1:])])


class CheckpointWeights:
    """Family parameters read from safetensors files under a {family name: file key} map."""

    def __init__(self, config: FamilyConfig, directory: Path, keys: dict[str, str]) -> None:
        self.config, self.directory, self.keys = config, directory, keys
        self.reader = SafetensorsReader(directory)

    def read(self, name: str, region: Region, out: torch.Tensor) -> None:
        self.reader.read_region(self.keys[name], region, out)

    def close(self) -> None:
        self.reader.close()


class ModelWeights:
    """An in-memory family's parameters as a weight source (e.g. to start a parallel run from it)."""

    def __init__(self, model: FamilyModel) -> None:
        self.config, self.model = model.config, model

    def read(self, name: str, region: Region, out: torch.Tensor) -> None:
        out.copy_(self.model.get_parameter(name)[region])


def family_weights(directory: str | Path) -> CheckpointWeights:
    """A family checkpoint as a weight source (its tensors checked against family.json)."""
    directory = Path(directory)
    config = FamilyConfig.load(directory)
    source = CheckpointWeights(config, directory, {})
    source.keys = {name: name for name in check_family_tensors(directory, config, source.reader)}
    return source


def hf_weights(init: InitConfig) -> CheckpointWeights:
    """A dense HF Qwen3 (or Ruyi2) checkpoint read in place as a family with `init.exits`."""
    directory = Path(init.hf)
    config, model_type = read_import_config(directory, init.exits, init.branch_layers, init.shared_head,
                                            init.member_names)
    source = CheckpointWeights(config, directory, {})
    source.keys = plan_import(directory, source.reader, config, model_type)
    return source


def tokenizer_source(init: InitConfig) -> str | None:
    """Where the tokenizer files every saved family carries come from."""
    return init.tokenizer or init.family or init.hf


def run_tokenizer(init: InitConfig, stages: list[StageConfig]) -> str | None:
    """The tokenizer the run's families carry, checked against every source's shards.

    `init.tokenizer`, else the tokenizer of the family or HF checkpoint started from, must be
    the one the shards were tokenised with. With neither, the run takes the tokenizer the
    shards record, if it is still there unchanged, and refuses otherwise: a family saved with
    no tokenizer, or another one, would be silently unusable.
    """
    if init.tokenizer is not None:
        run = tokenizer_record(init.tokenizer)
        if run is None:
            raise ConfigError(f"train config: field 'init.tokenizer' = {init.tokenizer!r}: no "
                              f"tokenizer.json there (pass --init.tokenizer with the shards' "
                              f"tokenizer: a tokenizer.json or a directory holding one)")
        role = "init.tokenizer"
    elif init.family is not None:
        run, role = family_tokenizer(init.family), f"the tokenizer of init.family {init.family}"
    elif init.hf is not None:
        run, role = tokenizer_record(Path(init.hf)), f"the tokenizer of init.hf {init.hf}"
    else:
        run, role = None, ""
    paths = dict.fromkeys(source.path for stage in stages for source in stage.data.sources)
    recorded = {}
    for path in paths:
        shards = open_shards(path)
        found = check_shards(shards, run, role, fix="prepare the shards with that tokenizer, or "
                                                    "pass --init.tokenizer with the shards' own")
        if found is not None:
            recorded.setdefault(found.sha256, (path, found))
    if run is not None:
        return tokenizer_source(init)
    if len(recorded) > 1:
        (first, a), (second, b) = list(recorded.values())[:2]
        raise TokenizerMismatch(f"{second}: tokenised with {b}, but {first} with {a}; the "
                                f"sources of one run must share a tokenizer")
    if not recorded:
        return None
    path, found = next(iter(recorded.values()))
    there = tokenizer_record(found.where)
    if there is None or there.sha256 != found.sha256:
        now = "is not there" if there is None else f"now has sha256 {there.sha256[:12]}"
        raise ConfigError(f"{path}: tokenised with {found}, which {now}; pass --init.tokenizer "
                          f"with the shards' tokenizer, so that the saved family carries it")
    return found.where


def weight_source(init: InitConfig, seed: int) -> WeightSource:
    """The source `[init]` names: a family checkpoint, an HF checkpoint, or a random model."""
    if init.family is not None:
        return family_weights(init.family)
    if init.hf is not None:
        return hf_weights(init)
    config = FamilyConfig.from_dict(init.model.to_dict(), where="init.model")
    return RandomInit(config, seed)


def meta_family(config: FamilyConfig) -> FamilyModel:
    """The family's structure with no storage (parameters on the meta device)."""
    with torch.device("meta"):
        return FamilyModel(FamilyConfig.from_dict(config.to_dict()))


def materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate a meta-built module's (local) parameters and buffers on `device`, in float32."""
    module.to_empty(device=device)
    for child in module.modules():
        if isinstance(child, RotaryEmbedding):
            child.reset()


def local_region(parameter: torch.Tensor) -> tuple[torch.Tensor, Region]:
    """This process's part of a parameter (a view to write into) and where it lies in the whole."""
    if not isinstance(parameter, DTensor):
        return parameter, tuple(slice(0, size) for size in parameter.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(parameter.shape, parameter.device_mesh,
                                                          parameter.placements)
    local = parameter.to_local()
    if tuple(local.shape) != tuple(shape):
        raise RuntimeError(f"local shard of shape {tuple(local.shape)}, expected {tuple(shape)}")
    return local, tuple(slice(o, o + s) for o, s in zip(offset, shape))


@torch.no_grad()
def fill(modules: list[nn.Module], source: WeightSource) -> None:
    """Write every local parameter shard of `modules` (family names) from `source`."""
    for module in modules:
        for name, parameter in module.named_parameters():
            local, region = local_region(parameter)
            if local.numel():
                source.read(name, region, local)
