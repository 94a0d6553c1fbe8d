"""Data-parallel scaling: training samples/s of the bundle with 1 process vs N processes under torchrun.

Every run is the bundle's own ``train.json`` with the ``multi_gpu_train.json`` overlay (DistributedDataParallel,
per-rank shards of the training cache), started by ``torchrun --standalone --nproc_per_node P`` in a fresh set of
processes, on the same synthetic cohort, model, per-process batch and precision (fp32). Only the number of
processes (and, on CPU, how the cores are split between them) differs:

- **CPU** (gloo): 1 process with all ``C`` cores (``OMP_NUM_THREADS=C``) vs ``P`` processes (default 2) with
  ``C // P`` threads each, so both use the same cores; on 2 cores: 1 process x 2 threads vs 2 processes x 1 thread.
- **CUDA** (nccl): 1 process on one GPU vs one process per visible GPU.

``batch`` is per process, as in the bundle (``batch_size`` is each rank's batch), so ``P`` processes take ``P``
times the global batch and an epoch has about ``1/P`` of the steps. The default, 8, makes the 82 training patches
of the default cohort 10 steps on 1 process and 5 per rank on 2: the same 80 samples per epoch either way.

Throughput is counted over all ranks: per epoch after the first (the first is warm-up; the cache is filled before
it and validation is off), the samples every rank trained, summed, over the slowest rank's time from
``EPOCH_STARTED`` to its last ``ITERATION_COMPLETED``. Medians over the timed epochs of a run, then over
``repeats`` runs; the runs of 1 and of P processes alternate, so that other load on a shared machine falls on both
alike (each run also records the 1-minute load average before and after it)::

    python -m pipelines.bench_scaling                        # CPU: 1 process x 2 threads vs 2 processes x 1 thread
    python -m pipelines.bench_scaling --repeats 5 --out scaling.json
    python -m pipelines.bench_scaling --device cuda --network densenet121 --patch 64 --batch 32

``ratio`` is samples/s of P processes over that of 1; ``efficiency`` is that over P (1.0 is linear scaling).
:func:`run` is what :mod:`pipelines.benchmark` calls; ``--worker`` is the entry point each torchrun process runs
(``torchrun ... -m pipelines.bench_scaling --worker``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.bench_train import EpochClock
from pipelines.common import REPO, child_env

CONFIGS = REPO / "bundles" / "lung_nodule_ct_classification" / "configs"
TRAIN = CONFIGS / "train.json"
MULTI = CONFIGS / "multi_gpu_train.json"


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """One torchrun process: train the bundle under DDP, time each epoch over all ranks; rank 0 writes the JSON."""
    import torch
    import torch.distributed as dist
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(TRAIN), str(MULTI)], workflow_type=None, run_id="training", dataset_dir=args.data,
        datalist=str(Path(args.data) / "datalist.json"), output_dir=args.run_dir, network_def=args.network,
        patch_size=[args.patch] * 3, margin=args.margin, batch_size=args.batch, max_epochs=args.epochs, amp=False,
        progress=False, seed=0, val_interval=10**6,
    )  # fmt: skip
    wf.initialize()  # the overlay's "initialize" joins the process group (gloo, or nccl on CUDA)
    trainer = wf.parser.get_parsed_content("train#trainer")
    device = torch.device(wf.parser.get_parsed_content("device"))
    cuda = device.type == "cuda"
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = str(dist.get_backend())
    reduce_on = device if backend == "nccl" else torch.device("cpu")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    clock = EpochClock(sync)
    epochs: list[dict[str, float]] = []

    def completed(engine) -> None:  # every rank calls the same collectives here, in the same order
        seconds = clock.seconds
        total = torch.tensor([clock.samples, clock.steps], dtype=torch.float64, device=reduce_on)
        slowest = torch.tensor([seconds, clock.wait / seconds if seconds else 0.0], dtype=torch.float64,
                               device=reduce_on)  # fmt: skip
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        samples, span = float(total[0]), float(slowest[0])
        epochs.append(
            {
                "epoch": engine.state.epoch,
                "seconds": span,
                "samples": samples,
                "steps_per_rank": float(total[1]) / world,
                "samples_per_s": samples / span if span > 0 else 0.0,
                "data_wait_fraction": float(slowest[1]),
            }
        )

    clock.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, completed)
    wf.run()
    timed = [e for e in epochs if e["epoch"] > 1]
    result: dict[str, Any] = {
        "processes": world,
        "backend": backend,
        "device": device.type,
        "threads_per_process": torch.get_num_threads(),
        "batch_per_process": args.batch,
        "global_batch": args.batch * world,
        "epochs": epochs,
        "first_epoch_s": epochs[0]["seconds"] if epochs else None,
        "samples_per_s": statistics.median(e["samples_per_s"] for e in timed) if timed else None,
        "epoch_s": statistics.median(e["seconds"] for e in timed) if timed else None,
        "data_wait_fraction": statistics.median(e["data_wait_fraction"] for e in timed) if timed else None,
    }
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(device)
    if rank == 0:  # before the teardown: the measurement is complete here
        Path(args.result).write_text(json.dumps(result) + "\n")
    wf.finalize()  # destroys the process group
    return result


def _launch(
    procs: int, threads: int, data: Path, run_dir: Path, device: str, network: str, patch: int, margin: int,
    batch: int, epochs: int,
) -> dict[str, Any]:  # fmt: skip
    """One measurement: ``torchrun --standalone`` with ``procs`` processes of ``threads`` threads; rank 0's JSON."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_dir / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "pipelines.bench_scaling", "--worker", "--data", str(data), "--run-dir", str(run_dir),
           "--result", str(result), "--network", network, "--patch", str(patch), "--margin", str(margin),
           "--batch", str(batch), "--epochs", str(epochs)]  # fmt: skip
    env = child_env({"OMP_NUM_THREADS": str(threads), "PYTHONFAULTHANDLER": "1"})
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the overlay picks nccl + cuda:LOCAL_RANK whenever CUDA is visible
    load = _load_avg()
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if not result.is_file():
        raise RuntimeError(f"scaling benchmark ({procs} processes) failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - start
    out["exit_code"] = done.returncode
    if done.returncode != 0:  # training finished and rank 0 wrote its result, then a process failed at teardown
        out["teardown_error"] = done.stderr[-3000:]
        print(f"  warning: {procs}-process run exited with {done.returncode} after writing its result", flush=True)
    out["load_avg_1m"] = [load, _load_avg()]  # before and after: other work on the machine skews the comparison
    return out


def _load_avg() -> float | None:
    """The 1-minute load average (runnable processes, this benchmark's included), ``None`` where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run(
    data: Path,
    work: Path,
    device: str = "cpu",
    network: str = "valid_cnn3d",
    patch: int = 32,
    margin: int = 6,
    batch: int = 8,
    epochs: int = 4,
    repeats: int = 3,
    procs: int | None = None,
) -> dict[str, Any]:
    """Train on the cohort in ``data`` (a ``volcnn synth`` folder) with 1 and with ``procs`` processes, alternately.

    Args:
        procs: processes of the parallel run; default 2 on CPU, every visible GPU on CUDA.

    Returns:
        ``{"config": ..., "runs": {"1": [one dict per repeat], "P": [...]}, "ddp_samples_per_s_1proc": median,
        "ddp_samples_per_s_Pproc": median, "ddp_procs": P, "ddp_scaling_ratio": P-process / 1-process samples/s,
        "ddp_scaling_efficiency": ratio / P}`` (ratio and efficiency ``None`` when ``P`` is 1).
    """
    import torch

    cores = cpu_cores()
    if procs is None:
        procs = max(1, torch.cuda.device_count()) if device == "cuda" else 2
    if device == "cpu" and procs > cores:
        raise ValueError(f"{procs} processes on {cores} cores: each needs at least one")
    counts = (1, procs) if procs > 1 else (1,)
    threads = {n: max(1, cores // n) for n in counts}
    runs: dict[str, list[dict[str, Any]]] = {str(n): [] for n in counts}
    for r in range(repeats):
        for n in counts:  # alternate, so that drifting load on a shared machine hits both counts alike
            print(f"  scaling: {n} process(es) x {threads[n]} thread(s), repeat {r + 1}/{repeats} ...", flush=True)
            runs[str(n)].append(_launch(n, threads[n], data, work / f"p{n}_r{r}", device, network, patch, margin,
                                        batch, epochs))  # fmt: skip
    summary: dict[str, Any] = {
        "config": {
            "network": network,
            "patch": patch,
            "margin": margin,
            "batch_per_process": batch,
            "device": device,
            "epochs": epochs,
            "repeats": repeats,
            "cores": cores,
            "threads_per_process": {str(n): threads[n] for n in counts},
        },
        "runs": runs,
        "ddp_procs": procs,
    }
    medians = {n: statistics.median(x["samples_per_s"] for x in runs[str(n)]) for n in counts}
    for n in counts:
        summary[f"ddp_samples_per_s_{n}proc"] = medians[n]
        summary[f"ddp_epoch_s_{n}proc"] = statistics.median(x["epoch_s"] for x in runs[str(n)])
    ratio = medians[procs] / medians[1] if procs > 1 and medians[1] else None
    summary["ddp_scaling_ratio"] = ratio
    summary["ddp_scaling_efficiency"] = ratio / procs if ratio is not None else None
    return summary


def table(summary: dict[str, Any]) -> str:
    """The printed form of :func:`run`'s result."""
    c = summary["config"]
    lines = [
        f"data-parallel scaling: {c['network']}, {c['patch']}^3 patches, batch {c['batch_per_process']} per process, "
        f"{c['device']}, {c['cores']} cores; medians of epochs 2..{c['epochs']}, then of {c['repeats']} runs",
        f"{'processes':>9} {'threads':>7} {'samples/s':>10} {'epoch s':>8} {'steps/rank':>10} {'data wait':>9} "
        f"{'runs (samples/s)':>24}",
    ]
    for n, results in summary["runs"].items():
        first = results[0]
        each = ", ".join(f"{x['samples_per_s']:.1f}" for x in results)
        lines.append(
            f"{n:>9} {c['threads_per_process'][n]:>7} {summary[f'ddp_samples_per_s_{n}proc']:10.1f} "
            f"{summary[f'ddp_epoch_s_{n}proc']:8.2f} {first['epochs'][-1]['steps_per_rank']:10.0f} "
            f"{statistics.median(x['data_wait_fraction'] for x in results):9.1%} {each:>24}"
        )
    if summary["ddp_scaling_ratio"] is not None:
        p = summary["ddp_procs"]
        lines.append(f"{p} processes vs 1: {summary['ddp_scaling_ratio']:.2f}x samples/s, "
                     f"efficiency {summary['ddp_scaling_efficiency']:.0%} of linear")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    p.add_argument("--network", default="valid_cnn3d")
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--margin", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="batch per process")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not timed")
    p.add_argument("--repeats", type=int, default=3, help="runs per process count (median)")
    p.add_argument("--procs", type=int, default=None, help="processes of the parallel run (CPU: 2; CUDA: all GPUs)")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--negatives", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # one torchrun process; rank 0 writes --result
        _worker(args)
        return 0

    from volcnn.data import synthesize_cohort

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synthesize_cohort(data, cases=args.cases, seed=0, size="small", negatives=args.negatives)
        summary = run(data, Path(tmp), args.device, args.network, args.patch, args.margin, args.batch, args.epochs,
                      args.repeats, args.procs)  # fmt: skip
    print(table(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
