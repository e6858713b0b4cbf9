"""Typed configuration: the family's architecture, and a validating loader for any dataclass.

`FamilyConfig` holds the decoder's dimensions (Qwen3 or Llama: they differ only in Qwen3's
per-head q/k norms, `qk_norm`) plus the family fields (exits, branches, heads).
It is saved as `family.json` beside the weights. `from_dict` turns nested dicts (from JSON,
TOML or YAML) into typed dataclasses, naming the exact field and value that is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILY_CONFIG_NAME = "family.json"
# family.json's key listing the sha256 of each tensor file; it describes the files, not the
# architecture, so it lives beside the configuration's fields rather than among them.
CHECKSUMS_KEY = "files"
ALIAS = re.compile(r"\w[\w.+-]*")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or inconsistent."""


@dataclass
class FamilyConfig:
    # Decoder dimensions (names as in transformers' Qwen3Config and LlamaConfig, so import/export
    # copy them).
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    # exits: 0-based trunk layer indices, sorted; the last one is always the last layer.
    exits: list[int]
    # per-head dimension; Qwen3 sets it explicitly (128), so it need not be hidden/heads.
    head_dim: int | None = None
    rope_theta: float = 1_000_000.0
    # None for plain RoPE, or {"rope_type": "linear" | "yarn" | "llama3", "factor": ..., ...} as in HF.
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # Llama's optional biases on the MLP's three projections.
    mlp_bias: bool = False
    # Qwen3 RMS-normalises each query and key head before RoPE; Llama does not. Families
    # written before Llama support lack the field, and are Qwen3.
    qk_norm: bool = True
    initializer_range: float = 0.02
    # decoder layers in each exit's branch: one int for all, or one per non-final exit
    # (block expansion deepens a single member's branch).
    branch_layers: int | list[int] = 1
    # one LM head used by every exit instead of a head per exit.
    shared_head: bool = False
    # aliases for members, e.g. {"device": 2, "edge": 21, "cloud": 39}.
    member_names: dict[str, int] = field(default_factory=dict)
    # modules stored as two thin matrices after SVD compression: module name -> rank.
    low_rank: dict[str, int] = field(default_factory=dict)
    # token ids copied from/to the HF config; the runtime uses eos to stop generation.
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # calibrated early-exit thresholds and similar runtime settings, kept with the weights.
    runtime: dict[str, Any] = field(default_factory=dict)
    # dtype the weights are stored in.
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            heads = self.num_attention_heads
            if isinstance(heads, int) and heads > 0 and self.hidden_size % heads:
                raise ConfigError(f"family config: field 'num_attention_heads' = {heads}: must "
                                  f"divide hidden_size ({self.hidden_size}) when head_dim is not set")
            self.head_dim = self.hidden_size // heads if isinstance(heads, int) and heads > 0 else 0
        self.validate()

    def validate(self, where: str = "family config") -> None:
        def bad(name: str, message: str) -> ConfigError:
            return ConfigError(f"{where}: field '{name}' = {getattr(self, name)!r}: {message}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(name, "expected a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads",
                      f"must divide num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise bad("head_dim", "must be even for rotary embeddings")
        if not self.rms_norm_eps > 0:
            raise bad("rms_norm_eps", "expected a positive number")
        if not self.rope_theta > 0:
            raise bad("rope_theta", "expected a positive number")
        if not self.initializer_range >= 0:
            raise bad("initializer_range", "expected a number >= 0")
        if self.torch_dtype not in ("float32", "bfloat16", "float16"):
            raise bad("torch_dtype", "expected float32, bfloat16 or float16")
        exits = self.exits
        if not isinstance(exits, list) or not exits or not all(
                isinstance(e, int) and not isinstance(e, bool) for e in exits):
            raise bad("exits", "expected a non-empty list of layer indices")
        if len(set(exits)) != len(exits):
            raise bad("exits", "has duplicate exits")
        if exits != sorted(exits):
            raise bad("exits", "must be sorted in increasing order")
        for e in exits:
            if not 0 <= e < self.num_hidden_layers:
                raise bad("exits", f"exit {e} is outside the trunk's layers 0..{self.num_hidden_layers - 1}")
        if exits[-1] != self.num_hidden_layers - 1:
            raise bad("exits", f"the last exit must be the last layer ({self.num_hidden_layers - 1})")
        if isinstance(self.branch_layers, list):
            if len(self.branch_layers) != len(exits) - 1:
                raise bad("branch_layers", f"expected one count per non-final exit ({len(exits) - 1})")
        depths = self.branch_layers if isinstance(self.branch_layers, list) else [self.branch_layers]
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in depths):
            raise bad("branch_layers", "expected integers >= 1")
        for alias, e in self.member_names.items():
            if e not in exits:
                raise bad("member_names", f"alias '{alias}' points to {e}, which is not an exit {exits}")
            _check_alias(alias, e, bad)
        for name, rank in self.low_rank.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise bad("low_rank", f"rank of '{name}' must be a positive integer")
        if self.mlp_bias and self.qk_norm:
            raise bad("mlp_bias", "MLP biases are a Llama option: set qk_norm to false (Qwen3 has none)")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("default", "linear", "yarn", "llama3"):
                raise bad("rope_scaling", "supported rope_type values are default, linear, yarn and llama3")
            # The model divides and takes logarithms of these: they must be positive numbers.
            llama3 = kind == "llama3"
            numbers = {"factor": kind != "default", "original_max_position_embeddings": False,
                       "beta_fast": False, "beta_slow": False, "attention_factor": False,
                       "low_freq_factor": llama3, "high_freq_factor": llama3}
            for key, required in numbers.items():
                value = self.rope_scaling.get(key)
                if (value is not None or required) and not (_finite_number(value) and 0 < value < 2**63):
                    raise bad("rope_scaling", f"'{key}' must be a positive number"
                                              f"{' (required by ' + kind + ' scaling)' if required else ''}")
            if llama3 and not self.rope_scaling["high_freq_factor"] > self.rope_scaling["low_freq_factor"]:
                raise bad("rope_scaling", "'high_freq_factor' must exceed 'low_freq_factor' (llama3 "
                                          "scaling interpolates between them)")

    @property
    def architecture(self) -> str:
        """The dense model a member is: 'qwen3' (per-head q/k norms) or 'llama'."""
        return "qwen3" if self.qk_norm else "llama"

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def branch_depth(self, exit_layer: int) -> int:
        """Number of layers a member runs after the trunk (its branch, or the last trunk layer)."""
        index = self.exits.index(exit_layer)
        if index == len(self.exits) - 1:
            return 1
        if isinstance(self.branch_layers, list):
            return self.branch_layers[index]
        return self.branch_layers

    def member_layers(self, exit_layer: int) -> int:
        """Decoder layers in the dense model equivalent to this member."""
        if exit_layer == self.exits[-1]:
            return self.num_hidden_layers
        return exit_layer + self.branch_depth(exit_layer)

    def resolve_member(self, member: int | str) -> int:
        """Map an exit index, its string form, 'exit-E' or an alias to the exit layer index."""
        key = member
        if isinstance(key, str):
            text = key.strip()
            if text in self.member_names:
                return self.member_names[text]
            if text.startswith("exit-"):
                text = text[len("exit-"):]
            if text.lstrip("-").isdecimal():
                key = int(text)
        if isinstance(key, int) and not isinstance(key, bool):
            if key == -1:
                return self.exits[-1]
            if key in self.exits:
                return key
        known = ", ".join([str(e) for e in self.exits] + list(self.member_names))
        raise ConfigError(f"unknown member {member!r}: this family's members are {known}")

    def member_name(self, exit_layer: int) -> str:
        for alias, e in self.member_names.items():
            if e == exit_layer:
                return alias
        return f"exit-{exit_layer}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, checksums: dict[str, str] | None = None) -> str:
        """family.json's text; `checksums` (file name -> sha256) lists the tensor files."""
        data = self.to_dict()
        if checksums is not None:
            data[CHECKSUMS_KEY] = dict(sorted(checksums.items()))
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save(self, directory: str | Path, checksums: dict[str, str] | None = None) -> Path:
        path = Path(directory) / FAMILY_CONFIG_NAME
        path.write_text(self.to_json(checksums))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "FamilyConfig":
        path = _family_json(directory)
        data = read_json(path)
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != CHECKSUMS_KEY}
        return cls.from_dict(data, where=str(path))

    @staticmethod
    def load_checksums(directory: str | Path) -> dict[str, str] | None:
        """family.json's sha256 per tensor file, or None if it lists none (an older checkpoint)."""
        path = _family_json(directory)
        data = read_json(path)
        checksums = data.get(CHECKSUMS_KEY) if isinstance(data, dict) else None
        if checksums is None:
            return None
        if not isinstance(checksums, dict) or not all(
                Path(k).name == k and not k.startswith(".") and isinstance(v, str)
                and re.fullmatch("[0-9a-f]{64}", v) for k, v in checksums.items()):
            raise ConfigError(f"{path}: field '{CHECKSUMS_KEY}' must map file names in the "
                              f"checkpoint directory to sha256 hex digests")
        return checksums

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "family config") -> "FamilyConfig":
        return from_dict(cls, data, where)


