"""FamilyConfig validation and the typed loader: errors name the field and the value."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from familial.config import ConfigError, FamilyConfig, from_dict

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, exits=[1, 3, 5])


@pytest.mark.parametrize("change, message", [
    ({"exits": [3, 1, 5]}, "'exits' = \\[3, 1, 5\\]: must be sorted"),
    ({"exits": [1, 1, 5]}, "duplicate"),
    ({"exits": [1, 3, 6]}, "exit 6 is outside the trunk's layers 0..5"),
    ({"exits": [1, 3]}, "the last exit must be the last layer \\(5\\)"),
    ({"exits": []}, "non-empty list"),
    ({"hidden_size": 66}, "'num_attention_heads' = 4: must divide hidden_size \\(66\\)"),
    ({"num_key_value_heads": 3}, "'num_key_value_heads' = 3: must divide num_attention_heads"),
    ({"branch_layers": 0}, "branch_layers"),
    ({"branch_layers": [1]}, "one count per non-final exit \\(2\\)"),
    ({"member_names": {"edge": 2}}, "alias 'edge' points to 2, which is not an exit"),
    # Aliases are checked as a set with the members' own ids: none may shadow another.
    ({"member_names": {"exit-3": 1}}, "alias 'exit-3' for exit 1 would be read as the member id"),
    ({"member_names": {"5": 5}}, "alias '5' for exit 5 would be read as the member id"),
    ({"member_names": {"auto": 1}}, "alias 'auto' is reserved"),
    ({"member_names": {"../up": 1}}, "alias '../up' must be letters, digits"),
    ({"member_names": {"": 1}}, "alias '' must be letters, digits"),
    ({"vocab_size": -5}, "'vocab_size' = -5: expected a positive integer"),
    ({"rope_scaling": {"rope_type": "ntk"}}, "rope_type"),
])
def test_invalid_family_configs_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        FamilyConfig.from_dict({**BASE, **change})


def test_explicit_head_dim_need_not_divide_hidden():
    config = FamilyConfig.from_dict({**BASE, "hidden_size": 66, "head_dim": 16})
    assert config.head_dim == 16


def test_member_resolution_and_layers():
    config = FamilyConfig.from_dict({**BASE, "branch_layers": [2, 1],
                                     "member_names": {"device": 1, "cloud": 5}})
    assert [config.resolve_member(m) for m in ("device", "exit-3", "3", 3, -1, "cloud")] == [1, 3, 3, 3, 5, 5]
    assert [config.member_layers(e) for e in config.exits] == [3, 4, 6]
    assert config.member_name(3) == "exit-3" and config.member_name(5) == "cloud"


def test_json_round_trip_and_malformed_file(tmp_path):
    config = FamilyConfig.from_dict({**BASE, "member_names": {"device": 1}})
    config.save(tmp_path)
    assert FamilyConfig.load(tmp_path) == config
    (tmp_path / "family.json").write_text(json.dumps({**BASE, "exits": "1,3,5"}))
    with pytest.raises(ConfigError, match="family.json: field 'exits' = '1,3,5': expected a list"):
        FamilyConfig.load(tmp_path)
    (tmp_path / "family.json").write_text(json.dumps({**BASE, "hidden": 64}))
    with pytest.raises(ConfigError, match="unknown field\\(s\\) hidden"):
        FamilyConfig.load(tmp_path)
    (tmp_path / "family.json").write_text(json.dumps({k: v for k, v in BASE.items() if k != "exits"}))
    with pytest.raises(ConfigError, match="missing required field 'exits'"):
        FamilyConfig.load(tmp_path)


@dataclass
class Inner:
    rate: float = 0.1
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    steps: int
    inner: Inner = field(default_factory=Inner)
    flag: bool = False


def test_typed_loader_checks_nested_fields():
    loaded = from_dict(Outer, {"steps": 3, "inner": {"rate": 1, "names": ["a"]}}, "run.toml")
    assert loaded == Outer(3, Inner(1.0, ["a"]))
    with pytest.raises(ConfigError, match="run.toml.inner: field 'rate' = 'fast': expected a finite number"):
        from_dict(Outer, {"steps": 3, "inner": {"rate": "fast"}}, "run.toml")
    with pytest.raises(ConfigError, match="field 'flag' = 1: expected true or false"):
        from_dict(Outer, {"steps": 3, "flag": 1}, "run.toml")
    with pytest.raises(ConfigError, match="field 'steps' = 2.5: expected an integer"):
        from_dict(Outer, {"steps": 2.5}, "run.toml")


def test_an_alias_may_name_its_own_exit_id():
    config = FamilyConfig.from_dict({**BASE, "member_names": {"exit-3": 3, "phone": 1}})
    assert config.resolve_member("exit-3") == 3 and config.resolve_member("phone") == 1


@dataclass
class Schedule:
    kind: str = "constant"
    value: float = 1.0


@dataclass
class Weights:
    weights: dict[str, float | Schedule] = field(default_factory=dict)


def test_a_table_for_a_union_names_its_own_bad_field():
    loaded = from_dict(Weights, {"weights": {"a": 0.5, "b": {"value": 2}}}, "run.toml")
    assert loaded.weights == {"a": 0.5, "b": Schedule(value=2.0)}
    with pytest.raises(ConfigError, match=r"^run.toml.weights\['b'\]: unknown field\(s\) valu;"):
        from_dict(Weights, {"weights": {"b": {"valu": 2}}}, "run.toml")
    with pytest.raises(ConfigError, match=r"field 'weights'\['b'\] = 'x': expected float or Schedule"):
        from_dict(Weights, {"weights": {"b": "x"}}, "run.toml")
