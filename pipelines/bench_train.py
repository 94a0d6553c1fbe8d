"""Training throughput: the bundle's data path vs the naive MONAI-tutorial path, and fp32 vs bf16.

Every configuration runs the bundle's own ``train.json`` (``monai.bundle.ConfigWorkflow``) on the same synthetic
cohort, model, batch size and optimiser, each in a fresh process so that peak memory is its own. Only the data
path or the precision differs:

- **bundle**: as shipped. The deterministic chain (load, RAS, 1 mm, HU window, candidate patch with margin) is
  cached once (``CacheDataset``); a ``ThreadDataLoader`` batches the cached patches; the random augmentation runs
  on the training device, one batched call per batch, in the trainer's ``prepare_batch``.
- **naive**: the MONAI-tutorial path: ``Dataset`` + ``DataLoader(num_workers=N)`` with MONAI's standard
  transforms (``LoadImaged``, ``EnsureChannelFirstd``, ``Orientationd``, ``Spacingd``, ``ScaleIntensityRanged``,
  the candidate crop, then the per-sample random chain) run on every sample in every epoch.

Per epoch after the first (the first fills the cache), from ``EPOCH_STARTED`` to the last ``ITERATION_COMPLETED``
(validation is not counted): patches/s, epoch time, the share of that time spent waiting for the data loader
(Ignite's ``GET_BATCH_STARTED`` -> ``GET_BATCH_COMPLETED``) and the share spent in ``prepare_batch`` (moving the
batch to the device and augmenting it there). Medians over the timed epochs::

    python -m pipelines.bench_train                   # CPU: bundle fp32, bundle bf16, naive fp32
    python -m pipelines.bench_train --device cuda --network densenet121 --patch 64 --batch 32

Prints a table and writes JSON (``--out``). :func:`run` is what :mod:`pipelines.benchmark` calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.common import REPO, memory_mb, run_child

TRAIN = REPO / "bundles" / "lung_nodule_ct_classification" / "configs" / "train.json"

#: the configurations compared, as (data path, precision)
CONFIGS = (("bundle", "fp32"), ("bundle", "bf16"), ("naive", "fp32"))


@dataclass(frozen=True)
class TrainSetup:
    """What a training benchmark holds fixed across the runs it compares (this one and :mod:`pipelines.bench_scaling`):
    the bundle's network, cubic patch (plus ``margin`` voxels of context per side), batch (per process), epochs (the
    first is not timed) and device."""

    network: str = "valid_cnn3d"
    patch: int = 32
    margin: int = 6
    batch: int = 16
    epochs: int = 4
    device: str = "cpu"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainSetup:
        return cls(args.network, args.patch, args.margin, args.batch, args.epochs, args.device)

    def add_arguments(
        self, p: argparse.ArgumentParser, device_help: str | None = None, batch_help: str | None = None,
        epochs_help: str = "epochs per run; the first is not timed",
    ) -> None:  # fmt: skip
        """This setup's options (its values the defaults), the training cohort's (``--cases``, ``--negatives``) and
        ``--out``; hidden, ``--data`` and ``--run-dir`` of a child run (:meth:`argv`)."""
        p.add_argument("--device", default=self.device, help=device_help)
        p.add_argument("--network", default=self.network)
        p.add_argument("--patch", type=int, default=self.patch)
        p.add_argument("--margin", type=int, default=self.margin)
        p.add_argument("--batch", type=int, default=self.batch, help=batch_help)
        p.add_argument("--epochs", type=int, default=self.epochs, help=epochs_help)
        p.add_argument("--cases", type=int, default=8, help="synthetic patients of the training cohort")
        p.add_argument("--negatives", type=int, default=20, help="negative candidates per patient")
        p.add_argument("--out", default=None, help="JSON file for the results")
        p.add_argument("--data", help=argparse.SUPPRESS)
        p.add_argument("--run-dir", help=argparse.SUPPRESS)

    def argv(self, data: Path, run_dir: Path) -> list[str]:
        """The options that give a child run this setup, the cohort in ``data`` and ``run_dir`` for its outputs."""
        return ["--data", str(data), "--run-dir", str(run_dir), "--device", self.device, "--network", self.network,
                "--patch", str(self.patch), "--margin", str(self.margin), "--batch", str(self.batch),
                "--epochs", str(self.epochs)]  # fmt: skip

    def workflow(self, config_file: str | Sequence[str], data: str, run_dir: str, **overrides: Any) -> Any:
        """The bundle's training workflow (``monai.bundle.ConfigWorkflow``) for this setup, initialised: seed 0, no
        progress bar, validation off; ``overrides`` are further config keys (objects or values)."""
        from monai.bundle import ConfigWorkflow

        wf = ConfigWorkflow(
            config_file=config_file, workflow_type=None, run_id="training", dataset_dir=data,
            datalist=str(Path(data) / "datalist.json"), output_dir=run_dir, network_def=self.network,
            patch_size=[self.patch] * 3, margin=self.margin, batch_size=self.batch, max_epochs=self.epochs,
            progress=False, seed=0, val_interval=10**6, **overrides,
        )  # fmt: skip
        wf.initialize()
        return wf


def training_cohort(folder: Path, cases: int = 8, negatives: int = 20) -> Path:
    """The training benchmarks' cohort: ``cases`` ``small`` synthetic patients (seed 0) written into ``folder``."""
    from volcnn.data import synthesize_cohort

    synthesize_cohort(folder, cases=cases, seed=0, size="small", negatives=negatives)
    return folder


