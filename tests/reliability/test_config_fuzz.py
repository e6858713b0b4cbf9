"""Fuzzed configs: whatever a JSON or TOML file holds, the loaders either return a config that
works or raise ConfigError naming the problem, never another exception."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faults import train_config_dict, write_toml
from familial.config import ConfigError, FamilyConfig
from familial.model import FamilyModel, RotaryEmbedding
from familial.train.config import load_config

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# What JSON and TOML can hold: keys are strings, numbers may be huge or non-finite.
edges = st.sampled_from([0, -1, 1, 2, 3, 2**31, 2**63, 10**400, 0.5, 1e-300, 1e300, float("nan"),
                         float("inf"), "", "1", True, False, None, [], {}])
scalars = (edges | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)

VALID_FAMILY = {"vocab_size": 61, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "exits": [1, 3],
                "branch_layers": [2], "member_names": {"small": 1}, "rope_scaling": None,
                "low_rank": {}, "runtime": {}, "eos_token_id": 0}
FAMILY_FIELDS = sorted(FamilyConfig.__dataclass_fields__)

# Values near the valid ones, where validation has to look closely.
near_family = {
    "exits": st.lists(st.integers(-2, 6), max_size=4),
    "branch_layers": st.integers(-1, 3) | st.lists(st.integers(-1, 3), max_size=3),
    "rope_scaling": st.none() | st.fixed_dictionaries(
        {"rope_type": st.sampled_from(["default", "linear", "yarn", "dynamic"])},
        optional={"factor": scalars, "original_max_position_embeddings": scalars,
                  "beta_fast": scalars, "beta_slow": scalars, "attention_factor": scalars}),
    "member_names": st.dictionaries(st.text(max_size=4), st.integers(-1, 4), max_size=3),
    "head_dim": st.integers(-2, 20),
    "num_key_value_heads": st.integers(-1, 5),
}


@st.composite
def family_dicts(draw) -> dict:
    """A valid family config with one to three fields replaced (or dropped)."""
    data = copy.deepcopy(VALID_FAMILY)
    names = st.sampled_from(FAMILY_FIELDS + ["unknown_field"]) | st.sampled_from(sorted(near_family))
    for name in draw(st.lists(names, min_size=1, max_size=2)):
        if draw(st.integers(0, 9)) == 0:
            data.pop(name, None)
        else:
            data[name] = draw(near_family.get(name, scalars) if draw(st.booleans()) else json_values)
    return data


def builds_a_model(config: FamilyConfig) -> None:
    # Sizes past what a test machine holds are a resource question, not a format one.
    depths = [config.branch_depth(e) for e in config.exits]
    if config.head_dim <= 4096:
        rotary = RotaryEmbedding(config)  # the scaling parameters are used here
        rotary(torch.arange(4)[None], torch.float32)
    if max(config.vocab_size, config.hidden_size, config.intermediate_size, config.head_dim,
           config.num_attention_heads) <= 1024 and config.num_hidden_layers + sum(depths) <= 12:
        with torch.device("meta"):
            FamilyModel(config)


def loads_and_builds_or_refuses(data) -> FamilyConfig | None:
    """A family dict either loads into a config a model can be built from, or is refused
    with a ConfigError that says why (None then)."""
    try:
        config = FamilyConfig.from_dict(data)
    except ConfigError as error:
        assert str(error)
        return None
    builds_a_model(config)
    return config


@settings(max_examples=150, deadline=None)
@given(data=family_dicts())
def test_family_config_loads_or_raises_config_error(data):
    config = loads_and_builds_or_refuses(data)
    if config is None:
        return
    again = FamilyConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@settings(max_examples=100, deadline=None)
@given(scaling=near_family["rope_scaling"], theta=scalars)
def test_rope_settings_load_or_raise_config_error(scaling, theta):
    loads_and_builds_or_refuses(dict(VALID_FAMILY, rope_scaling=scaling, rope_theta=theta))


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_family_json_file_loads_or_raises_config_error(tmp_path_factory, text):
    directory = tmp_path_factory.mktemp("family")
    (directory / "family.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        FamilyConfig.load(directory)
    except ConfigError as error:
        assert "family.json" in str(error)


TRAIN_PATHS = [("seed",), ("steps",), ("run_dir",), ("max_bad_steps",), ("autocast",), ("stages",),
               ("data",), ("data", "seq_len"), ("data", "batch_size"), ("data", "grad_accum"),
               ("data", "sources"), ("lr",), ("lr", "lr"), ("lr", "min_lr"), ("lr", "kind"),
               ("lr", "warmup_steps"), ("lr", "decay_fraction"), ("loss",), ("loss", "lambdas"),
               ("loss", "chunk_size"), ("loss", "distill"), ("optim", "grad_clip"), ("init",),
               ("init", "model"), ("init", "family"), ("init", "model", "exits"), ("checkpoint",),
               ("checkpoint", "every"), ("checkpoint", "keep"), ("log",), ("parallel", "tp"),
               ("freeze",), ("unknown",)]


@st.composite
def train_dicts(draw) -> dict:
    data = train_config_dict(Path("run"), Path("shards"))
    for path in draw(st.lists(st.sampled_from(TRAIN_PATHS), min_size=1, max_size=3)):
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            if draw(st.booleans()):
                node[path[-1]] = draw(json_values)
            else:
                node.pop(path[-1], None)
    return data


@FUZZ
@given(data=train_dicts())
def test_train_config_loads_or_raises_config_error(data):
    try:
        config = load_config(data=data)
    except ConfigError as error:
        assert str(error)
        return
    assert load_config(data=config.to_dict()) == config


@settings(max_examples=100, deadline=None)
@given(data=train_dicts(), overrides=st.lists(st.sampled_from(
    ["--steps", "--lr.lr", "--data.seq_len", "--seed=3", "--init.model.exits", "--stages.0.steps",
     "--", "--log", "-x", "3", "[1, 2]", "{a = 1}", "nan", "inf", "'x'", "1e400", "true"]), max_size=6))
def test_train_toml_file_with_overrides_loads_or_raises_config_error(tmp_path_factory, data, overrides):
    path = write_toml(tmp_path_factory.mktemp("config") / "train.toml", _toml_safe(data))
    try:
        load_config(path, overrides)
    except ConfigError as error:
        assert str(error)


def _toml_safe(value):
    # TOML has no null and no NaN literal spelled JSON's way: drop the first, spell the second.
    if isinstance(value, dict):
        return {k: _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_toml_safe(v) for v in value if v is not None]
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and abs(value) == float("inf"):
        return "inf"
    return value
