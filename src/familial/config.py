"""Typed configuration: the family's architecture, and a validating loader for any dataclass.

`FamilyConfig` holds the decoder's dimensions (Qwen3 or Llama: they differ only in Qwen3's
per-head q/k norms, `qk_norm`) plus the family fields (exits, branches, heads).
It is saved as `family.json` beside the weights. `from_dict` turns nested dicts (from JSON,
TOML or YAML) into typed dataclasses, naming the exact field and value that is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from familial import checks

FAMILY_CONFIG_NAME = "family.json"
# family.json's key listing the sha256 of each tensor file; it describes the files, not the
# architecture, so it lives beside the configuration's fields rather than among them.
CHECKSUMS_KEY = "files"
ALIAS = re.compile(r"\w[\w.+-]*")
# Configuration files are small; anything larger is not one (and /dev/zero never ends).
MAX_JSON_BYTES = 256 * 2**20


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
            counted = checks.is_integer(heads) and heads > 0
            checks.require(not counted or self.hidden_size % heads == 0,
                           checks.field("family config", "num_attention_heads"), heads,
                           f"must divide hidden_size ({self.hidden_size}) when head_dim is not set",
                           error=ConfigError)
            self.head_dim = self.hidden_size // heads if counted else 0
        self.validate()

    def validate(self, where: str = "family config") -> None:
        """Each rule raises a ConfigError naming `where`, the field and its value."""
        self._check_dimensions(where)
        self._check_exits(where)
        self._check_branches(where)
        self._check_rope_scaling(where)

    def _require(self, where: str, name: str, ok: bool, why: str) -> None:
        checks.require(ok, checks.field(where, name), getattr(self, name), why, error=ConfigError)

    def _check_dimensions(self, where: str) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            checks.positive_int(checks.field(where, name), getattr(self, name), error=ConfigError)
        self._require(where, "num_key_value_heads", self.num_attention_heads % self.num_key_value_heads == 0,
                      f"must divide num_attention_heads ({self.num_attention_heads})")
        self._require(where, "head_dim", self.head_dim % 2 == 0, "must be even for rotary embeddings")
        checks.positive_number(checks.field(where, "rms_norm_eps"), self.rms_norm_eps, error=ConfigError)
        checks.positive_number(checks.field(where, "rope_theta"), self.rope_theta, error=ConfigError)
        checks.finite_number(checks.field(where, "initializer_range"), self.initializer_range,
                             "a number >= 0", minimum=0, error=ConfigError)
        checks.one_of(checks.field(where, "torch_dtype"), self.torch_dtype, ("float32", "bfloat16", "float16"),
                      "float32, bfloat16 or float16", error=ConfigError)
        self._require(where, "mlp_bias", not (self.mlp_bias and self.qk_norm),
                      "MLP biases are a Llama option: set qk_norm to false (Qwen3 has none)")

    def _check_exits(self, where: str) -> None:
        exits, last = self.exits, self.num_hidden_layers - 1
        checks.integers(checks.field(where, "exits"), exits, "a non-empty list of layer indices",
                        error=ConfigError)
        self._require(where, "exits", len(set(exits)) == len(exits), "has duplicate exits")
        self._require(where, "exits", exits == sorted(exits), "must be sorted in increasing order")
        for e in exits:
            self._require(where, "exits", 0 <= e <= last, f"exit {e} is outside the trunk's layers 0..{last}")
        self._require(where, "exits", exits[-1] == last, f"the last exit must be the last layer ({last})")

    def _check_branches(self, where: str) -> None:
        """Branch depths, member aliases and low-rank modules, each named per entry."""
        depths = self.branch_layers if isinstance(self.branch_layers, list) else [self.branch_layers]
        if isinstance(self.branch_layers, list):
            self._require(where, "branch_layers", len(depths) == len(self.exits) - 1,
                          f"expected one count per non-final exit ({len(self.exits) - 1})")
        self._require(where, "branch_layers", all(checks.is_integer(n) and n >= 1 for n in depths),
                      "expected integers >= 1")
        for alias, e in self.member_names.items():
            self._require(where, "member_names", e in self.exits,
                          f"alias '{alias}' points to {e}, which is not an exit {self.exits}")
            _check_alias(alias, e, lambda ok, why: self._require(where, "member_names", ok, why))
        for name, rank in self.low_rank.items():
            self._require(where, "low_rank", checks.is_integer(rank) and rank >= 1,
                          f"rank of '{name}' must be a positive integer")

    def _check_rope_scaling(self, where: str) -> None:
        if self.rope_scaling is None:
            return
        kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        self._require(where, "rope_scaling", kind in ("default", "linear", "yarn", "llama3"),
                      "supported rope_type values are default, linear, yarn and llama3")
        # The model divides and takes logarithms of these: they must be positive numbers.
        llama3 = kind == "llama3"
        numbers = {"factor": kind != "default", "original_max_position_embeddings": False,
                   "beta_fast": False, "beta_slow": False, "attention_factor": False,
                   "low_freq_factor": llama3, "high_freq_factor": llama3}
        for key, required in numbers.items():
            value = self.rope_scaling.get(key)
            self._require(where, "rope_scaling", (value is None and not required)
                          or (checks.is_number(value) and 0 < value < 2**63),
                          f"'{key}' must be a positive number"
                          f"{' (required by ' + kind + ' scaling)' if required else ''}")
        if llama3:
            self._require(where, "rope_scaling",
                          self.rope_scaling["high_freq_factor"] > self.rope_scaling["low_freq_factor"],
                          "'high_freq_factor' must exceed 'low_freq_factor' (llama3 scaling "
                          "interpolates between them)")

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
        if checks.is_integer(key):
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


def _check_alias(alias: str, exit_layer: int, require: Callable[[bool, str], None]) -> None:
    """An alias names one member unambiguously: never another member's number or `exit-E` id,
    and safe as a directory name (export --all writes OUT/<alias>)."""
    require(isinstance(alias, str) and ALIAS.fullmatch(alias) is not None,
            f"alias {alias!r} must be letters, digits and . _ + - (it names a directory on export)")
    number = alias[len("exit-"):] if alias.startswith("exit-") else alias
    require(not (number.lstrip("-").isdecimal() and (alias == number or int(number) != exit_layer)),
            f"alias '{alias}' for exit {exit_layer} would be read as the member id '{alias}' "
            f"(choose a name that is not a number or exit-N)")
    require(alias != "auto", "alias 'auto' is reserved (adaptive exit)")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(read_small_file(path).decode("utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: malformed JSON at line {error.lineno} column {error.colno}: "
                          f"{error.msg}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None


def read_small_file(path: str | Path, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. A device or FIFO in its place is
    refused before it is opened (reading /dev/zero never ends; opening a FIFO blocks)."""
    info = os.stat(path)
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):  # open names a directory
        raise ConfigError(f"{path}: not a regular file (a device, FIFO or socket); expected a "
                          f"JSON file")
    if info.st_size > limit:
        raise ConfigError(f"{path}: {info.st_size} bytes, more than the {limit} a configuration "
                          f"file may have")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{path}: more than the {limit} bytes a configuration file may have")
    return data


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
    """`value` as type `hint`, or a ConfigError naming `where` (the file and field) and the value."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(hint, value, where)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, _nested(where))
    if origin in (list, tuple):
        return _coerce_list(hint, value, where)
    if origin is dict:
        return _coerce_dict(hint, value, where)
    return _coerce_scalar(hint, value, where)


def _coerce_union(hint: Any, value: Any, where: str) -> Any:
    """The first option `value` converts to. A table meant for a dataclass option fails with
    that dataclass's own error, which names the nested field; otherwise every option is named."""
    options = [option for option in typing.get_args(hint) if option is not type(None)]
    if value is None and len(options) < len(typing.get_args(hint)):
        return None
    if isinstance(value, dict):
        tables = [option for option in options if dataclasses.is_dataclass(option)]
        if len(tables) == 1:
            return _coerce(tables[0], value, where)
    for option in options:
        try:
            return _coerce(option, value, where)
        except ConfigError:
            continue
    raise ConfigError(f"{where} = {value!r}: expected {_describe(hint)}")


