"""The HTML report is one self-contained, escaped file with the images embedded."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import numpy as np
import pytest

import volcnn
from volcnn.evaluation import plot_roc, write_report_html
from volcnn.evaluation.html import format_value, volcnn_version

EVIL = "<script>alert(1)</script>"


class _Collector(HTMLParser):
    """Every tag with its attributes, and the text, of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(text: str) -> _Collector:
    parser = _Collector()
    parser.feed(text)
    return parser


@pytest.fixture
def png(tmp_path):
    return plot_roc({"test": ([0.0, 0.2, 1.0], [0.0, 0.8, 1.0])}, tmp_path / "roc.png")


@pytest.fixture
def report(tmp_path, png):
    return write_report_html(
        tmp_path / "report.html",
        title=f"Eval {EVIL}",
        summary={"auc": 0.912345678, "auc_ci": (0.8512345, 0.9598765), "threshold": None, "n": 120, "ok": True},
        sections=[
            ("Test set", {"accuracy": np.float32(0.875), "per_class": {"benign": {"recall": 0.9}, EVIL: 0.5}}),
            (EVIL, {EVIL: EVIL}),
        ],
        images=[("ROC curve", png), (f"caption {EVIL}", str(png))],
        table=(["case", "prob", EVIL], [["c1", 0.123456789, None], [EVIL, np.float64(0.5), 1]]),
        notes=["first note", EVIL],
    )


def test_is_self_contained(report):
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    for bad in ("http://", "https://", 'src="/', "<link", "<script", "@import", "url("):
        assert bad not in text.lower(), bad
    tags = _parse(text).tags
    assert not [t for t, _ in tags if t in {"script", "link", "iframe", "object", "embed"}]
    for tag, attrs in tags:
        for name in ("src", "href"):
            if attrs.get(name) is not None:
                assert attrs[name].startswith("data:"), (tag, attrs[name][:40])


def test_images_are_embedded_png_bytes(report, png):
    text = report.read_text(encoding="utf-8")
    sources = [a["src"] for t, a in _parse(text).tags if t == "img"]
    assert len(sources) == 2
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True) == png.read_bytes()


def test_escapes_every_string(report):
    text = report.read_text(encoding="utf-8")
    assert "<script" not in text
    assert text.count("&lt;script&gt;") >= 9  # title x2, section, heading, key, value, caption x2, table x2, note
    page = _parse(text)
    assert not [t for t, _ in page.tags if t == "script"]
    assert any(EVIL in chunk for chunk in page.text)  # shown to the reader as text


def test_value_formatting(report):
    text = report.read_text(encoding="utf-8")
    assert "<td>0.9123</td>" in text  # 4 significant digits
    assert "<td>[0.8512, 0.9599]</td>" in text  # a CI as [lo, hi]
    assert "<td>\u2014</td>" in text  # None
    assert '<td class="num">0.1235</td>' in text
    assert "<td>0.875</td>" in text  # numpy scalar
    assert "<th>recall</th><td>0.9</td>" in text  # nested dicts become sub-tables
    assert text.count('<table class="kv">') == 5  # summary, 2 sections, 2 nested sub-tables


def test_footer_has_version_and_timestamp(report):
    text = report.read_text(encoding="utf-8")
    footer = re.search(r"<footer>(.*?)</footer>", text, re.S)
    assert footer is not None
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", footer.group(1))
    assert f"volcnn {volcnn.__version__}" in footer.group(1)
    assert volcnn_version() == volcnn.__version__


def test_version_falls_back_when_attribute_missing(monkeypatch):
    monkeypatch.delattr(volcnn, "__version__")
    monkeypatch.setattr("importlib.metadata.version", lambda name: "9.9.9")
    assert volcnn_version() == "9.9.9"

    def not_installed(name):
        import importlib.metadata

        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr("importlib.metadata.version", not_installed)
    assert volcnn_version() == "unknown"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "\u2014"),
        (0.1 + 0.2, "0.3"),
        (123456.0, "1.235e+05"),
        (float("nan"), "NaN"),
        (7, "7"),
        (False, "False"),
        ([0.25, None], "[0.25, \u2014]"),
        (np.array([1.0, 2.5]), "[1, 2.5]"),
        ("text", "text"),
    ],
)
def test_format_value(value, shown):
    assert format_value(value) == shown


def test_minimal_report_and_errors(tmp_path, png):
    out = write_report_html(tmp_path / "min.html", title="t", summary={})
    text = out.read_text(encoding="utf-8")
    assert "<h1>t</h1>" in text and "<img" not in text
    with pytest.raises(FileNotFoundError):
        write_report_html(tmp_path / "x.html", title="t", summary={}, images=[("gone", tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="cells"):
        write_report_html(tmp_path / "x.html", title="t", summary={}, table=(["a", "b"], [[1]]))
    assert not (tmp_path / "x.html").exists()
