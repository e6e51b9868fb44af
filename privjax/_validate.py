"""Tiny argument checks shared by the primitives; errors name the bad value."""

import math


def positive(name: str, value: float) -> float:
  if not (isinstance(value, (int, float)) and value > 0 and not math.isnan(value)):
    raise ValueError(f"{name}={value!r} must be > 0")
  return value


def non_negative(name: str, value: float) -> float:
  if not (isinstance(value, (int, float)) and value >= 0 and not math.isnan(value)):
    raise ValueError(f"{name}={value!r} must be >= 0")
  return value


def probability(name: str, value: float) -> float:
  if not (isinstance(value, (int, float)) and 0 <= value <= 1):
    raise ValueError(f"{name}={value!r} must be in [0, 1]")
  return value


def one_of(name: str, value, choices) -> object:
  if value not in choices:
    raise ValueError(f"{name}={value!r} must be one of {sorted(choices)}")
  return value