def _nested(where: str) -> str:
    """Where a nested table's fields are: "f.toml: field 'loss'" -> "f.toml.loss"."""
    head, marker, tail = where.partition(": field '")
    if not marker:
        return where
    name, _, rest = tail.partition("'")
    return f"{head}.{name}{rest}"


def _coerce_list(hint: Any, value: Any, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} = {value!r}: expected a list")
    args = typing.get_args(hint)
    item = args[0] if args else Any
    return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]


def _coerce_dict(hint: Any, value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} = {value!r}: expected a table/object")
    key_type, item_type = typing.get_args(hint) or (Any, Any)
    out = {}
    for k, v in value.items():
        # JSON and TOML keys are strings: an int-keyed table reads "3" as 3.
        if key_type is int and isinstance(k, str) and k.lstrip("-").isdigit():
            k = int(k)
        out[k] = _coerce(item_type, v, f"{where}[{k!r}]")
    return out


def _coerce_scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is bool:
        return checks.boolean(where, value, error=ConfigError)
    if hint is int:
        return checks.integer(where, value, error=ConfigError)
    if hint is float:
        return float(checks.finite_number(where, value, "a finite number", error=ConfigError))
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: expected a string")
        return value
    if typing.get_origin(hint) is typing.Literal:
        return checks.one_of(where, value, typing.get_args(hint), error=ConfigError)
    return value


def _describe(hint: Any) -> str:
    names = []
    for option in typing.get_args(hint):
        if option is type(None):
            names.append("null")
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(names)
