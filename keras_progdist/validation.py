"""Checks of configuration values that name the setting they reject.

Each raises `ConfigError` (a `ValueError`) whose message starts with the setting's name,
so a bad gin binding fails before any work with a message a user can act on, instead of
a `TypeError` from deep inside the code that first uses the value.
"""

from __future__ import annotations

import math
import numbers

from keras_progdist.errors import KerasProgdistError


class ConfigError(KerasProgdistError, ValueError):
    """A configuration value of the wrong type or out of range."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(name: str, value) -> int:
    """`value` as an int, if it is an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def int_at_least(name: str, value, minimum: int) -> int:
    """`value` as an int, if it is an integer >= `minimum`."""
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def nonnegative_int(name: str, value) -> int:
    return int_at_least(name, value, 0)


def positive_float(name: str, value) -> float:
    """`value` as a float, if it is a finite number > 0."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def finite_float(name: str, value) -> float:
    """`value` as a float, if it is a finite number (of either sign)."""
    if not _is_real(value) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def nonnegative_float(name: str, value) -> float:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def optional_positive_float(name: str, value) -> float | None:
    """None, or a finite number > 0 (e.g. a clipping norm that can be switched off)."""
    return None if value is None else positive_float(name, value)


def fraction(name: str, value) -> float:
    """A number in [0, 1) (dropout rates, decays)."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}.")
    return float(value)


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}.")
    return value
