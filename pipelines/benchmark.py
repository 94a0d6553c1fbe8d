"""The performance benchmark: every comparison side by side in one run, a table, and JSON (``--out``).

    python -m pipelines.benchmark --out results.json          # CPU: about 11 minutes on 2 cores
    python -m pipelines.benchmark --device cuda --out gpu.json

Run from the repository root (``pipelines`` is a package there, not an installed one).

Sections (each measurement in its own process, medians of ``--repeats`` runs or of the epochs after the first):

1. **preprocessing** one ``full`` synthetic CT (load, RAS, 1 mm, HU window): ours vs SimpleITK (read,
   ``ResampleImageFilter``, window), time ratio and peak RSS of each (``pipelines.bench_preprocess``);
2. **training**: patches/s and epoch time of the bundle's data path vs the naive MONAI-tutorial path on the same
   cohort, model and batch, the share of step time spent waiting for data, fp32 vs bf16
   (``pipelines.bench_train``);
3. **inference**: whole-CT heat map, dense vs MONAI ``SlidingWindowInferer``, with the model trained in section 2,
   on the central slab of the ``full`` CT (``pipelines.bench_inference``);
4. **compute**: forward+backward+step samples/s per network, precision and variant (eager, channels-last 3D,
   ``torch.compile``); on CUDA also the fraction of the bf16 FLOP ceiling and GPU utilisation
   (``pipelines.bench_compute``);
5. **scaling**: training samples/s of the bundle under torchrun DDP with 1 process vs 2 (CPU, gloo: 1 process with
   every core's thread vs 2 processes with half the threads each) or vs one process per GPU (CUDA, nccl), on the
   section-2 cohort, runs alternating (``pipelines.bench_scaling``).

The JSON's top-level numbers: ``preprocess_time_ratio_vs_sitk`` (ours / SimpleITK), ``epoch_speedup_vs_naive``
(naive epoch time / ours), ``data_wait_fraction``, ``heatmap_speedup_vs_swi`` (SWI time / ours) and
``heatmap_agreement_max_abs``, ``ddp_samples_per_s_1proc`` and ``ddp_samples_per_s_<P>proc`` (``P`` =
``ddp_procs``), ``ddp_scaling_ratio`` (P-process / 1-process samples/s) and ``ddp_scaling_efficiency`` (ratio / P);
``targets`` says which of the CPU targets hold; ``machine`` says where it ran.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines import bench_compute, bench_inference, bench_preprocess, bench_scaling, bench_train
from pipelines.common import REPO

#: the CPU targets of issue 6: (key, comparison, value)
TARGETS = (
    ("preprocess_time_ratio_vs_sitk", "<=", 1.0),
    ("epoch_speedup_vs_naive", ">=", 10.0),
    ("data_wait_fraction", "<=", 0.10),
)


def machine_info() -> dict[str, Any]:
    """Where the benchmark ran: CPU model and cores, memory, library versions, GPU, the git commit."""
    import monai
    import SimpleITK as sitk
    import torch

    from volcnn.engines.amp import cpu_has_fast_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        rev = commit.stdout.strip() or None
    except OSError:
        rev = None
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gb": mem_gb,
        "torch_threads": torch.get_num_threads(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "simpleitk": sitk.Version.VersionString(),
        "os": platform.platform(),
        "git_commit": rev,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


def check_targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each CPU target with its measured value and whether it holds (``None`` when not measured)."""
    out = {}
    for key, op, value in TARGETS:
        got = results.get(key)
        ok = None if got is None else (got <= value if op == "<=" else got >= value)
        out[key] = {"target": f"{op} {value}", "value": got, "holds": ok}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results (written atomically)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--repeats", type=int, default=3, help="runs per timed comparison (median); at least 3")
    p.add_argument("--sections", default="preprocess,train,inference,compute,scaling", help="comma list to run")
    p.add_argument("--slab", type=int, default=40, help="central slices of the full CT for the inference section")
    p.add_argument("--epochs", type=int, default=4, help="training epochs per configuration (first not timed)")
    p.add_argument("--cases", type=int, default=8, help="synthetic patients of the training cohort")
    p.add_argument("--negatives", type=int, default=20, help="negative candidates per patient")
    p.add_argument("--compute-steps", type=int, default=8, help="timed steps per compute configuration")
    p.add_argument("--scaling-epochs", type=int, default=3, help="epochs per scaling run (first not timed)")
    args = p.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    start = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(), "device": device, "repeats": args.repeats}
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gb']} GB, GPU {m['gpu']}; {device}", flush=True)
    tables: list[str] = []
    with tempfile.TemporaryDirectory(prefix="volcnn-bench-") as tmp:
        work = Path(tmp)
        ct = None
        if {"preprocess", "inference"} & set(sections):
            print("synthesising one full CT ...", flush=True)
            ct = str(bench_preprocess.synthetic_full_ct(work / "full"))
        if "preprocess" in sections:
            print("preprocessing: ours vs SimpleITK ...", flush=True)
            pre = bench_preprocess.run(Path(ct), repeats=args.repeats)
            report["preprocess"] = pre
            report["preprocess_time_ratio_vs_sitk"] = pre["preprocess_time_ratio_vs_sitk"]
            tables.append(bench_preprocess.table(pre))
        weights = None
        cohort = work / "cohort"
        if {"train", "scaling"} & set(sections):
            print(f"synthesising the training cohort ({args.cases} small cases) ...", flush=True)
            bench_train.training_cohort(cohort, cases=args.cases, negatives=args.negatives)
        if "train" in sections:
            configs = bench_train.CONFIGS + ((("bundle", "fp16"),) if device == "cuda" else ())
            setup = bench_train.TrainSetup(epochs=args.epochs, device=device)
            train = bench_train.run(cohort, work / "train", setup, naive_epochs=args.epochs, configs=configs)
            report["train"] = train
            for key in ("epoch_speedup_vs_naive", "data_wait_fraction"):
                report[key] = train.get(key)
            tables.append(bench_train.table(train))
            trained = work / "train" / "bundle_fp32" / "models" / "model.pt"
            weights = str(trained) if trained.is_file() else None
        if "inference" in sections:
            slab = bench_inference.central_slab(ct, args.slab, work / "slab.nii.gz")
            inf = bench_inference.run(slab, work, weights=weights, repeats=args.repeats)
            inf["config"] = {"network": "valid_cnn3d", "patch": 32, "stride_mm": 8.0, "slab_slices": args.slab,
                             "trained_weights": weights is not None}  # fmt: skip
            report["inference"] = inf
            for key in ("heatmap_speedup_vs_swi", "heatmap_agreement_max_abs"):
                report[key] = inf.get(key)
            tables.append(bench_inference.table(inf, "valid_cnn3d", 32, 8.0, 1.0))
        if "compute" in sections:
            print("compute: networks x precision x variant ...", flush=True)
            comp = bench_compute.run(device=device, interleave=True, steps=args.compute_steps)
            report["compute"] = comp
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                bench_compute.print_table(comp)
            tables.append("compute:" + text.getvalue().rstrip())
        if "scaling" in sections:
            print("scaling: DDP training, 1 process vs several ...", flush=True)
            setup = bench_train.TrainSetup(batch=8, epochs=args.scaling_epochs, device=device)
            scaling = bench_scaling.run(cohort, work / "scaling", setup, repeats=args.repeats)
            report["scaling"] = scaling
            for key, value in scaling.items():
                if key.startswith("ddp_"):
                    report[key] = value
            tables.append(bench_scaling.table(scaling))
    report["targets"] = check_targets(report)
    report["seconds"] = time.perf_counter() - start
    print("\n" + "\n\n".join(tables))
    print("\nheadline numbers (" + device + "):")
    for key in ("preprocess_time_ratio_vs_sitk", "epoch_speedup_vs_naive", "data_wait_fraction",
                "heatmap_speedup_vs_swi", "heatmap_agreement_max_abs", "ddp_scaling_ratio"):  # fmt: skip
        value = report.get(key)
        target = report["targets"].get(key)
        verdict = (
            ""
            if target is None or target["holds"] is None
            else f"  target {target['target']}: " + ("holds" if target["holds"] else "MISSED")
        )
        print(f"  {key:32} {value if value is None else f'{value:.4g}'}{verdict}")
    print(f"total {report['seconds']:.0f} s")
    if args.out:
        from volcnn.core.atomic import atomic_write_json

        atomic_write_json(args.out, report)
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
