"""Parsing of options given on the command line or in a bundle config (``--amp false`` arrives as ``'false'``)."""

from __future__ import annotations

__all__ = ["as_bool"]

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", "none", ""}


def as_bool(value: object) -> bool:
    """``True``/``False`` from a bool, a number or a string such as ``"true"``/``"False"``/``"0"``.

    Raises:
        ValueError: for any other string, rather than treating it as true.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")
