"""``volcnn crossval``: k patient-grouped, stratified folds of a datalist's training and validation patients, each
trained and evaluated through the bundle, pooled into out-of-fold predictions and metrics
(:mod:`volcnn.engines.crossval`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from volcnn.commands._overrides import parse_overrides
from volcnn.commands._paths import existing_dir, existing_file
from volcnn.core.errors import UsageError

NAME = "crossval"
HELP = "k-fold cross-validation through the bundle: grouped stratified folds, out-of-fold predictions, metrics"
#: unknown ``--KEY VALUE`` arguments are the bundle's config overrides, as for ``python -m monai.bundle run``
ACCEPTS_OVERRIDES = True
#: the repository's bundle, the default of ``--bundle`` in a source checkout
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "lung_nodule_ct_classification"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datalist", required=True, metavar="DL", help="the datalist (its test section is never used)")
    p.add_argument("--dataset-dir", "--dataset_dir", dest="dataset_dir", default=None, metavar="D",
                   help="folder the image paths are relative to (default: the datalist's folder)")  # fmt: skip
    p.add_argument("--k", type=int, default=5, help="folds (default 5, at least 3)")
    p.add_argument("--out", required=True, metavar="O", help="output folder (a killed run resumes in it)")
    p.add_argument("--args-file", "--args_file", dest="args_file", default=None, metavar="JSON",
                   help="train.json overrides for every fold, e.g. volcnn plan's plan.json")  # fmt: skip
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), metavar="BUNDLE",
                   help="the bundle whose configs/train.json and evaluate.json run each fold")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and of every fold's training (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the bundle's)")
    p.add_argument(
        "--folds", default=None, metavar="I[,J...]",
        help="run only these folds (e.g. one process per GPU); the one that finishes the last fold pools them",
    )  # fmt: skip
    p.add_argument(
        "--devices", default=None, metavar="D1,D2[,...]",
        help="train the folds in parallel, one process per device (e.g. cuda:0,cuda:1; cpu,cpu on a CPU machine): "
        "fold i runs on device i mod N; logs in O/logs/; this call pools them",
    )  # fmt: skip
    p.add_argument("--no-pool", action="store_true", help=argparse.SUPPRESS)  # a --devices worker: the parent pools
    p.epilog = "Other --KEY VALUE pairs override the bundle config for every fold, after --args-file."


def _args_file(path: str) -> dict[str, Any]:
    existing_file(path, "args file")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot read the args file ({e})") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path}: an args file is a JSON object of train.json keys")
    return data


def _devices(text: str, k: int) -> list[str]:
    """The ``--devices`` list: ``cpu``, ``cuda`` or ``cuda:N`` entries, at most ``k`` (one fold each at least)."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in devices if not (d in ("cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()))]
    if not devices or bad:
        raise UsageError(f"--devices takes cpu, cuda or cuda:N separated by commas, got {text!r}")
    if len(devices) > k:
        raise UsageError(f"--devices: {len(devices)} devices for {k} folds; give at most one per fold")
    return devices


def run(args: argparse.Namespace) -> int:
    """Print the pooled figures; exit 0 when every fold finished, 2 for bad options or paths, 1 when a fold failed
    (the finished ones are kept; run again to resume)."""
    from volcnn.engines.crossval import run_crossval

    existing_file(args.datalist, "datalist")
    if args.dataset_dir is not None:
        existing_dir(args.dataset_dir, "dataset folder")
    bundle = existing_dir(args.bundle, "bundle")
    train, evaluate = bundle / "configs" / "train.json", bundle / "configs" / "evaluate.json"
    for config in (train, evaluate):
        existing_file(config, "bundle config")
    overrides = {**(_args_file(args.args_file) if args.args_file else {}), **parse_overrides(args.overrides or [])}
    for key in ("datalist", "dataset_dir", "output_dir"):
        if overrides.pop(key, None) is not None:
            raise UsageError(f"--{key} is set by volcnn crossval for each fold; use --datalist / --dataset-dir / --out")
    overrides.setdefault("bundle_root", str(bundle))
    if args.devices is not None:
        if args.device is not None or args.folds is not None:
            raise UsageError("--devices assigns the folds and devices itself; drop --device / --folds")
        from volcnn.commands.crossval_workers import run_on_devices

        devices = _devices(args.devices, args.k)
        # draw the folds here (no fold runs): a dataset too small for k, or a folder of another CV, is refused now,
        # by this call, rather than once per worker in its log
        run_crossval(train, evaluate, args.datalist, args.out, k=args.k, seed=args.seed, dataset_dir=args.dataset_dir,
                     overrides=overrides, only=[], pool=False)  # fmt: skip
        if not run_on_devices(args, devices):
            return 1
        args.folds = ""  # every fold ran in a worker: only pool here
    if args.device is not None:
        overrides["device"] = f"$torch.device({args.device!r})"
    try:
        only = None if args.folds is None else [int(f) for f in args.folds.split(",") if f.strip()]
    except ValueError as e:
        raise UsageError(f"--folds takes fold numbers separated by commas, got {args.folds!r}") from e
    metrics = run_crossval(
        train, evaluate, args.datalist, args.out, k=args.k, seed=args.seed, dataset_dir=args.dataset_dir,
        overrides=overrides, only=only, pool=not args.no_pool,
    )  # fmt: skip
    if args.no_pool:
        return 0
    if "pending" in metrics:
        print(f"folds {metrics['pending']} are not finished yet; the pooled figures come when they are")
        return 0
    ci = metrics["pooled_roc_auc_ci95"]
    pooled = metrics["pooled_roc_auc"]
    print(
        f"{args.k}-fold pooled out-of-fold ROC AUC "
        + ("n/a" if pooled is None else f"{pooled:.3f}")
        + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
        + f" over {metrics['n']} held-out entries"
    )
    print(json.dumps({"cv_metrics": f"{args.out}/cv_metrics.json", "oof": f"{args.out}/oof_predictions.csv"}))
    return 0
