"""The demo (``make demo``): synthetic cohort -> bundle training -> evaluation -> package -> export -> inference.

Every step goes through the interfaces a user has: ``volcnn synth``, ``python -m monai.bundle run training`` with
CPU-sized overrides on the command line (the bundle keeps its GPU defaults), the evaluate overlay, ``volcnn package``
(the run's recorded settings and best weights in a copy of the bundle, checked offline, ``models/model.ts``),
``volcnn export`` and ``volcnn infer``.

    python -m pipelines.demo --out demo_out [--cases 40] [--epochs 15]     # from the repository root
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

from pipelines.common import REPO
from volcnn.data import synthesize_cohort

BUNDLE = REPO / "bundles" / "lung_nodule_ct_classification"

#: CPU-sized training settings, given to the bundle on the command line (its own defaults target a GPU); the run
#: records the model's (run.json) and ``volcnn package`` writes them into the bundle the demo infers with
CPU_SETTINGS = {
    # unpadded convolutions: the dense heat map (one trunk pass over the CT) equals window-by-window evaluation, so
    # inference takes seconds; a padded resnet10 at 32^3 leans on its patches' zero padding and its dense map differs
    # from its windows by up to 0.42 (the runner's check then falls back to windows, minutes per CT)
    "network_def": "valid_cnn3d",
    "patch_size": [32, 32, 32],
    "pixdim": [1.0, 1.0, 1.0],
    "margin": 6,
    "batch_size": 16,
    "learning_rate": 0.001,
    # figures that repeat run to run on one machine: fp32 with deterministic kernels. bf16 autocast trains faster on
    # CPUs with native bf16 (`train` section of the benchmark, pipelines/PERFORMANCE.md) but oneDNN's bf16 weight
    # gradients differ run to run, so it is not used here
    "amp": False,
    "deterministic": True,
    "num_workers": 0,
    # channels-last 3D weights: faster for valid_cnn3d, nothing gained for resnet10 (`compute` section of the
    # benchmark, pipelines/PERFORMANCE.md), so the bundle's default stays off
    "channels_last": True,
}
#: ``volcnn infer`` options: a heat map on a 4 mm grid, dense where the network splits and agrees with its windows
INFER_OPTIONS = ["--stride-mm", "4.0", "--heatmap-method", "auto"]


def _overrides(settings: dict[str, object]) -> list[str]:
    """``--key value`` for ``python -m monai.bundle run`` (its command line is parsed by fire: ``False``, not
    ``false``, is a boolean; a list is one argument without spaces)."""
    args = []
    for key, value in settings.items():
        text = json.dumps(value, separators=(",", ":")) if isinstance(value, list) else str(value)
        args += [f"--{key}", text]
    return args


def _run(cmd: list[str], what: str) -> None:
    print(f"\n=== {what}\n$ {' '.join(cmd)}", flush=True)
    start = time.time()
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"demo: {what} failed with exit code {result.returncode}")
    print(f"=== {what}: {time.time() - start:.0f} s", flush=True)


def _nodules_of(nodules_csv: Path, case: str) -> list[list[float]]:
    """Planted nodules of ``case``: ``[x, y, z, diameter_mm]`` (RAS mm), from the cohort's ``nodules.csv``."""
    with open(nodules_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["case"] == case]
    return [[float(r["x_ras"]), float(r["y_ras"]), float(r["z_ras"]), float(r["diameter_mm"])] for r in rows]


