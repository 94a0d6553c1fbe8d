"""``volcnn infer``: heat map, findings and volume score for whole volumes, with a bundle or an exported model; one
probability per volume for a model trained on whole volumes (volume mode, stated by the bundle or the export).

Started under ``torchrun --nproc_per_node N`` (GPUs, or CPU processes), the N processes share the inputs: each runs
its own cases on its own device and rank 0 writes the batch's ``summary.csv`` and ``failures.json`` once all have
finished (:mod:`volcnn.inference.sharding`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from volcnn.commands._paths import existing_dir, existing_file
from volcnn.core.errors import UsageError

NAME = "infer"
HELP = "heat map, findings and score for whole volumes with a trained bundle (volume-mode models: one probability)"

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="bundle folder with configs/ and models/model.pt")
    src.add_argument("--model", help="an exported model (models/model.ts or models/model.onnx) run alone")
    p.add_argument(
        "--out",
        required=True,
        help="output folder: OUT/<case>/findings.json (and heatmap.nii.gz in candidate mode), summary.csv",
    )
    p.add_argument(
        "--explain",
        type=int,
        default=0,
        metavar="N",
        help="explain the N most probable findings per case: OUT/<case>/findingKK_METHOD.nii.gz and .png; for a "
        "volume-mode model any N >= 1 explains the whole volume: OUT/<case>/volume_METHOD.nii.gz and .png",
    )
    p.add_argument("--explain-method", default="gradcam", help="gradcam (default), gradcampp or occlusion")
    p.add_argument("--explain-layer", default=None, help="Grad-CAM layer (default: chosen per network)")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 (default: cuda when available; under torchrun, cuda means each process's own GPU, "
        "LOCAL_RANK modulo the GPU count)",
    )
    p.add_argument(
        "--stride-mm", type=float, default=None, help="heat-map stride in mm (default: the bundle's; candidate mode)"
    )
    p.add_argument(
        "--heatmap-method",
        choices=("auto", "dense", "window"),
        default=None,
        help="dense: one trunk pass over the CT; window: each window through the whole network (the reference); "
        "auto: dense where its check against windows passes (default: the bundle's; exported models: window; "
        "candidate mode only)",
    )
    p.add_argument(
        "--scales",
        type=_scales,
        default=None,
        metavar="S1,S2",
        help="voxel-size factors of the heat map, e.g. 1,1.6 (the bundle's default: the CT also mapped at 1.6 times "
        "the voxel size, for nodules larger than the window) or 1 (one scale, faster); candidate mode",
    )
    p.add_argument(
        "--snap-mm",
        type=float,
        default=None,
        help="move each finding to the strongest blob of the image within this distance (default: the bundle's; "
        "0: off; candidate mode)",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time flips: average the heat map over the CT mirrored along each axis (4x the time; candidate mode)",
    )
    p.add_argument(
        "--features",
        default=None,
        metavar="CSV",
        help="clinical features for a clinical or fusion model: a CSV with a 'case' column (the case name, e.g. the "
        "file name without extension) and one column per declared feature, empty = missing; a case without a row "
        "runs with every feature missing and findings.json says so",
    )
    p.add_argument(
        "--dicom-out",
        action="store_true",
        help="for DICOM series inputs also write OUT/<case>/findings_sr.dcm (DICOM SR, TID 1500: each finding's "
        "point in patient coordinates and probability, the model, references to the input), heatmap_pm.dcm (the heat "
        "map as a DICOM Parametric Map, candidate mode) and, with --explain, explain_pm.dcm; other inputs get none",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="NIfTI (.nii, .nii.gz) or MetaImage (.mhd, .mha) files, or DICOM series folders",
    )


def _scales(text: str) -> list[float]:
    """``--scales``: comma-separated voxel-size factors, checked by :func:`~volcnn.inference.scales.check_scales`."""
    from volcnn.inference.scales import check_scales

    try:
        return list(check_scales([float(v) for v in text.split(",") if v.strip()]))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def run(args: argparse.Namespace) -> int:
    given = {
        "device": args.device, "stride_mm": args.stride_mm, "heatmap_method": args.heatmap_method,
        "scales": args.scales, "snap_mm": args.snap_mm,
    }  # fmt: skip
    if args.tta:
        given["tta_flips"] = True
    overrides = {k: v for k, v in given.items() if v is not None}
    return infer(
        args.bundle, args.out, args.inputs, model=args.model, explain=args.explain,
        explain_method=args.explain_method, explain_layer=args.explain_layer, features=args.features,
        dicom_out=args.dicom_out, **overrides,
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
    features: str | None = None,
    dicom_out: bool = False,
    **overrides: Any,
) -> int:
    """Build the runner from ``bundle`` (or the exported ``model``) and run it over ``inputs`` into ``out_dir``.

    Args:
        bundle: a bundle folder (``configs/inference.json`` + ``models/model.pt``).
        model: an exported model (``.ts`` or ``.onnx`` from ``volcnn export``) run alone, without a bundle; its
            preprocessing settings and mode are embedded. Heat maps then use the window method (an exported graph
            cannot be split into trunk and head).
        explain: explain the N most probable findings per case (Grad-CAM by default; bundle models only); in
            volume mode any N >= 1 writes the one explanation of the whole volume.
        features: a CSV of clinical features per case (``case`` column + the declared features) for a clinical or
            fusion bundle; a row with bad values fails that case only (listed in ``failures.json``).
        dicom_out: after the batch, write each DICOM-series case's results as DICOM (SR, heat-map and explanation
            Parametric Maps: :func:`volcnn.inference.dicom_out.write_batch_dicom`); a case whose DICOM cannot be
            written is added to ``failures.json`` (exit 1) and the others go on; file inputs get a logged note.
        overrides: bundle config ids (``device``, ``stride_mm``...); with ``model``: ``InferenceRunner`` arguments.

    Under torchrun (``WORLD_SIZE`` > 1) each process runs its share of ``inputs`` (input ``i`` on rank
    ``i % WORLD_SIZE``) on its own device (GPU ``LOCAL_RANK``, modulo the GPU count, when CUDA is there and
    ``device`` is unset or ``cuda``); set-up logs and progress bars come from rank 0 only, each case's line from
    the rank that ran it.

    Returns:
        0 when every input was processed; 1 when some failed (listed in ``OUT/failures.json``, the rest were
        processed). Under torchrun every rank returns the code of the whole batch.

    Raises:
        UsageError: no inputs, bundle folder, config or model missing, an unusable bundle, model or output folder
            (weights that do not fit the bundle's network among them: the message names the weights file, the
            bundle's settings and the first mismatched keys or shapes), a bad ``--explain`` option (exit 2).
    """
    from volcnn.core.ranks import launched_world_size, quiet_unless_rank0
    from volcnn.explain import EXPLAIN_METHODS
    from volcnn.inference import exported_runner, load_bundle_runner
    from volcnn.inference.sharding import rank_device, torchrun_shard
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
    sharded = launched_world_size() > 1
    if sharded:
        overrides = _rank_overrides(overrides, rank_device(overrides.get("device")))
    try:
        with quiet_unless_rank0(sharded):  # every rank loads the same model and says so
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
    _attach_features(runner, features, inputs, str(bundle or model))
    ignored = sorted(k for k in ("stride_mm", "heatmap_method", "scales", "snap_mm") if k in overrides)
    if runner.mode == "volume" and ignored:
        logger.warning("%s: a volume-mode model makes no heat map; %s ignored", bundle or model, ", ".join(ignored))
    with torchrun_shard() as shard:
        if shard is not None:
            mine = len(shard.indices(len(inputs)))
            logger.info("rank %d of %d: %d of the %d inputs, on %s", shard.rank, shard.world, mine, len(inputs),
                        runner.device)  # fmt: skip
        try:
            result = runner.run(list(inputs), out_dir, shard=shard)
        except OSError as e:
            raise UsageError(f"{out_dir}: cannot write outputs ({e})") from e
        rank0 = shard is None or shard.rank == 0
        dicom_failures = _write_dicom(inputs, out_dir, result, shard) if dicom_out else []
    n_bad = len(result["failures"]) + len(dicom_failures)
    if n_bad:
        if rank0:
            logger.warning("%d of %d inputs failed; see %s", n_bad, len(inputs), Path(out_dir) / "failures.json")
        return 1
    return 0


def _write_dicom(inputs: list[str], out_dir: str, result: dict[str, Any], shard: Any) -> list[dict[str, str]]:
    """``--dicom-out``'s post-step over the processed cases (:func:`volcnn.inference.dicom_out.write_batch_dicom`)."""
    from volcnn.inference.dicom_out import write_batch_dicom

    return write_batch_dicom(list(inputs), out_dir, result, shard=shard)


def _rank_overrides(overrides: dict[str, Any], device: str | None) -> dict[str, Any]:
    """Overrides for one process of a torchrun job: its own device (made the current CUDA device, so that nothing
    lands on GPU 0 by default), and no progress bars except rank 0's (N bars would garble one terminal)."""
    import torch

    from volcnn.core.ranks import process_rank

    out = dict(overrides)
    if device is not None:
        out["device"] = device
        if torch.device(device).type == "cuda" and torch.cuda.is_available():
            torch.cuda.set_device(torch.device(device))
    if process_rank() != 0:
        out["progress"] = False
    return out


def _attach_features(runner: Any, csv_path: str | None, inputs: list[str], source: str) -> None:
    """Give ``runner`` the cases' clinical features from ``csv_path`` (see :func:`infer`)."""
    from volcnn.inference.cases import case_names
    from volcnn.io.features import FeatureError, read_features_csv

    if runner.features is None:
        if csv_path is not None:
            raise UsageError(f"{source}: its model takes no clinical features; --features {csv_path} cannot be used")
        return
    if csv_path is None:
        logger.warning(
            "%s: the model takes clinical features (%s) and no --features CSV was given: every case runs with all of "
            "them missing (imputed with the training means)", source, ", ".join(runner.features.names),
        )  # fmt: skip
        return
    bad: dict[str, str] = {}
    try:
        runner.case_features = read_features_csv(existing_file(csv_path, "features CSV"), runner.features, bad_rows=bad)
    except FeatureError as e:
        raise UsageError(str(e)) from e
    runner.case_feature_errors = bad
    cases = set(case_names(inputs))
    absent = sorted(cases - set(runner.case_features) - set(bad))
    if absent:
        logger.warning("%s: no row for %d case(s) (%s): their features are all missing", csv_path, len(absent),
                       ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else ""))  # fmt: skip
