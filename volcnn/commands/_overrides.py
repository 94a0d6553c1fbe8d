"""Bundle config overrides given on a ``volcnn`` command line as ``--KEY VALUE`` pairs, parsed the way
``python -m monai.bundle run`` parses them (through Python Fire): JSON / Python literals become values
(``[48,48,48]``, ``true``, ``0.001``), anything else stays a string (a path, ``$torch.device('cpu')``)."""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from typing import Any

from volcnn.core.errors import UsageError

__all__ = ["parse_overrides", "parse_value"]


def parse_value(text: str) -> Any:
    """``text`` as a JSON or Python literal when it is one, else the string itself."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return text


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """``["--dataset_dir", "D", "--patch_size", "[32,32,32]"]`` -> ``{"dataset_dir": "D", "patch_size": [32, 32, 32]}``.

    ``--KEY=VALUE`` works too; ``-`` in a key stays (config ids such as ``train#dataloader#num_workers`` are
    written with ``#``).

    Raises:
        UsageError: a token that is not ``--KEY``, or a key without a value.
    """
    out: dict[str, Any] = {}
    items = list(tokens)
    i = 0
    while i < len(items):
        token = items[i]
        if not token.startswith("--") or len(token) < 3:
            raise UsageError(f"expected --KEY VALUE config overrides, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise UsageError(f"config override --{key} has no value")
            value = items[i + 1]
            i += 1
        out[key] = parse_value(value)
        i += 1
    return out
