"""Shared argument types: clear messages naming the value."""

from __future__ import annotations

import argparse
import math

import pytest

from fedtune.cliargs import epsilon_arg, optional_int_arg


def test_epsilon_arg() -> None:
    assert epsilon_arg("8") == 8.0 and math.isinf(epsilon_arg("inf"))
    for bad in ("0", "-1", "nan", "eight"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            epsilon_arg(bad)


def test_optional_int_arg() -> None:
    assert optional_int_arg("12") == 12 and optional_int_arg("all") is None and optional_int_arg("") is None
    with pytest.raises(argparse.ArgumentTypeError, match="'1.5'"):
        optional_int_arg("1.5")
