"""``volcnn plan``: the fingerprint's verdict on HU, 8-bit, mask and anisotropic cohorts and the settings that
follow; refusals; unreadable images; plan.json used as ``--args_file`` by the bundle's training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volcnn.cli import main
from volcnn.data import synthesize_cohort
from volcnn.planning import PLAN_KEYS, PlanError, fingerprint_dataset, intensity_verdict, plan_settings

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "bundles" / "lung_nodule_ct_classification" / "configs" / "train.json"


@pytest.fixture(scope="module")
def hu_cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plan_hu")
    synthesize_cohort(out, cases=6, seed=3, size="tiny", negatives=6)
    return out


def _variant(cohort: Path, dest: Path, convert, spacing=None) -> Path:
    """A copy of ``cohort`` whose images are ``convert(hu, index)``; ``spacing(index)`` rescales the voxel axes.
    Its ``datalist_volume.json`` alternates the labels (the tiny cohort's CTs all hold nodules)."""
    shutil.copytree(cohort, dest)
    volume = json.loads((dest / "datalist_volume.json").read_text())
    for section in ("training", "validation", "test"):
        for i, entry in enumerate(volume.get(section, [])):
            entry["label"] = i % 2
    (dest / "datalist_volume.json").write_text(json.dumps(volume))
    for i, path in enumerate(sorted((dest / "images").glob("*.nii.gz"))):
        image = nib.load(path)
        affine = image.affine.copy()
        if spacing is not None:
            affine[:3, :3] = affine[:3, :3] @ np.diag(spacing(i) / np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        nib.save(nib.Nifti1Image(convert(np.asarray(image.dataobj, dtype=np.float32), i), affine), path)
    return dest


def _eight_bit(hu: np.ndarray, _i: int = 0) -> np.ndarray:
    return np.clip(np.rint((hu + 1100.0) / 1500.0 * 255.0), 0, 255).astype(np.uint8)


def _plan(cohort: Path, datalist: str = "datalist.json", device: str = "cuda"):
    fp = fingerprint_dataset(cohort / datalist, progress=False, annotations=cohort / "annotations.csv")
    return fp, *plan_settings(fp, device)


def test_ct_in_hu_candidate_mode(hu_cohort):
    fp, settings, reasons = _plan(hu_cohort)
    assert fp["verdict"] == "ct_hu" and fp["mode"] == "candidate" and fp["read"] == fp["images"] == 6
    assert list(settings) == list(PLAN_KEYS) and set(reasons) == set(PLAN_KEYS)
    assert settings["intensity"] == "hu"
    lo, hi = settings["hu_window"]
    assert -1024 <= lo <= -900 and 0 < hi <= 1500 and (lo % 50 == 0 or lo == -1024) and hi % 50 == 0
    assert len(set(settings["pixdim"])) == 1 and settings["pixdim"][0] >= 0.5
    side = settings["patch_size"][0]
    assert settings["patch_size"] == [side] * 3 and side % 8 == 0
    d95 = 0.5 * (fp["diameter_mm"]["p90"] + fp["diameter_mm"]["max"])
    assert side * settings["pixdim"][0] >= 2 * d95 + 8 - 1e-6  # the largest objects fit twice over
    assert settings["network_def"] == ("valid_cnn3d" if side >= 32 else "seed_cnn3d")
    counts = fp["class_counts"]["training"]
    imbalanced = max(counts.values()) / min(counts.values()) > 4
    assert (settings["sampling"], settings["class_weighting"]) == (
        ("balanced", "none") if imbalanced else ("shuffle", "balanced")
    )
    cpu = plan_settings(fp, "cpu")[0]
    assert cpu["batch_size"] <= settings["batch_size"] and cpu["patch_size"] == settings["patch_size"]
    unsized = plan_settings(fingerprint_dataset(hu_cohort / "datalist.json", progress=False))[0]
    assert unsized["patch_size"][0] * unsized["pixdim"][0] >= 48  # no diameters: 48 mm


def test_eight_bit_images_are_not_windowed_as_hu(hu_cohort, tmp_path):
    cohort = _variant(hu_cohort, tmp_path / "c", _eight_bit)
    fp, settings, _ = _plan(cohort)
    assert fp["verdict"] == "scalar" and settings["intensity"] == "percentile"


def test_masks_are_kept_as_they_are(hu_cohort, tmp_path):
    cohort = _variant(hu_cohort, tmp_path / "c", lambda hu, i: (hu > -400).astype(np.uint8))
    fp, settings, _ = _plan(cohort)
    assert fp["verdict"] == "mask" and settings["intensity"] == "none"


def test_normalised_images_are_z_scored():
    g = np.random.default_rng(0)
    assert intensity_verdict(g.normal(0.1, 1.2, 5000)) == "normalised"
    assert intensity_verdict(g.normal(300.0, 80.0, 5000)) == "scalar"  # e.g. MR
    assert intensity_verdict(np.concatenate([np.full(4000, -1000.0), g.normal(40, 30, 1000)])) == "ct_hu"
    assert intensity_verdict(np.array([0.0, 1.0, 2.0, 2.0, 0.0])) == "mask"


def test_anisotropic_volumes_take_the_10th_percentile_on_the_coarse_axis(hu_cohort, tmp_path):
    zs = [4.0, 4.5, 5.0, 5.0, 5.5, 6.0]
    cohort = _variant(hu_cohort, tmp_path / "c", lambda hu, i: hu, spacing=lambda i: np.array([1.0, 1.0, zs[i]]))
    fp, settings, reasons = _plan(cohort, "datalist_volume.json")
    assert fp["mode"] == "volume" and settings["network_def"] == "resnet10"
    assert settings["pixdim"][:2] == [1.0, 1.0]
    assert settings["pixdim"][2] == pytest.approx(np.percentile(zs, 10), abs=1e-3) and "anisotropy" in reasons["pixdim"]
    assert all(p % 16 == 0 for p in settings["patch_size"])
    assert np.prod(settings["patch_size"]) <= 1.5 * 128**3
    same = _variant(hu_cohort, tmp_path / "iso", lambda hu, i: hu)
    fp, iso, _ = _plan(same, "datalist_volume.json")
    assert iso["pixdim"] == [pytest.approx(q["median"], abs=1e-3) for q in fp["spacing_mm"]]


def test_mixed_kinds_and_single_class_are_refused(hu_cohort, tmp_path):
    mixed = _variant(hu_cohort, tmp_path / "m", lambda hu, i: _eight_bit(hu) if i % 2 else hu)
    fp = fingerprint_dataset(mixed / "datalist.json", progress=False)
    with pytest.raises(PlanError, match=r"not all of one kind \(3 ct_hu \(images/.*\), 3 scalar \(images/"):
        plan_settings(fp)
    data = json.loads((hu_cohort / "datalist.json").read_text())
    one = tmp_path / "one.json"
    one.write_text(json.dumps({**data, "training": [e for e in data["training"] if e["label"] == 0]}))
    with pytest.raises(PlanError, match="one class only"):
        plan_settings(fingerprint_dataset(one, hu_cohort, progress=False))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**data, "training": []}))
    with pytest.raises(PlanError, match="no training entries"):
        fingerprint_dataset(empty, hu_cohort, progress=False)


