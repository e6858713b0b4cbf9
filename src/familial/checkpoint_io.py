"""Reading and writing checkpoints: family save/load, HF (Qwen3, Llama) and Ruyi2 import,
member export.

Everything is safetensors. Large checkpoints are planned from file headers and written shard
by shard, each tensor read lazily from its source file, so nothing is held twice. Every
write stages its whole output beside the target and renames it into place once
(familial.staging): a failure leaves no half-written checkpoint. family.json lists the
sha256 of every tensor file; every load checks each tensor's name, shape and dtype against
the configuration, and `verify` (or `load_family(..., verify=True)`) checks the hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from familial.config import FAMILY_CONFIG_NAME, ConfigError, FamilyConfig, read_json
from familial.model import FamilyModel, RotaryEmbedding
from familial.staging import atomic_directory, file_mode

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")
DEFAULT_SHARD_BYTES = 5 * 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors dtype names the model can compute in; integer or float8 weights are refused.
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
# safetensors dtypes a weight may be stored in, and the size of one positioned read.
READ_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
READ_BLOCK_BYTES = 16 * 2**20


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, malformed, or does not match its configuration."""


# Reading tensors lazily.

@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: a safetensors file and the key inside it."""

    file: Path
    key: str


class SafetensorsReader:
    """Lazy access to a checkpoint directory's tensors (single file or sharded with an index)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.refs: dict[str, TensorRef] = {}
        index = self.directory / INDEX_NAME
        single = self.directory / WEIGHTS_NAME
        if index.exists():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.directory / name).exists():
                    raise CheckpointError(f"{index}: shard '{name}' is listed but missing from "
                                          f"{self.directory}")
            for name in files:
                self._scan(self.directory / name)
            missing = sorted(set(weight_map) - set(self.refs))
            if missing:
                raise CheckpointError(f"{index}: tensors {missing[:5]} are listed but not in their shards")
        elif single.exists():
            self._scan(single)
        else:
            raise CheckpointError(f"{self.directory}: no {WEIGHTS_NAME} or {INDEX_NAME} found")
        self._handles: dict[Path, object] = {}
        self._layouts: dict[Path, dict] = {}
        self._stack = contextlib.ExitStack()

    def _scan(self, path: Path) -> None:
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    self.refs[key] = TensorRef(path, key)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None

    def keys(self) -> list[str]:
        return list(self.refs)

    def __contains__(self, key: str) -> bool:
        return key in self.refs

    def shape_and_dtype(self, key: str) -> tuple[list[int], str]:
        ref = self.refs[key]
        handle = self._open(ref.file)
        sliced = handle.get_slice(key)
        return list(sliced.get_shape()), sliced.get_dtype()

    def get(self, key: str) -> torch.Tensor:
        if key not in self.refs:
            raise CheckpointError(f"{self.directory}: tensor '{key}' is missing")
        ref = self.refs[key]
        try:
            return self._open(ref.file).get_tensor(key)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{ref.file}: cannot read tensor '{key}' ({error})") from None

    def read_region(self, key: str, region: tuple[slice, ...], out: torch.Tensor) -> None:
        """Copy `key`[region] into `out` (converting the dtype), reading only the region's rows.

        Plain positioned reads, block by block, rather than a memory map: a process loading
        its shard of a large tensor never holds (or maps) more than one block beyond it.
        """
        ref = self.refs[key]
        dtype_name, shape, begin = self._layout(ref.file)[key]
        if dtype_name not in READ_DTYPES:
            raise CheckpointError(f"{ref.file}: tensor '{key}' has dtype {dtype_name}; weights must be floating point")
        dtype = READ_DTYPES[dtype_name]
        rows = region[0] if shape else slice(0, 1)
        row_shape = shape[1:]
        row_bytes = _numel(row_shape) * _dtype_bytes(dtype_name)
        block = max(1, READ_BLOCK_BYTES // max(row_bytes, 1))
        rest = (slice(None),) + tuple(region[1:])
        with open(ref.file, "rb", buffering=0) as handle:
            for first in range(rows.start, rows.stop, block):
                last = min(first + block, rows.stop)
                data = bytearray((last - first) * row_bytes)
                handle.seek(begin + first * row_bytes)
                if handle.readinto(data) != len(data):
                    raise CheckpointError(f"{ref.file}: tensor '{key}' is truncated")
                values = torch.frombuffer(data, dtype=dtype).reshape(last - first, *row_shape)
                if not shape:
                    out.copy_(values.reshape(()))
                    return
                out[first - rows.start:last - rows.start].copy_(values[rest])

    def _layout(self, path: Path) -> dict[str, tuple[str, list[int], int]]:
        """key -> (dtype, shape, absolute byte offset of its data) from a file's header."""
        if path not in self._layouts:
            with open(path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length))
            self._layouts[path] = {key: (entry["dtype"], list(entry["shape"]), 8 + length + entry["data_offsets"][0])
                                   for key, entry in header.items() if key != "__metadata__"}
        return self._layouts[path]

    def _open(self, path: Path):
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._handles[path]

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Writing.

