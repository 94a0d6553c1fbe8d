"""The plot writers produce valid PNGs of the expected size from plain numpy / python input."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

import volcnn.evaluation.plots
from volcnn.evaluation import plot_calibration, plot_confusion, plot_roc
from volcnn.evaluation.plots import DPI

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path, width_in: float, height_in: float) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    height, width = image.shape[:2]
    assert abs(width - width_in * DPI) <= 2 and abs(height - height_in * DPI) <= 2, image.shape
    assert image.std() > 0.01  # something was drawn, not a blank canvas
    return image


def test_roc_single_curve(tmp_path):
    fpr, tpr = [0.0, 0.1, 0.3, 1.0], [0.0, 0.6, 0.9, 1.0]
    out = plot_roc({"test": (fpr, tpr)}, tmp_path / "roc.png")
    assert out == tmp_path / "roc.png"
    _check_png(out, 5, 5)


def test_roc_multi_curve_with_auc_ci_and_operating_points(tmp_path):
    grid = np.linspace(0, 1, 50)
    curves = {name: (grid, grid**p) for name, p in [("benign", 0.3), ("malignant", 0.5), ("<other> $x$", 0.8)]}
    out = plot_roc(
        curves,
        str(tmp_path / "sub" / "roc.png"),  # str path, parent created
        aucs={"benign": 0.91, "malignant": float("nan"), "<other> $x$": None},
        ci={"benign": (0.85, 0.95), "malignant": None},
        operating_points={"benign": (0.2, 0.8), "unknown": (0.5, 0.5), "malignant": (float("nan"), 0.1)},
        title="ROC $5",
    )
    _check_png(out, 5, 5)


def test_roc_drops_nonfinite_points_and_rejects_ragged_curves(tmp_path):
    plot_roc({"a": ([0.0, np.nan, 1.0], [0.0, 0.5, 1.0])}, tmp_path / "nan.png")
    assert (tmp_path / "nan.png").exists()
    with pytest.raises(ValueError, match="points"):
        plot_roc({"a": ([0.0, 1.0], [0.0, 0.5, 1.0])}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_two_classes(tmp_path, normalize):
    out = plot_confusion([[50, 3], [7, 40]], ["benign", "malignant"], tmp_path / "cm.png", normalize=normalize)
    _check_png(out, 5.8, 5.0)


def test_confusion_four_classes_with_empty_row(tmp_path):
    matrix = np.array([[10, 2, 0, 1], [0, 0, 0, 0], [3, 1, 20, 2], [0, 0, 4, 30]])
    out = plot_confusion(matrix, ["a", "b", "c", "a rather long name"], tmp_path / "cm4.png", title="<4 class>")
    _check_png(out, 0.9 * 4 + 3 + 0.8, 0.9 * 4 + 3)


def test_confusion_text_contrast(tmp_path):
    """The darkest cell is drawn with white text: its centre holds white pixels surrounded by dark blue."""
    out = plot_confusion([[1000, 0], [0, 1000]], ["x", "y"], tmp_path / "cm.png")
    image = _check_png(out, 5.8, 5.0)[..., :3]
    dark = image.sum(axis=2) < 1.0  # deep blue of the top-left cell
    assert dark.any()
    rows, cols = np.nonzero(dark)
    cell = image[rows.min() : rows.max(), cols.min() : cols.max()]
    assert (cell.min(axis=2) > 0.9).any()  # white text pixels inside the dark cell


def test_confusion_rejects_mismatched_names(tmp_path):
    with pytest.raises(ValueError, match="class names"):
        plot_confusion([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "cm.png")
    with pytest.raises(ValueError, match="square"):
        plot_confusion([[1, 2, 3], [3, 4, 5]], ["a", "b"], tmp_path / "cm.png")


def test_calibration_skips_empty_bins(tmp_path):
    nan = float("nan")
    conf = [0.05, nan, 0.25, nan, 0.45, 0.55, nan, 0.75, 0.85, 0.95]
    freq = [0.0, nan, 0.2, nan, 0.5, 0.5, nan, 0.8, 0.9, 1.0]
    count = [12, 0, 4, 0, 8, 9, 0, 10, 20, 40]
    out = plot_calibration(conf, freq, count, tmp_path / "cal.png", ece=0.0312)
    _check_png(out, 5, 6.5)


def test_calibration_all_bins_empty_and_no_ece(tmp_path):
    nan = np.full(5, np.nan)
    out = plot_calibration(nan, nan, np.zeros(5), tmp_path / "cal.png", ece=None, title="empty")
    _check_png(out, 5, 6.5)
    with pytest.raises(ValueError, match="same length"):
        plot_calibration([0.5], [0.5, 0.5], [1], tmp_path / "bad.png")


def test_plots_leave_pyplot_and_backend_alone(tmp_path):
    """Plotting registers no pyplot figure and does not change the configured backend.

    (pyplot itself is already imported in the test process by monai, via ``volcnn.io``; the report modules
    must not use it, which the source check below enforces.)
    """
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.rcParams._get("backend")  # _get: reading "backend" normally would resolve it
    figures = plt.get_fignums()
    plot_roc({"t": ([0, 1], [0, 1])}, tmp_path / "r.png")
    plot_confusion([[1, 0], [0, 1]], ["a", "b"], tmp_path / "c.png")
    plot_calibration([0.5], [0.5], [1], tmp_path / "k.png")
    assert plt.get_fignums() == figures
    assert matplotlib.rcParams._get("backend") == backend
    for module in Path(volcnn.evaluation.plots.__file__).parent.glob("*.py"):
        tree = ast.parse(module.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {
            f"{node.module}.{alias.name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        assert not {"matplotlib.pyplot", "matplotlib.pylab", "pylab"} & imported, module.name
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in {"use", "switch_backend"}]
        assert not calls, module.name