def _test_annotations(nodules_csv: Path, cases: set[str], out: Path) -> Path:
    """The rows of the cohort's ``nodules.csv`` for ``cases`` (the unseen test CTs), as ``out/test_nodules.csv``."""
    with open(nodules_csv, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r["case"] in cases]
        fields = list(reader.fieldnames or [])
    path = out / "test_nodules.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo_out", help="output folder (replaced)")
    parser.add_argument("--cases", type=int, default=40, help="synthetic cases (patients)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs")
    parser.add_argument("--seed", type=int, default=0, help="cohort and training seed")
    parser.add_argument("--negatives", type=int, default=30, help="negative candidates per case")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = args.out.resolve()
    data, bundle, train, infer = out / "data", out / "bundle", out / "train", out / "inference"
    start = time.time()

    print(f"=== synthetic cohort: {args.cases} small cases -> {data}", flush=True)
    summary = synthesize_cohort(
        data, cases=args.cases, seed=args.seed, size="small", negatives=args.negatives, progress=True
    )
    for split, counts in summary["splits"].items():
        c = counts["candidates"]
        pos, neg = c["positive"], c["negative"]
        print(f"  {split:<10} {counts['cases']:>3} patients, {pos:>3} nodule / {neg:>4} non-nodule candidates")

    common = ["--bundle_root", str(BUNDLE), "--dataset_dir", str(data), "--datalist", str(data / "datalist.json"),
              "--output_dir", str(train),
              *_overrides({**CPU_SETTINGS, "max_epochs": args.epochs, "seed": args.seed})]  # fmt: skip
    monai = [sys.executable, "-m", "monai.bundle", "run"]
    _run([*monai, "training", "--config_file", str(BUNDLE / "configs" / "train.json"), *common], "training")
    configs = f"['{BUNDLE / 'configs' / 'train.json'}','{BUNDLE / 'configs' / 'evaluate.json'}']"
    _run([*monai, "--config_file", configs, *common], "evaluation on the unseen test patients")
    _run([sys.executable, "-m", "volcnn", "package", str(train), "--out", str(bundle)],
         "packaging the run as a bundle (its recorded settings, best weights, offline check)")  # fmt: skip

    test_images = sorted({e["image"] for e in json.loads((data / "datalist.json").read_text())["test"]})
    unseen = [str(data / image) for image in test_images]
    _run([sys.executable, "-m", "volcnn", "export", "--bundle", str(bundle)], "export to TorchScript and ONNX")
    _run([sys.executable, "-m", "volcnn", "infer", "--bundle", str(bundle), "--out", str(infer), "--explain", "1",
          *INFER_OPTIONS, *unseen],
         f"whole-CT inference on the {len(unseen)} unseen CTs, Grad-CAM of each top finding")  # fmt: skip
    test_nodules = _test_annotations(data / "nodules.csv", {Path(u).name.split(".")[0] for u in unseen}, out)
    _run([sys.executable, "-m", "volcnn", "evaluate-findings", str(infer), "--annotations", str(test_nodules)],
         "detection evaluation (FROC / CPM) of the unseen CTs")  # fmt: skip

    metrics = json.loads((train / "metrics.json").read_text())
    case = Path(unseen[0]).name.split(".")[0]
    findings = json.loads((infer / case / "findings.json").read_text())
    m = metrics["metrics"]
    auc, ci = m.get("auc"), m.get("auc_ci95")
    print("\n" + "=" * 72)
    print(
        f"evaluation on {m['num_samples']} candidates of unseen test patients "
        f"({m['num_positive']} nodules, {m['num_negative']} non-nodules):"
    )
    print(f"  ROC AUC {_fmt(auc)}  (95% bootstrap CI {_fmt(ci[0]) if ci else 'n/a'}-{_fmt(ci[1]) if ci else 'n/a'})")
    print(
        f"  at the threshold {m['threshold']:.3f} chosen on {m['threshold_source']}: sensitivity "
        f"{_fmt(m['sensitivity'])}, specificity {_fmt(m['specificity'])}, precision {_fmt(m['precision'])}, "
        f"F1 {_fmt(m['f1'])}; calibration error (ECE) {_fmt(m['ece'])}"
    )
    at = m.get("at_target_sensitivity")
    if at:
        print(
            f"  at the validation threshold for sensitivity >= {at['target']}: sensitivity {_fmt(at['sensitivity'])}, "
            f"specificity {_fmt(at['specificity'])}"
        )
    print(f"  nodule vs non-nodule separated (ROC AUC >= 0.9): {'yes' if auc is not None and auc >= 0.9 else 'NO'}")
    print(f"evaluation report: {train / 'report.html'}  (metrics.json, predictions.csv, roc/confusion/calibration.png)")
    print(f"TensorBoard logs:  tensorboard --logdir {train / 'tensorboard'}")
    print(f"trained bundle:    {bundle}  (models/model.pt, models/model.ts, models/model.onnx)")
    print(f"inference on {case}: score {findings['score']:.3f}, {len(findings['findings'])} findings")
    for truth in _nodules_of(data / "nodules.csv", case):
        if not findings["findings"]:
            print(f"  planted nodule {truth[3]:.1f} mm at RAS {truth[:3]}: no finding")
            continue
        near = min(findings["findings"], key=lambda f: math.dist(f["center_ras_mm"], truth[:3]))
        gap = math.dist(near["center_ras_mm"], truth[:3])
        print(
            f"  planted nodule {truth[3]:.1f} mm at RAS {truth[:3]}: nearest finding {gap:.1f} mm away"
            f" (p={near['probability']:.2f})"
        )
    for e in findings.get("explanations", []):
        print(f"  explanation of finding {e['rank']} (p={e['probability']:.2f}): {infer / case / e['png']}")
    froc = json.loads((infer / "froc.json").read_text())
    print(f"  detection: CPM {froc['cpm']:.3f} over {froc['num_scans']} scan(s) ({infer / 'froc.png'})")
    print(f"  heat map:  {infer / case / 'heatmap.nii.gz'}")
    print(f"  findings:  {infer / case / 'findings.json'}")
    print(f"  summary:   {infer / 'summary.csv'}")
    print(f"total time: {time.time() - start:.0f} s")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
