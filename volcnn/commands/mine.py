"""``volcnn mine``: hard-negative mining rounds over a trained run: the training CTs' false positives become
negatives, and training continues through the bundle's ``train.json`` (:mod:`volcnn.engines.mining`)."""

from __future__ import annotations

import argparse
import json

from volcnn.commands._overrides import parse_overrides
from volcnn.commands._paths import existing_dir, existing_file
from volcnn.core.errors import UsageError

NAME = "mine"
HELP = "hard-negative mining: mine the training CTs' false positives and train on (rounds)"
#: unknown ``--KEY VALUE`` arguments are the bundle's config overrides, as for ``python -m monai.bundle run``
ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's output_dir (models/model.pt)")
    p.add_argument(
        "--config_file", "--config-file", dest="config_file", required=True, nargs="+",
        help="the bundle's training config(s), as given to training (train.json [overlays...])",
    )  # fmt: skip
    p.add_argument("--annotations", default=None, metavar="CSV", help="nodules (LUNA16 annotations.csv / nodules.csv)")
    p.add_argument("--rounds", type=int, default=1, help="mining rounds (default 1)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs per round (default 5)")
    p.add_argument("--round-lr", type=float, default=None, help="learning rate of a round (default: the bundle's)")
    p.add_argument("--threshold", type=float, default=0.3, help="smallest finding probability mined (default 0.3)")
    p.add_argument("--max-per-image", type=int, default=20, help="findings mined per CT at most (default 20)")
    p.add_argument("--margin-mm", type=float, default=5.0, help="beyond a nodule's radius by this to be mined")
    p.add_argument("--stride-mm", type=float, default=4.0, help="heat-map grid step of the mining pass")
    p.epilog = "Other --KEY VALUE pairs override the bundle config, as on the training command line."


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every round finished; 2 for a run without weights, missing configs or bad options."""
    from volcnn.engines.mining import MiningSettings, run_mining

    existing_dir(args.run_dir, "run folder")
    for config in args.config_file:
        existing_file(config, "bundle config")
    overrides = parse_overrides(getattr(args, "overrides", []))
    overrides.pop("output_dir", None)  # each round writes into RUN_DIR/mining/round_<r>
    try:
        settings = MiningSettings(
            rounds=args.rounds,
            epochs=args.epochs,
            learning_rate=args.round_lr,
            threshold=args.threshold,
            max_per_image=args.max_per_image,
            margin_mm=args.margin_mm,
            stride_mm=args.stride_mm,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    summary = run_mining(args.config_file, args.run_dir, overrides, settings, annotations=args.annotations)
    for r in summary["rounds"]:
        print(f"round {r['round']}: {r['mined']} mined negatives, {r['training_entries']} training entries")
    print(f"final weights: {summary['final_weights']}")
    print(json.dumps({"mining": f"{args.run_dir}/mining/mining.json"}))
    return 0
