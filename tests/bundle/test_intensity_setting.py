"""A bundle trained on volumes that are not in HU (``--intensity percentile``): the run records the setting, the
packaged bundle carries it into inference and its metadata, and its network, preprocessed that way, gives the
evaluate overlay's probabilities; preprocessed as HU it would not."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.bundle.test_package import EVALUATE, TRAIN, _window_probabilities, _workflow
from volcnn.cli import main
from volcnn.data import synthesize_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """The tiny synthetic cohort exported as 8-bit images: HU [-1100, 400] -> 0..255, as a PNG stack would be."""
    out = tmp_path_factory.mktemp("intensity_cohort")
    synthesize_cohort(out, cases=6, seed=3, size="tiny", negatives=6)
    for path in sorted((out / "images").glob("*.nii.gz")):
        image = nib.load(path)
        hu = np.asarray(image.dataobj, dtype=np.float32)
        eight_bit = np.clip(np.rint((hu + 1100.0) / 1500.0 * 255.0), 0, 255).astype(np.uint8)
        nib.save(nib.Nifti1Image(eight_bit, image.affine), path)
    return out


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("intensity_run")
    _workflow(str(TRAIN), "training", cohort, out, intensity="percentile").run()
    _workflow([str(TRAIN), str(EVALUATE)], "run", cohort, out, intensity="percentile").run()
    return out


def test_percentile_run_packages_and_infers_as_trained(run, cohort, tmp_path):
    assert json.loads((run / "run.json").read_text())["intensity"] == "percentile"
    bundle = tmp_path / "bundle"
    assert main(["package", str(run), "--out", str(bundle)]) == 0
    for name in ("train.json", "inference.json"):
        assert json.loads((bundle / "configs" / name).read_text())["intensity"] == "percentile", name
    image_meta = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]
    assert image_meta["image"]["format"] == "magnitude"

    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = np.asarray([float(r["prob"]) for r in rows])
    got, inside = _window_probabilities(bundle, rows, cohort)
    assert inside.sum() >= 4 and expected[inside].std() > 1e-3
    np.testing.assert_allclose(got[inside], expected[inside], atol=1e-5, rtol=0)
    as_hu = _window_probabilities(bundle, rows, cohort, intensity="hu")[0]
    assert np.abs(as_hu - expected).max() > 1e-3  # the setting matters: HU-windowing 8-bit values is another input

    scan = cohort / rows[0]["image"]
    assert main(["infer", "--bundle", str(bundle), "--out", str(tmp_path / "inf"), "--device", "cpu", str(scan)]) == 0
    doc = json.loads((tmp_path / "inf" / scan.name.split(".")[0] / "findings.json").read_text())
    assert doc["settings"]["intensity"] == "percentile" and doc["settings"]["skip_air"] is False
