"""A single self-contained HTML evaluation report.

Everything the page needs is inside the file: images are embedded as base64 ``data:`` URIs, the CSS is inline, and
there are no scripts, fonts or links, so the report opens offline and can be mailed or archived as one file. A
Content-Security-Policy ``<meta>`` makes the browser refuse anything else. Every piece of text from the caller is
passed through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import importlib.metadata
import math
import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from volcnn.core.atomic import atomic_write_text

__all__ = ["format_value", "image_data_uri", "volcnn_version", "write_report_html"]

MISSING = "\u2014"
"""How ``None`` is shown (an em dash)."""

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; border-bottom: 2px solid #2b6cb0; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.6em; color: #2b6cb0; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f0f4f8; }
table.kv th { width: 16em; }
table.kv table { margin: 0; }
table.data td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.data tr:nth-child(even) td { background: #fafafa; }
.figures { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; }
figure img { max-width: 520px; width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #555; margin-top: .3em; }
ul.notes li { white-space: pre-wrap; }
footer { margin-top: 2.5em; font-size: .8em; color: #777; border-top: 1px solid #ddd; padding-top: .5em; }
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_MIME_BY_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def volcnn_version() -> str:
    """``volcnn.__version__`` if set, else the installed distribution's version, else ``"unknown"``."""
    try:
        import volcnn

        version = getattr(volcnn, "__version__", None)
        if version:
            return str(version)
    except ImportError:  # pragma: no cover - we are inside volcnn
        pass
    try:
        return importlib.metadata.version("volcnn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def format_value(value: object) -> str:
    """Plain-text (not yet escaped) form of a report value.

    ``None`` -> "—"; floats to 4 significant digits; lists, tuples and arrays (e.g. a CI) as ``[lo, hi]``;
    mappings as ``{key: value, ...}``; anything else via ``str``.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return MISSING
    if isinstance(value, bool | int | str):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "\u221e" if value > 0 else "\u2212\u221e"
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _kv_table(mapping: Mapping[Any, object]) -> str:
    """A key/value table; a nested mapping becomes a sub-table in its value cell."""
    if not mapping:
        return f'<table class="kv"><tr><td>{MISSING}</td></tr></table>'
    rows = []
    for key, value in mapping.items():
        cell = _kv_table(value) if isinstance(value, Mapping) else escape(format_value(value))
        rows.append(f"<tr><th>{escape(str(key))}</th><td>{cell}</td></tr>")
    return '<table class="kv">\n' + "\n".join(rows) + "\n</table>"


def _data_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        cells = list(row)
        if len(cells) != len(columns):
            raise ValueError(f"table row {i} has {len(cells)} cells but there are {len(columns)} columns")
        tds = "".join(
            f'<td class="num">{escape(format_value(v))}</td>'
            if _is_number(v)
            else f"<td>{escape(format_value(v))}</td>"
            for v in cells
        )
        body.append(f"<tr>{tds}</tr>")
    return f'<table class="data">\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body) + "\n</tbody>\n</table>"


def image_data_uri(path: str | os.PathLike[str]) -> str:
    """The file at ``path`` as a base64 ``data:`` URI (PNG, JPEG or GIF, recognised by content; SVG by suffix)."""
    data = Path(path).read_bytes()
    mime = next((m for magic, m in _MIME_BY_MAGIC if data.startswith(magic)), None)
    if mime is None and Path(path).suffix.lower() == ".svg":
        mime = "image/svg+xml"
    if mime is None:
        raise ValueError(f"{path}: not a PNG, JPEG, GIF or SVG image")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def write_report_html(
    path: str | os.PathLike[str],
    *,
    title: str,
    summary: Mapping[str, object],
    sections: Sequence[tuple[str, Mapping[str, object]]] = (),
    images: Sequence[tuple[str, str | os.PathLike[str]]] = (),
    table: tuple[Sequence[str], Sequence[Sequence[object]]] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write a self-contained HTML report to ``path`` atomically; returns ``path`` as a Path.

    Layout: ``title``; ``summary`` as a key/value table; each ``(heading, mapping)`` of ``sections`` as a titled
    key/value table (nested mappings as sub-tables); ``images`` as ``(caption, file)`` figures embedded as
    ``data:`` URIs; ``table`` as ``(columns, rows)``; ``notes`` as a list; a footer with the generation time (UTC)
    and the volcnn version. Floats show 4 significant digits, sequences as ``[lo, hi]``, ``None`` as "—".
    A missing image file raises :class:`FileNotFoundError` before anything is written.
    """
    figures = [(caption, image_data_uri(file)) for caption, file in images]  # read every image before writing
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{escape(_CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta name="generator" content="volcnn {escape(volcnn_version())}">',
        f"<title>{escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{escape(title)}</h1>",
        "<h2>Summary</h2>",
        _kv_table(summary),
    ]
    for heading, mapping in sections:
        parts += [f"<h2>{escape(str(heading))}</h2>", _kv_table(mapping)]
    if figures:
        parts += ["<h2>Figures</h2>", '<div class="figures">']
        for caption, uri in figures:
            text = escape(str(caption))
            parts.append(f'<figure><img src="{uri}" alt="{text}"><figcaption>{text}</figcaption></figure>')
        parts.append("</div>")
    if table is not None:
        columns, rows = table
        parts += [f"<h2>Data table ({len(rows)} row{'' if len(rows) == 1 else 's'})</h2>", _data_table(columns, rows)]
    if notes:
        parts += ["<h2>Notes</h2>", '<ul class="notes">']
        parts += [f"<li>{escape(str(note))}</li>" for note in notes]
        parts.append("</ul>")
    parts += [
        f"<footer>Generated {escape(generated)} by volcnn {escape(volcnn_version())}</footer>",
        "</body>",
        "</html>",
        "",
    ]
    atomic_write_text(path, "\n".join(parts))
    return Path(path)