def main_on_cohort(
    args: argparse.Namespace, measure: Callable[[Path, Path], dict[str, Any]], table: Callable[[dict[str, Any]], str]
) -> int:
    """A training benchmark's command: :func:`training_cohort` (``args.cases``, ``args.negatives``) in a temporary
    folder, ``measure(data, work)`` there, its ``table`` printed and the result written to ``args.out`` as JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        data = training_cohort(Path(tmp) / "data", args.cases, args.negatives)
        summary = measure(data, Path(tmp))
    print(table(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def medians_after_first(epochs: Sequence[Mapping[str, float]], keys: Mapping[str, str]) -> dict[str, float | None]:
    """``{name: median of epoch[key] over the epochs after the first}`` for each ``name: key`` of ``keys`` (``None``
    when there is no such epoch): the first epoch fills the cache and warms up, so it is not timed."""
    timed = [e for e in epochs if e["epoch"] > 1]
    return {name: statistics.median(e[key] for e in timed) if timed else None for name, key in keys.items()}


def device_sync(device: Any) -> Callable[[], None]:
    """What :class:`EpochClock` calls before each clock reading: CUDA synchronise on a CUDA ``device``, else nothing."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return lambda: None
    return lambda: torch.cuda.synchronize(dev)


def naive_transforms(patch: int, margin: int, pixdim: float = 1.0, hu_window: tuple[float, float] = (-1000, 400)):
    """The MONAI-tutorial chain, every transform on every sample: path -> ``(1, patch, patch, patch)`` in [0, 1]."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    from volcnn.transforms import augmentation_transforms
    from volcnn.transforms.crop import CropOrFitd

    k = "image"
    return Compose(
        [
            LoadImaged(k),
            EnsureChannelFirstd(k),
            Orientationd(k, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(k, pixdim=(pixdim,) * 3, mode="bilinear"),
            ScaleIntensityRanged(k, a_min=hu_window[0], a_max=hu_window[1], b_min=0.0, b_max=1.0, clip=True),
            CropOrFitd(k, patch_size=(patch,) * 3, margin=margin),
            augmentation_transforms((patch,) * 3),
        ]
    )


def _naive_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides that swap the bundle's data path for the naive one (objects, not config text)."""
    from monai.data import DataLoader, Dataset
    from monai.engines import PrepareBatchDefault

    from volcnn.io import load_datalist

    entries = load_datalist(str(Path(args.data) / "datalist.json"), "training", args.data)
    dataset = Dataset(entries, transform=naive_transforms(args.patch, args.margin))
    loader = DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        drop_last=len(entries) > args.batch,
        num_workers=args.naive_workers,
        persistent_workers=args.naive_workers > 0,
    )
    return {"train#dataset": dataset, "train#dataloader": loader, "train#prepare_batch": PrepareBatchDefault()}