TensorPlan = dict[str, Callable[[], torch.Tensor]]
"""Output key -> a function producing that tensor when its shard is written."""


def write_tensors(plan: TensorPlan, sizes: dict[str, int], directory: Path,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, str]:
    """Write tensors as one model.safetensors or HF-style shards plus an index.

    Returns the sha256 of each tensor file written, by file name.
    """
    shards: list[list[str]] = [[]]
    used = 0
    for key in plan:
        if shards[-1] and used + sizes[key] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += sizes[key]
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    checksums = {}
    for name, keys in zip(names, shards):
        tensors, seen = {}, set()
        for key in keys:
            tensor = plan[key]().contiguous()
            # A source tensor copied to several places (branch initialisation) must be
            # stored as separate tensors, not as views of one buffer.
            if tensor.untyped_storage().data_ptr() in seen:
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
            tensors[key] = tensor
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        del tensors
        os.chmod(directory / name, file_mode())  # safetensors creates its files 0600
        checksums[name] = sha256_file(directory / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {key: name for name, keys in zip(names, shards) for key in keys}}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return checksums


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_tokenizer_files(source: Path, directory: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)
            copied.append(name)
    return copied


# The family checkpoint.

def family_parameter_names(config: FamilyConfig) -> dict[str, list[int]]:
    """Every tensor name a family checkpoint holds, with its shape (built on the meta device)."""
    with torch.device("meta"):
        model = FamilyModel(FamilyConfig.from_dict(config.to_dict()))
    return {name: list(t.shape) for name, t in model.state_dict().items()
            if not (config.tie_word_embeddings and name == "lm_head.weight")}


def check_tensor(reader: SafetensorsReader, key: str, shape: list[int], source: str) -> None:
    """Refuse tensor `key` unless it has `shape` (from `source`) and a floating-point dtype."""
    found, dtype = reader.shape_and_dtype(key)
    if found != shape:
        raise CheckpointError(f"{reader.refs[key].file}: tensor '{key}' has shape {found}, "
                              f"expected {shape} from {source}")
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{reader.refs[key].file}: tensor '{key}' has dtype {dtype}, "
                              f"expected a floating-point dtype ({', '.join(FLOAT_DTYPES)})")


def check_family_tensors(directory: Path, config: FamilyConfig,
                         reader: SafetensorsReader) -> dict[str, list[int]]:
    """The checks every reader of a family makes: exactly family.json's tensors, each of the
    right shape and a floating-point dtype. Returns the expected names and shapes."""
    expected = family_parameter_names(config)
    missing = [name for name in expected if name not in reader]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{directory}: tensor '{missing[0]}' of shape {expected[missing[0]]} "
                              f"is missing{more}, expected by family.json's configuration")
    unexpected = sorted(set(reader.keys()) - set(expected))
    if unexpected:
        name = unexpected[0]
        shape, dtype = reader.shape_and_dtype(name)
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{reader.refs[name].file}: tensor '{name}' ({dtype} {shape}) is not "
                              f"in family.json's configuration{more}, which expects exactly "
                              f"{len(expected)} tensors")
    for name, shape in expected.items():
        check_tensor(reader, name, shape, FAMILY_CONFIG_NAME)
    return expected