def _family_json(directory: str | Path) -> Path:
    path = Path(directory)
    if path.is_dir():
        path = path / FAMILY_CONFIG_NAME
    if not path.exists():
        raise ConfigError(f"{path}: not found (a family checkpoint holds {FAMILY_CONFIG_NAME})")
    return path


def _check_alias(alias: str, exit_layer: int, bad) -> None:
    """An alias names one member unambiguously: never another member's number or `exit-E` id,
    and safe as a directory name (export --all writes OUT/<alias>)."""
    if not isinstance(alias, str) or not ALIAS.fullmatch(alias):
        raise bad("member_names", f"alias {alias!r} must be letters, digits and . _ + - "
                                  f"(it names a directory on export)")
    number = alias[len("exit-"):] if alias.startswith("exit-") else alias
    if number.lstrip("-").isdecimal() and (alias == number or int(number) != exit_layer):
        raise bad("member_names", f"alias '{alias}' for exit {exit_layer} would be read as the "
                                  f"member id '{alias}' (choose a name that is not a number or exit-N)")
    if alias == "auto":
        raise bad("member_names", "alias 'auto' is reserved (adaptive exit)")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: malformed JSON at line {error.lineno} column {error.colno}: "
                          f"{error.msg}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a nested dict, checking every field's type.

    Unknown keys and wrong types raise ConfigError naming `where` and the dotted field path.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table/object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields: "
                          f"{', '.join(sorted(fields))}")
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required field '{name}'")
            continue
        values[name] = _coerce(hints[name], data[name], f"{where}: field '{name}'")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where} = {value!r}: expected {_describe(hint)}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where.replace(": field '", ".").rstrip("'"))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r}: expected a list")
        item = args[0] if args else Any
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected a table/object")
        key_type, item_type = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            if key_type is int and isinstance(k, str) and k.lstrip("-").isdigit():
                k = int(k)
            out[k] = _coerce(item_type, v, f"{where}[{k!r}]")
        return out
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} = {value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} = {value!r}: expected an integer")
    if hint is float:
        if _finite_number(value):
            return float(value)
        raise ConfigError(f"{where} = {value!r}: expected a finite number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} = {value!r}: expected a string")
    if typing.get_origin(hint) is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where} = {value!r}: expected one of {', '.join(map(repr, args))}")
    return value


def _finite_number(value: Any) -> bool:
    """An int or float that converts to a finite float (10**400 does not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _describe(hint: Any) -> str:
    names = []
    for option in typing.get_args(hint):
        if option is type(None):
            names.append("null")
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(names)