class EpochClock:
    """Times each epoch of an Ignite trainer from ``EPOCH_STARTED`` to its last ``ITERATION_COMPLETED``.

    Read it in an ``EPOCH_COMPLETED`` handler attached after it: ``seconds``, ``samples`` (sum of the outputs'
    lengths), ``steps``, ``wait`` (time in ``GET_BATCH``, i.e. waiting for the loader) and ``prepare`` (whatever the
    caller adds, e.g. ``prepare_batch`` time). ``sync`` is called before each clock reading (CUDA synchronise).
    """

    def __init__(self, sync: Callable[[], None] = lambda: None) -> None:
        self.sync = sync
        self.t0 = self.t1 = self.wait = self.prepare = self._get = 0.0
        self.samples = self.steps = 0

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0

    def attach(self, trainer: Any) -> None:
        from ignite.engine import Events

        trainer.add_event_handler(Events.EPOCH_STARTED, self._started)
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self._get_started)
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED, self._get_completed)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)

    def _started(self, engine: Any) -> None:
        self.sync()
        self.t0 = self.t1 = time.perf_counter()
        self.wait = self.prepare = 0.0
        self.samples = self.steps = 0

    def _get_started(self, engine: Any) -> None:
        self._get = time.perf_counter()

    def _get_completed(self, engine: Any) -> None:
        self.wait += time.perf_counter() - self._get

    def _iteration(self, engine: Any) -> None:
        self.sync()
        self.t1 = time.perf_counter()
        self.samples += len(engine.state.output)
        self.steps += 1


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    """One training run in this process: per-epoch throughput, data wait and device-side preparation time."""
    import torch
    from ignite.engine import Events

    amp = args.precision != "fp32"
    dtype = {"fp32": "auto", "bf16": "bfloat16", "fp16": "float16"}[args.precision]
    overrides = _naive_overrides(args) if args.path == "naive" else {}
    wf = TrainSetup.from_args(args).workflow(str(TRAIN), args.data, args.run_dir, device=args.device, amp=amp,
                                             amp_dtype=dtype, **overrides)  # fmt: skip
    trainer = wf.parser.get_parsed_content("train#trainer")
    cuda = torch.device(args.device).type == "cuda"
    clock = EpochClock(device_sync(args.device))
    epochs: list[dict[str, float]] = []
    prepare = trainer.prepare_batch

    def timed_prepare(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = prepare(*a, **kw)
        clock.sync()
        clock.prepare += time.perf_counter() - t
        return out

    trainer.prepare_batch = timed_prepare

    def completed(engine) -> None:
        seconds = clock.seconds
        epochs.append(
            {
                "epoch": engine.state.epoch,
                "seconds": seconds,
                "samples": clock.samples,
                "samples_per_s": clock.samples / seconds,
                "data_wait_fraction": clock.wait / seconds,
                "prepare_fraction": clock.prepare / seconds,
            }
        )

    clock.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, completed)
    util = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        from pipelines.bench_compute import gpu_utilisation

        with gpu_utilisation() as util:
            wf.run()
    else:
        wf.run()
    result: dict[str, Any] = {
        "path": args.path,
        "precision": args.precision,
        "policy": trainer.amp_policy.describe(),
        "loader": type(trainer.data_loader).__name__,
        "epochs": epochs,
        "first_epoch_s": epochs[0]["seconds"] if epochs else None,
        "peak_rss_mb": memory_mb()[1],
    }
    keys = ("samples_per_s", "data_wait_fraction", "prepare_fraction")
    result.update(medians_after_first(epochs, {"epoch_s": "seconds", **{k: k for k in keys}}))
    if cuda:
        result["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
        result["gpu_util"] = util.summary() if util is not None else None
    return result


def run(
    data: Path,
    work: Path,
    setup: TrainSetup = TrainSetup(),
    naive_epochs: int = 4,
    naive_workers: int = 2,
    configs: tuple[tuple[str, str], ...] = CONFIGS,
) -> dict[str, Any]:
    """Train each configuration on the cohort in ``data`` (a ``volcnn synth`` folder) in its own process.

    Args:
        setup: network, patch, margin, batch, epochs of the bundle-path runs, device; the naive path runs
            ``naive_epochs`` with ``naive_workers`` loader workers.

    Returns:
        ``{"config": ..., "results": [one dict per configuration], "epoch_speedup_vs_naive": naive epoch time /
        bundle fp32 epoch time, "data_wait_fraction": the bundle fp32 path's, "bf16_speedup": ...}``.
    """
    results = []
    for path, precision in configs:
        this = replace(setup, epochs=naive_epochs) if path == "naive" else setup
        args = ["--child", "--path", path, "--precision", precision, "--naive-workers", str(naive_workers),
                *this.argv(data, work / f"{path}_{precision}")]  # fmt: skip
        print(f"  training: {path} data path, {precision}, {this.epochs} epochs ...", flush=True)
        results.append(run_child("bench_train", args, f"training benchmark ({path}, {precision})"))
    by = {(r["path"], r["precision"]): r for r in results}
    ours, naive, bf16 = by.get(("bundle", "fp32")), by.get(("naive", "fp32")), by.get(("bundle", "bf16"))
    summary: dict[str, Any] = {
        "config": {**asdict(setup), "naive_epochs": naive_epochs, "naive_workers": naive_workers},
        "results": results,
    }
    if ours and naive and ours["epoch_s"] and naive["epoch_s"]:
        summary["epoch_speedup_vs_naive"] = naive["epoch_s"] / ours["epoch_s"]
    if ours:
        summary["data_wait_fraction"] = ours["data_wait_fraction"]
    if ours and bf16 and ours["samples_per_s"] and bf16["samples_per_s"]:
        summary["bf16_speedup"] = bf16["samples_per_s"] / ours["samples_per_s"]
    return summary


def table(summary: dict[str, Any]) -> str:
    """The printed form of :func:`run`'s result."""
    c = summary["config"]
    lines = [
        f"training: {c['network']}, {c['patch']}^3 patches, batch {c['batch']}, {c['device']}; medians of epochs 2..N",
        f"{'data path':10} {'precision':9} {'loader':17} {'patches/s':>10} {'epoch s':>8} {'1st epoch s':>11} "
        f"{'data wait':>9} {'prepare':>8} {'peak RSS MB':>11}",
    ]
    for r in summary["results"]:
        lines.append(
            f"{r['path']:10} {r['precision']:9} {r['loader']:17} {r['samples_per_s']:10.1f} {r['epoch_s']:8.2f} "
            f"{r['first_epoch_s']:11.2f} {r['data_wait_fraction']:9.1%} {r['prepare_fraction']:8.1%} "
            f"{r['peak_rss_mb']:11.0f}"
        )
    for r in summary["results"]:
        util = r.get("gpu_util")
        if util:
            lines.append(f"GPU utilisation during training ({r['path']}, {r['precision']}): mean {util['mean']:.0f}%, "
                         f"median {util['median']:.0f}%")  # fmt: skip
    if "epoch_speedup_vs_naive" in summary:
        lines.append(f"epoch speed-up vs naive: {summary['epoch_speedup_vs_naive']:.1f}x")
    if "bf16_speedup" in summary:
        lines.append(f"bf16 vs fp32 (bundle path): {summary['bf16_speedup']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    TrainSetup().add_arguments(p, epochs_help="bundle-path epochs; the first is not timed")
    p.add_argument("--naive-epochs", type=int, default=4, help="naive-path epochs; the first is not timed")
    p.add_argument("--naive-workers", type=int, default=2, help="DataLoader workers of the naive path")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", default="bundle", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one measurement, JSON on the last stdout line
        print(json.dumps(_measure(args)))
        return 0
    configs = CONFIGS + ((("bundle", "fp16"),) if args.device == "cuda" else ())
    setup = TrainSetup.from_args(args)
    return main_on_cohort(args, lambda data, work: run(data, work, setup, args.naive_epochs, args.naive_workers,
                                                       configs), table)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
