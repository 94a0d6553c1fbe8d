"""``volcnn crossval --devices D1,D2,...``: the folds trained in parallel, one worker process per device.

Each worker is ``volcnn crossval`` itself, with the caller's arguments plus ``--folds`` (fold i goes to device
i mod N), ``--device`` and ``--no-pool``, writing into the same output folder; its output goes to
``O/logs/worker_<j>_<device>.log``. The caller shows a bar over the finished folds, waits for every worker, and then
pools the folds itself. A worker that fails leaves the others running and its finished folds in place; the caller
names its log and exits 1, and running the same command again resumes the unfinished folds as usual.

On the CPU the workers share the cores: each gets ``OMP_NUM_THREADS`` = cores / CPU workers unless the variable is
set already.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["fold_assignment", "run_on_devices", "worker_argv"]

logger = logging.getLogger(__name__)

#: seconds between looks at the output folder for finished folds
POLL_SECONDS = 2.0


def fold_assignment(k: int, devices: list[str]) -> list[list[int]]:
    """The folds of each device: fold i runs on ``devices[i % len(devices)]``."""
    return [[f for f in range(k) if f % len(devices) == j] for j in range(len(devices))]


def worker_argv(args: argparse.Namespace, folds: list[int], device: str) -> list[str]:
    """The command line of the worker that runs ``folds`` on ``device`` with the caller's other arguments."""
    argv = [sys.executable, "-m", "volcnn", "crossval", "--datalist", str(args.datalist), "--k", str(args.k),
            "--out", str(args.out), "--bundle", str(args.bundle), "--seed", str(args.seed),
            "--folds", ",".join(map(str, folds)), "--device", device, "--no-pool"]  # fmt: skip
    if args.dataset_dir is not None:
        argv += ["--dataset-dir", str(args.dataset_dir)]
    if args.args_file is not None:
        argv += ["--args-file", str(args.args_file)]
    return [*argv, *(args.overrides or [])]


def _environment(devices: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    cpu_workers = sum(d == "cpu" for d in devices)
    if cpu_workers and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_workers))
    return env


def run_on_devices(args: argparse.Namespace, devices: list[str]) -> bool:
    """Run every fold in a worker per device (see the module docstring); True when all workers succeeded."""
    from tqdm.auto import tqdm

    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = _environment(devices)
    workers: list[tuple[subprocess.Popen[bytes], Path, list[int], str]] = []
    try:
        for j, (device, folds) in enumerate(zip(devices, fold_assignment(args.k, devices), strict=True)):
            log = logs / f"worker_{j}_{device.replace(':', '')}.log"
            with open(log, "ab") as sink:
                proc = subprocess.Popen(worker_argv(args, folds, device), stdout=sink, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)  # fmt: skip
            logger.info("worker %d on %s: folds %s (log %s)", j, device, folds, log)
            workers.append((proc, log, folds, device))
        done = lambda: sum((out / f"fold_{f}" / "done.json").is_file() for f in range(args.k))  # noqa: E731
        with tqdm(total=args.k, initial=done(), desc="crossval folds", unit="fold") as bar:
            while any(proc.poll() is None for proc, *_ in workers):
                time.sleep(POLL_SECONDS)
                bar.update(done() - bar.n)
            bar.update(done() - bar.n)
    except BaseException:  # Ctrl-C or an error here: the workers stop with the caller (they resume on a re-run)
        for proc, *_ in workers:
            if proc.poll() is None:
                proc.terminate()
        for proc, *_ in workers:
            proc.wait()
        raise
    failed = [(log, folds, device, proc.returncode) for proc, log, folds, device in workers if proc.returncode != 0]
    for log, folds, device, code in failed:
        logger.error("the worker of folds %s on %s failed (exit %d); see %s", folds, device, code, log)
    return not failed
