"""Parsing of the `file.py:key=value,...` argument of config files (big_vision style)."""

from __future__ import annotations

import types

from clip_lora_jax.errors import UserError


def parse(arg: str | None, **defaults: str | int | float | bool) -> types.SimpleNamespace:
  """`"dataset=dtd,shots=4"` over `defaults` -> namespace; values take the defaults' types."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in defaults:
      raise UserError(f"config argument {item!r}: expected key=value with key in "
                      f"{', '.join(defaults)}")
    kind = type(defaults[key])
    try:
      values[key] = (value.strip().lower() in ("1", "true", "yes")) if kind is bool \
          else kind(value.strip())
    except ValueError as e:
      raise UserError(f"config argument {item!r}: {value!r} is not a valid {kind.__name__}") from e
  return types.SimpleNamespace(**values)