def save_family(model: FamilyModel, directory: str | Path, tokenizer_source: str | Path | None = None,
                overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write family.json (with each tensor file's sha256) and the weights (a tied LM head
    stored once, as in HF)."""
    state = {name: t.detach() for name, t in model.state_dict().items()
             if not (model.config.tie_word_embeddings and name == "lm_head.weight")}
    plan = {name: (lambda t=t: t.cpu()) for name, t in state.items()}
    sizes = {name: t.numel() * t.element_size() for name, t in state.items()}
    config = model.config
    dtype = next(iter(state.values())).dtype
    config.torch_dtype = {v: k for k, v in DTYPES.items()}.get(dtype, config.torch_dtype)
    with atomic_directory(directory, overwrite) as staging:
        checksums = write_tensors(plan, sizes, staging, max_shard_bytes)
        config.save(staging, checksums)
        if tokenizer_source is not None:
            copy_tokenizer_files(Path(tokenizer_source), staging)
    return Path(directory)


def load_family(directory: str | Path, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu", verify: bool = False) -> FamilyModel:
    """Load a family checkpoint, checking every tensor's name, shape and dtype against
    family.json; with `verify`, first every tensor file against its sha256."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = FamilyConfig.load(directory)
    if verify:
        verify_checksums(directory)
    with SafetensorsReader(directory) as reader:
        expected = check_family_tensors(directory, config, reader)
        with torch.device("meta"):
            model = FamilyModel(config)
        state = {}
        for name in expected:
            tensor = reader.get(name)
            state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers are not in the checkpoint: build the rotary table for real on the target device.
    model.model.rotary_emb = RotaryEmbedding(config).to(device)
    return model


def verify_checksums(directory: Path) -> list[str] | None:
    """Hash every tensor file family.json lists; None when it lists none (an older checkpoint).

    Also refuses tensor files the checkpoint uses but family.json does not list.
    """
    checksums = FamilyConfig.load_checksums(directory)
    if checksums is None:
        return None
    index = directory / INDEX_NAME
    data = read_json(index) if index.is_file() else {"weight_map": {"": WEIGHTS_NAME}}
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    used = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    for name in used:
        if name not in checksums:
            raise CheckpointError(f"{directory / name}: not listed in {FAMILY_CONFIG_NAME}'s "
                                  f"checksums (a file added after the checkpoint was written?)")
    for name, digest in checksums.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {FAMILY_CONFIG_NAME}'s checksums but missing")
        found = sha256_file(path)
        if found != digest:
            raise CheckpointError(f"{path}: sha256 {found[:16]}... does not match {digest[:16]}... "
                                  f"in {FAMILY_CONFIG_NAME} (the file is corrupt or was changed)")
    return sorted(checksums)


def verify_family(directory: str | Path) -> tuple[FamilyConfig, list[str] | None]:
    """Everything `load_family` checks plus the hashes, without building the model.

    Returns the configuration and the files whose hashes matched (None: no checksums listed).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = FamilyConfig.load(directory)
    hashed = verify_checksums(directory)
    with SafetensorsReader(directory) as reader:
        check_family_tensors(directory, config, reader)
    return config, hashed


# Import from Hugging Face Qwen3 or Llama, and from the published Ruyi2 layout.

# model_type of the dense HF checkpoints a family imports and exports as, by architecture.
DENSE_MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


def hf_config_to_fields(hf: dict, where: str) -> dict:
    """The decoder dimension fields of a FamilyConfig, read from an HF config.json."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    for name in required:
        if name not in hf:
            raise ConfigError(f"{where}: missing field '{name}'")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if rope and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    fields = {name: hf[name] for name in required}
    fields.update(
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=hf.get("model_type") != "llama",
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    dtype = hf.get("torch_dtype") or hf.get("dtype")
    if dtype in DTYPES:
        fields["torch_dtype"] = dtype
    return fields


def import_checkpoint(source: str | Path, output: str | Path, exits: list[int] | None = None,
                      branch_layers: int = 1, shared_head: bool = False,
                      member_names: dict[str, int] | None = None, overwrite: bool = False,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> FamilyConfig:
    """Turn a dense HF Qwen3 or Llama checkpoint, a Ruyi2 release, or a llama.cpp GGUF file
    (familial.gguf.read) into a family checkpoint.

    Dense: each branch of exit e copies trunk layers e.., its norm and head copy the final
    norm and head, so member e starts as the dense model truncated to e + branch_layers layers.
    Ruyi2 (model_type `ruyi_qwen3`): exits and branches come from the checkpoint itself.
    """
    source = Path(source)
    if source.is_file() and (source.suffix == ".gguf" or _starts_with(source, b"GGUF")):
        from familial.gguf.read import import_gguf

        return import_gguf(source, output, exits, branch_layers, shared_head, member_names, overwrite,
                           max_shard_bytes)
    config, model_type = read_import_config(source, exits, branch_layers, shared_head, member_names)
    with SafetensorsReader(source) as reader:
        mapping = plan_import(source, reader, config, model_type)
        plan = {name: (lambda key=key: reader.get(key)) for name, key in mapping.items()}
        sizes = {name: _numel(reader.shape_and_dtype(key)[0]) * _dtype_bytes(reader.shape_and_dtype(key)[1])
                 for name, key in mapping.items()}
        with atomic_directory(output, overwrite) as staging:
            checksums = write_tensors(plan, sizes, staging, max_shard_bytes)
            config.save(staging, checksums)
            copy_tokenizer_files(source, staging)
    return config


def read_import_config(source: str | Path, exits: list[int] | None = None, branch_layers: int = 1,
                       shared_head: bool = False, member_names: dict[str, int] | None = None
                       ) -> tuple[FamilyConfig, str]:
    """The family config an import of `source` (dense Qwen3 or Llama, or Ruyi2) gives, and the
    model type."""
    source = Path(source)
    config_path = source / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{source}: no config.json (expected a Hugging Face checkpoint directory)")
    hf = read_json(config_path)
    if not isinstance(hf, dict):
        raise ConfigError(f"{config_path}: expected a JSON object")
    model_type = hf.get("model_type")
    fields = hf_config_to_fields(hf, str(config_path))
    if model_type == "ruyi_qwen3":
        fields.update(exits=list(hf.get("early_exit_points") or []), branch_layers=1,
                      shared_head=bool(hf.get("shared_heads", False)))
        if exits is not None and exits != fields["exits"]:
            raise ConfigError(f"{config_path}: early_exit_points = {fields['exits']} but exits "
                              f"{exits} were requested; a Ruyi2 checkpoint keeps its own exits")
    elif model_type in DENSE_MODEL_TYPES:
        if not exits:
            raise ConfigError(f"import of a dense {DENSE_MODEL_TYPES[model_type][:-len('ForCausalLM')]} "
                              f"checkpoint needs exits (for example --exits 1,3,5)")
        fields.update(exits=list(exits), branch_layers=branch_layers, shared_head=shared_head)
    else:
        raise ConfigError(f"{config_path}: field 'model_type' = {model_type!r}: expected 'qwen3' or "
                          f"'llama' (dense) or 'ruyi_qwen3' (Ruyi2 release)")
    fields["member_names"] = dict(member_names or {})
    config = FamilyConfig.from_dict(fields, where=f"{config_path} with the requested exits")
    if model_type in DENSE_MODEL_TYPES:
        check_branches_fit(config)
    return config, model_type


def check_branches_fit(config: FamilyConfig) -> None:
    """Each branch of a dense import copies the trunk layers after its exit: they must exist."""
    for e in config.exits[:-1]:
        if e + config.branch_depth(e) > config.num_hidden_layers:
            raise ConfigError(f"exit {e} with a {config.branch_depth(e)}-layer branch needs trunk "
                              f"layers up to {e + config.branch_depth(e) - 1}, but the model has "
                              f"{config.num_hidden_layers}")


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(magic)) == magic


def plan_import(source: Path, reader: SafetensorsReader, config: FamilyConfig, model_type: str) -> dict[str, str]:
    """{family tensor name: source tensor name} of an import, every source tensor checked."""
    mapping = (_ruyi2_sources(config) if model_type == "ruyi_qwen3" else _dense_sources(config))
    out = {}
    for name, shape in family_parameter_names(config).items():
        source_key = mapping(name)
        if source_key not in reader:
            raise CheckpointError(f"{source}: tensor '{source_key}' (needed for '{name}') is missing")
        check_tensor(reader, source_key, shape, str(source / "config.json"))
        out[name] = source_key
    return out


def _dense_sources(config: FamilyConfig) -> Callable[[str], str]:
    def source(name: str) -> str:
        if not name.startswith("branches."):
            if name == "lm_head.weight" and config.tie_word_embeddings:
                return "model.embed_tokens.weight"
            return name
        _, exit_layer, rest = name.split(".", 2)
        e = int(exit_layer)
        if rest.startswith("layers."):
            _, index, tail = rest.split(".", 2)
            return f"model.layers.{e + int(index)}.{tail}"
        if rest == "norm.weight":
            return "model.norm.weight"
        return "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    return source


def _ruyi2_sources(config: FamilyConfig) -> Callable[[str], str]:
    position = {e: k for k, e in enumerate(config.exits)}
    last = len(config.exits) - 1

    def source(name: str) -> str:
        if name == "model.norm.weight":
            return f"model.norms.{last}.weight"
        if name == "lm_head.weight":
            return "lm_head.weight" if config.shared_head else f"lm_head.{last}.weight"
        if not name.startswith("branches."):
            return name
        _, exit_layer, rest = name.split(".", 2)
        k = position[int(exit_layer)]
        if rest.startswith("layers.0."):
            return f"model.eelayers.{k}.{rest[len('layers.0.'):]}"
        if rest == "norm.weight":
            return f"model.norms.{k}.weight"
        return f"lm_head.{k}.weight"
    return source


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _dtype_bytes(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "I16": 2}.get(dtype, 4)


# Export of members as dense Qwen3 or Llama checkpoints.

def member_key_map(config: FamilyConfig, exit_layer: int) -> dict[str, str]:
    """Dense tensor name -> family tensor name for one member.

    Derived from the model itself (on the meta device): a member view holds the family's own
    modules, so the same parameter object has a name in each.
    """
    with torch.device("meta"):
        family = FamilyModel(FamilyConfig.from_dict(config.to_dict()))
    family_names = {}
    for name, param in family.named_parameters(remove_duplicate=False):
        family_names.setdefault(id(param), name)
    member = family.member(exit_layer)
    return {name: family_names[id(param)]
            for name, param in member.named_parameters(remove_duplicate=False)}


def hf_member_config(config: FamilyConfig, exit_layer: int, tied: bool,
                     pad_token_id: int | None = None) -> dict:
    """config.json of member `exit_layer` as a stock Qwen3 or Llama model."""
    layers = config.member_layers(exit_layer)
    hf = {
        "architectures": [DENSE_MODEL_TYPES[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": tied,
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "initializer_range": config.initializer_range,
        "use_cache": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id if pad_token_id is None else pad_token_id,
        "torch_dtype": config.torch_dtype,
        "familial": {"exit": exit_layer, "member": config.member_name(exit_layer),
                     "family_exits": config.exits},
    }
    if config.architecture == "qwen3":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    else:
        hf.update(mlp_bias=config.mlp_bias, pretraining_tp=1)
    return hf


def pad_token_id(config: FamilyConfig, family_dir: Path) -> int | None:
    """The pad id an exported member declares: family.json's, else the tokenizer's pad token
    (Qwen3 checkpoints pad with <|endoftext|>), else the first EOS, which is what
    transformers' `generate` falls back to."""
    if config.pad_token_id is not None:
        return config.pad_token_id
    found = _tokenizer_pad_id(family_dir)
    if found is not None:
        return found
    eos = config.eos_token_id
    return eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None


def _tokenizer_pad_id(directory: Path) -> int | None:
    try:
        pad = json.loads((directory / "tokenizer_config.json").read_text()).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if not isinstance(pad, str) or not (directory / "tokenizer.json").is_file():
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(directory / "tokenizer.json")).token_to_id(pad)
    except Exception:  # absent or unreadable tokenizer files: the caller falls back to EOS
        return None


def _plan_member(config: FamilyConfig, exit_layer: int,
                 reader: SafetensorsReader) -> tuple[TensorPlan, dict[str, int], bool]:
    """The dense tensors of one member, read lazily from the family: (plan, sizes, tied).

    Low-rank (compressed) matrices are merged back to dense; a tied family's branch members
    are written untied since their heads are their own.
    """
    key_map = member_key_map(config, exit_layer)
    tied = config.tie_word_embeddings and key_map["lm_head.weight"] == "model.embed_tokens.weight"
    plan, sizes = {}, {}
    for dense_name, family_name in key_map.items():
        if tied and dense_name == "lm_head.weight":
            continue
        if family_name == "lm_head.weight" and config.tie_word_embeddings:
            family_name = "model.embed_tokens.weight"
        merged = _low_rank_parent(config, family_name)
        if merged is None:
            shape, dtype = reader.shape_and_dtype(family_name)
            plan[dense_name] = lambda key=family_name: reader.get(key)
            sizes[dense_name] = _numel(shape) * _dtype_bytes(dtype)
        elif family_name.endswith(".down.weight"):
            weight = dense_name[: -len(".down.weight")] + ".weight"
            plan[weight] = lambda m=merged: (reader.get(f"{m}.up.weight").double()
                                             @ reader.get(f"{m}.down.weight").double()).to(
                reader.get(f"{m}.down.weight").dtype)
            up, _ = reader.shape_and_dtype(f"{merged}.up.weight")
            down, dtype = reader.shape_and_dtype(family_name)
            sizes[weight] = up[0] * down[1] * _dtype_bytes(dtype)
    return plan, sizes, tied


def _write_member(family_dir: Path, config: FamilyConfig, exit_layer: int,
                  reader: SafetensorsReader, directory: Path, max_shard_bytes: int) -> None:
    plan, sizes, tied = _plan_member(config, exit_layer, reader)
    write_tensors(plan, sizes, directory, max_shard_bytes)
    hf = hf_member_config(config, exit_layer, tied, pad_token_id(config, family_dir))
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    copy_tokenizer_files(family_dir, directory)


def export_member(family_dir: str | Path, output: str | Path, member: int | str,
                  overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write one member as a dense HF Qwen3 or Llama checkpoint that stock transformers loads.

    The family is checked as `load_family` checks it first: what load refuses, export refuses.
    """
    family_dir = Path(family_dir)
    config = FamilyConfig.load(family_dir)
    exit_layer = config.resolve_member(member)
    with SafetensorsReader(family_dir) as reader:
        check_family_tensors(family_dir, config, reader)
        with atomic_directory(output, overwrite) as staging:
            _write_member(family_dir, config, exit_layer, reader, staging, max_shard_bytes)
    return Path(output)


def _low_rank_parent(config: FamilyConfig, family_name: str) -> str | None:
    for suffix in (".down.weight", ".up.weight"):
        if family_name.endswith(suffix) and family_name[: -len(suffix)] in config.low_rank:
            return family_name[: -len(suffix)]
    return None


def export_all(family_dir: str | Path, output: str | Path, overwrite: bool = False,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Every member under output/<member name>/, all or nothing: output appears complete
    in one rename, or not at all."""
    family_dir = Path(family_dir)
    config = FamilyConfig.load(family_dir)
    names = [config.member_name(e) for e in config.exits]
    with SafetensorsReader(family_dir) as reader:
        check_family_tensors(family_dir, config, reader)
        with atomic_directory(output, overwrite) as staging:
            for exit_layer, name in zip(config.exits, names):
                (staging / name).mkdir()
                _write_member(family_dir, config, exit_layer, reader, staging / name, max_shard_bytes)
    return [Path(output) / name for name in names]