def test_cli_writes_the_plan_and_keeps_going_past_an_unreadable_image(hu_cohort, tmp_path, capsys):
    cohort = _variant(hu_cohort, tmp_path / "c", lambda hu, i: hu)
    broken = sorted((cohort / "images").glob("*.nii.gz"))[0]
    broken.write_bytes(b"not a nifti")
    out = tmp_path / "p" / "plan.json"
    assert main(["plan", str(cohort / "datalist.json"), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert list(json.loads(out.read_text())) == sorted(PLAN_KEYS)
    fp = json.loads((out.parent / "fingerprint.json").read_text())
    assert fp["read"] == 5 and fp["failed"][0]["image"] == f"images/{broken.name}"
    report = (out.parent / "plan.md").read_text()
    assert '| `intensity` | `"hu"` |' in report and "1 unreadable" in report
    assert f"not used: images/{broken.name}" in capsys.readouterr().out
    for path in (cohort / "images").glob("*.nii.gz"):
        path.write_bytes(b"")
    assert main(["plan", str(cohort / "datalist.json"), "--out", str(tmp_path / "q.json"), "--no-progress"]) == 1
    assert not (tmp_path / "q.json").exists()


def test_plan_json_is_the_bundles_args_file(hu_cohort, tmp_path):
    plan = tmp_path / "plan.json"
    argv = ["plan", str(hu_cohort / "datalist.json"), "--out", str(plan), "--device", "cpu", "--no-progress",
            "--annotations", str(hu_cohort / "annotations.csv")]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN),
           "--args_file", str(plan), "--bundle_root", str(TRAIN.parents[1]), "--dataset_dir", str(hu_cohort),
           "--datalist", str(hu_cohort / "datalist.json"), "--output_dir", str(out), "--max_epochs", "1",
           "--device", "$torch.device('cpu')", "--amp", "False", "--num_workers", "0",
           "--progress", "False"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    planned = json.loads(plan.read_text())
    for key in ("network_def", "pixdim", "patch_size", "margin", "intensity", "hu_window"):
        assert record[key] == planned[key], key
