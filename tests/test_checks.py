import math

import pytest

from familial import checks
from familial.config import ConfigError


@pytest.mark.parametrize("value", [0, -3, True, 2.0, "4", None])
def test_positive_int_refuses_what_is_not_a_count_in_the_callers_error(value):
    with pytest.raises(ConfigError, match=rf"^f.json: field 'steps' = {value!r}: expected a positive integer$"):
        checks.positive_int("f.json: field 'steps'", value, error=ConfigError)


def test_checks_return_the_value_they_pass():
    assert checks.positive_int("n", 3) == 3
    assert checks.integer("k", 0, minimum=0, maximum=0) == 0
    assert checks.finite_number("loss", 2) == 2
    assert checks.positive_number("std", 0.02) == 0.02
    assert checks.probability("top_p", 1.0) == 1.0
    assert checks.one_of("init", "clone", ("random", "clone")) == "clone"


@pytest.mark.parametrize("check, value", [
    (checks.finite_number, math.nan), (checks.finite_number, math.inf), (checks.finite_number, False),
    (checks.positive_number, 0), (checks.positive_number, math.inf), (checks.positive_number, math.nan),
    (checks.probability, 0), (checks.probability, 1.5), (checks.probability, math.nan),
    (checks.probability, True)])
def test_numbers_are_finite_and_never_bools(check, value):
    with pytest.raises(ValueError, match=r"^x = .*: expected "):
        check("x", value)


def test_one_of_names_the_choices_unless_told_otherwise():
    with pytest.raises(ValueError, match=r"^init = 'zero': expected one of 'random', 'clone'$"):
        checks.one_of("init", "zero", ("random", "clone"))
    with pytest.raises(ValueError, match=r"^init = 'zero': expected 'random' or 'clone'$"):
        checks.one_of("init", "zero", ("random", "clone"), "'random' or 'clone'")


def test_ranges_say_which_bounds_are_open():
    assert checks.in_range("epsilon", 0.5, 0, 1, open_low=True, open_high=True) == 0.5
    with pytest.raises(ValueError, match=r"^epsilon = 1: expected a number in \(0, 1\)$"):
        checks.in_range("epsilon", 1, 0, 1, open_low=True, open_high=True)
    with pytest.raises(ValueError, match=r"^held_out = -0.1: expected a number in \[0, 1\]$"):
        checks.in_range("held_out", -0.1, 0, 1)


@pytest.mark.parametrize("check, value, expected", [
    (checks.non_negative_int, -1, "0 or more"), (checks.non_negative_int, False, "0 or more"),
    (checks.integers, [], "a non-empty list of integers"), (checks.integers, [1, True], "a non-empty list"),
    (checks.boolean, 1, "true or false"), (checks.boolean, "yes", "true or false")])
def test_counts_lists_and_switches_refuse_lookalikes(check, value, expected):
    with pytest.raises(ValueError, match=rf"^x = .*: expected {expected}"):
        check("x", value)


def test_a_rule_between_fields_names_the_field_in_the_same_style():
    with pytest.raises(ConfigError, match=r"^f.json: field 'heads' = 3: must divide hidden_size \(64\)$"):
        checks.require(64 % 3 == 0, checks.field("f.json", "heads"), 3, "must divide hidden_size (64)",
                       error=ConfigError)
    checks.require(True, "unused", None, "never raised")
