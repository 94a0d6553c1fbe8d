"""Training throughput of the bundle per precision: samples/s and peak memory, fp32 vs bf16 (and fp16 on CUDA).

Runs the bundle's own ``train.json`` (through ``monai.bundle.ConfigWorkflow``) on a synthetic cohort, once per
precision, each in a fresh process so peak memory is its own. Throughput is measured over the epochs after the
first (the first fills the cache), from the first to the last iteration of each epoch, so validation is not
counted::

    python pipelines/bench_train.py                       # CPU: fp32 vs bf16
    python pipelines/bench_train.py --device cuda --network densenet121 --patch 64 --batch 32 --epochs 4

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "bundles" / "lung_nodule_ct_classification" / "configs" / "train.json"


def _measure(args: argparse.Namespace) -> dict:
    """One training run in this process; returns samples/s per epoch after the first and peak memory."""
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    amp = args.precision != "fp32"
    dtype = {"fp32": "auto", "bf16": "bfloat16", "fp16": "float16"}[args.precision]
    wf = ConfigWorkflow(
        config_file=str(TRAIN), workflow_type=None, run_id="training", dataset_dir=args.data,
        datalist=str(Path(args.data) / "datalist.json"), output_dir=args.run_dir, device=args.device,
        network_def=args.network, patch_size=[args.patch] * 3, margin=4, batch_size=args.batch,
        max_epochs=args.epochs, amp=amp, amp_dtype=dtype, num_workers=args.workers, progress=False, seed=0,
    )  # fmt: skip
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    timing: dict[str, float] = {}
    rates: list[float] = []

    def started(engine) -> None:
        timing["t0"], timing["n"] = time.perf_counter(), 0

    def iteration(engine) -> None:
        if engine.state.device.type == "cuda":
            torch.cuda.synchronize()
        timing["t1"] = time.perf_counter()
        timing["n"] += len(engine.state.output)

    def completed(engine) -> None:
        if engine.state.epoch > 1:
            rates.append(timing["n"] / (timing["t1"] - timing["t0"]))

    trainer.add_event_handler(Events.EPOCH_STARTED, started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, iteration)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, completed)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wf.run()
    result = {
        "precision": args.precision,
        "policy": trainer.amp_policy.describe(),
        "samples_per_s": statistics.median(rates) if rates else None,
        "samples_per_s_per_epoch": rates,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.device == "cuda":
        result["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--network", default="resnet10")
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3, help="total epochs; the first is not timed")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--cases", type=int, default=12)
    p.add_argument("--precisions", default=None, help="comma list of fp32,bf16,fp16 (default: per device)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.precision:  # child process: one measurement, JSON on the last stdout line
        print(json.dumps(_measure(args)))
        return 0

    from volcnn.data import synthesize_cohort

    precisions = (args.precisions or ("fp32,bf16,fp16" if args.device == "cuda" else "fp32,bf16")).split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synthesize_cohort(data, cases=args.cases, seed=0, size="small", negatives=30)
        results = []
        for precision in precisions:
            cmd = [sys.executable, __file__, "--precision", precision, "--data", str(data),
                   "--run-dir", str(Path(tmp) / precision), "--device", args.device, "--network", args.network,
                   "--patch", str(args.patch), "--batch", str(args.batch), "--epochs", str(args.epochs),
                   "--workers", str(args.workers)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = results[0]["samples_per_s"]
    where = f"device {args.device} ({platform.processor() or platform.machine()})"
    print(f"\n{args.network}, {args.patch}^3 patches, batch {args.batch}, {where}")
    print(f"{'precision':10} {'policy':42} {'samples/s':>10} {'vs fp32':>8} {'peak RSS MB':>12} {'peak GPU MB':>12}")
    for r in results:
        ratio = r["samples_per_s"] / base if base and r["samples_per_s"] else float("nan")
        gpu = f"{r['peak_gpu_mem_mb']:.0f}" if "peak_gpu_mem_mb" in r else "-"
        print(f"{r['precision']:10} {r['policy']:42} {r['samples_per_s']:10.1f} {ratio:7.2f}x {r['peak_rss_mb']:12.0f} "
              f"{gpu:>12}")  # fmt: skip
    if args.out:
        meta = {"network": args.network, "patch": args.patch, "batch": args.batch, "device": args.device,
                "epochs": args.epochs, "python": platform.python_version(), "machine": platform.machine()}  # fmt: skip
        Path(args.out).write_text(json.dumps({"config": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
