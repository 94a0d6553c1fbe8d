"""``volcnn infer``: heat map, findings and volume score for whole volumes, with a bundle or an exported model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from volcnn.commands._paths import existing_dir, existing_file
from volcnn.core.errors import UsageError

NAME = "infer"
HELP = "heat map, findings and score for whole volumes with a trained bundle"

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="bundle folder with configs/ and models/model.pt")
    src.add_argument("--model", help="an exported model (models/model.ts or models/model.onnx) run alone")
    p.add_argument("--out", required=True, help="output folder: OUT/<case>/heatmap.nii.gz, findings.json, summary.csv")
    p.add_argument(
        "--explain",
        type=int,
        default=0,
        metavar="N",
        help="explain the N most probable findings per case: OUT/<case>/findingKK_METHOD.nii.gz and .png",
    )
    p.add_argument("--explain-method", default="gradcam", help="gradcam (default), gradcampp or occlusion")
    p.add_argument("--explain-layer", default=None, help="Grad-CAM layer (default: chosen per network)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--stride-mm", type=float, default=None, help="heat-map stride in mm (default: the bundle's)")
    p.add_argument(
        "--heatmap-method",
        choices=("auto", "dense", "window"),
        default=None,
        help="dense: one trunk pass over the CT; window: each window through the whole network (the reference); "
        "auto: dense where its check against windows passes (default: the bundle's; exported models: window)",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="NIfTI (.nii, .nii.gz) or MetaImage (.mhd, .mha) files, or DICOM series folders",
    )


def run(args: argparse.Namespace) -> int:
    given = {"device": args.device, "stride_mm": args.stride_mm, "heatmap_method": args.heatmap_method}
    overrides = {k: v for k, v in given.items() if v is not None}
    return infer(
        args.bundle, args.out, args.inputs, model=args.model, explain=args.explain,
        explain_method=args.explain_method, explain_layer=args.explain_layer, **overrides,
    )  # fmt: skip


def infer(
    bundle: str | None,
    out_dir: str,
    inputs: list[str],
    *,
    model: str | None = None,
    explain: int = 0,
    explain_method: str = "gradcam",
    explain_layer: str | None = None,
    **overrides: Any,
) -> int:
    """Build the runner from ``bundle`` (or the exported ``model``) and run it over ``inputs`` into ``out_dir``.

    Args:
        bundle: a bundle folder (``configs/inference.json`` + ``models/model.pt``).
        model: an exported model (``.ts`` or ``.onnx`` from ``volcnn export``) run alone, without a bundle; its
            preprocessing settings are embedded. Heat maps then use the window method (an exported graph cannot
            be split into trunk and head).
        explain: explain the N most probable findings per case (Grad-CAM by default; bundle models only).
        overrides: bundle config ids (``device``, ``stride_mm``...); with ``model``: ``InferenceRunner`` arguments.

    Returns:
        0 when every input was processed; 1 when some failed (listed in ``OUT/failures.json``, the rest were
        processed).

    Raises:
        UsageError: no inputs, bundle folder, config or model missing, an unusable bundle, model or output folder
            (weights that do not fit the bundle's network among them: the message names the weights file, the
            bundle's settings and the first mismatched keys or shapes), a bad ``--explain`` option (exit 2).
    """
    from volcnn.explain import EXPLAIN_METHODS
    from volcnn.inference import exported_runner, load_bundle_runner
    from volcnn.models import WeightsMismatchError

    if not inputs:
        raise UsageError("no inputs given: pass NIfTI files or DICOM series folders")
    if (bundle is None) == (model is None):
        raise UsageError("give exactly one of --bundle and --model")
    if explain:
        if model is not None:
            raise UsageError("--explain needs the bundle's network (--bundle), not an exported model")
        if explain_method not in EXPLAIN_METHODS:
            known = ", ".join(EXPLAIN_METHODS)
            raise UsageError(f"unknown explanation method {explain_method!r}; choose one of {known}")
    try:
        if model is not None:
            runner = exported_runner(existing_file(model, "model file"), **overrides)
        else:
            runner = load_bundle_runner(existing_dir(str(bundle), "bundle folder"), **overrides)
    except UsageError:
        raise
    except (FileNotFoundError, WeightsMismatchError) as e:  # their messages name the file and the problem
        raise UsageError(str(e)) from e
    except Exception as e:
        raise UsageError(f"{bundle or model}: cannot build the inference runner ({type(e).__name__}: {e})") from e
    runner.explain, runner.explain_method, runner.explain_layer = int(explain), explain_method, explain_layer
    try:
        result = runner.run(list(inputs), out_dir)
    except OSError as e:
        raise UsageError(f"{out_dir}: cannot write outputs ({e})") from e
    n_bad = len(result["failures"])
    if n_bad:
        logger.warning("%d of %d inputs failed; see %s", n_bad, len(inputs), Path(out_dir) / "failures.json")
        return 1
    return 0
