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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipelines.bench_train import EpochClock, TrainSetup, device_sync, main_on_cohort, medians_after_first
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

    # initialised: the overlay's "initialize" joins the process group (gloo, or nccl on CUDA) and picks the device
    wf = TrainSetup.from_args(args).workflow([str(TRAIN), str(MULTI)], args.data, args.run_dir, amp=False)
    trainer = wf.parser.get_parsed_content("train#trainer")
    device = torch.device(wf.parser.get_parsed_content("device"))
    cuda = device.type == "cuda"
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = str(dist.get_backend())
    reduce_on = device if backend == "nccl" else torch.device("cpu")
    clock = EpochClock(device_sync(device))
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
    result: dict[str, Any] = {
        "processes": world,
        "backend": backend,
        "device": device.type,
        "threads_per_process": torch.get_num_threads(),
        "batch_per_process": args.batch,
        "global_batch": args.batch * world,
        "epochs": epochs,
        "first_epoch_s": epochs[0]["seconds"] if epochs else None,
        **medians_after_first(
            epochs, {"samples_per_s": "samples_per_s", "epoch_s": "seconds", "data_wait_fraction": "data_wait_fraction"}
        ),
    }
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(device)
    if rank == 0:  # before the teardown: the measurement is complete here
        Path(args.result).write_text(json.dumps(result) + "\n")
    wf.finalize()  # destroys the process group
    return result


def _launch(procs: int, threads: int, data: Path, run_dir: Path, setup: TrainSetup) -> dict[str, Any]:
    """One measurement: ``torchrun --standalone`` with ``procs`` processes of ``threads`` threads; rank 0's JSON."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_dir / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "pipelines.bench_scaling", "--worker", "--result", str(result),
           *setup.argv(data, run_dir)]  # fmt: skip
    env = child_env({"OMP_NUM_THREADS": str(threads), "PYTHONFAULTHANDLER": "1"})
    if setup.device == "cpu":
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
    setup: TrainSetup = TrainSetup(batch=8),
    repeats: int = 3,
    procs: int | None = None,
) -> dict[str, Any]:
    """Train on the cohort in ``data`` (a ``volcnn synth`` folder) with 1 and with ``procs`` processes, alternately.

    Args:
        setup: network, patch, margin, batch per process, epochs per run, device (``cpu``: gloo; ``cuda``: nccl).
        procs: processes of the parallel run; default 2 on CPU, every visible GPU on CUDA.

    Returns:
        ``{"config": ..., "runs": {"1": [one dict per repeat], "P": [...]}, "ddp_samples_per_s_1proc": median,
        "ddp_samples_per_s_Pproc": median, "ddp_procs": P, "ddp_scaling_ratio": P-process / 1-process samples/s,
        "ddp_scaling_efficiency": ratio / P}`` (ratio and efficiency ``None`` when ``P`` is 1).
    """
    import torch

    device = setup.device
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
            runs[str(n)].append(_launch(n, threads[n], data, work / f"p{n}_r{r}", setup))
    config = asdict(setup)
    config["batch_per_process"] = config.pop("batch")
    config.update(repeats=repeats, cores=cores, threads_per_process={str(n): threads[n] for n in counts})
    summary: dict[str, Any] = {
        "config": config,
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
    TrainSetup(batch=8).add_arguments(p, device_help="cpu (gloo) or cuda (nccl)", batch_help="batch per process")
    p.add_argument("--repeats", type=int, default=3, help="runs per process count (median)")
    p.add_argument("--procs", type=int, default=None, help="processes of the parallel run (CPU: 2; CUDA: all GPUs)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # one torchrun process; rank 0 writes --result
        _worker(args)
        return 0
    setup = TrainSetup.from_args(args)
    return main_on_cohort(args, lambda data, work: run(data, work, setup, args.repeats, args.procs), table)


if __name__ == "__main__":
    sys.exit(main())
