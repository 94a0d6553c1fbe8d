"""The ``volcnn`` command. It only parses arguments and calls library functions.

Exit codes: 0 all good; 1 some inputs failed (the rest were processed, failures listed); 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from volcnn import __version__

__all__ = ["main", "build_parser"]

logger = logging.getLogger("volcnn")


def _cmd_synth(args: argparse.Namespace) -> int:
    from volcnn.data import synthesize_cohort

    try:
        summary = synthesize_cohort(
            args.out,
            cases=args.cases,
            seed=args.seed,
            size=args.size,
            dicom=args.dicom,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            progress=not args.no_progress,
            negatives=args.negatives,
        )
    except ValueError as e:
        logger.error("%s", e)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from volcnn.inference import infer_main

    given = {"device": args.device, "stride_mm": args.stride_mm, "heatmap_method": args.heatmap_method}
    overrides = {k: v for k, v in given.items() if v is not None}
    return infer_main(
        args.bundle, args.out, args.inputs, model=args.model, explain=args.explain,
        explain_method=args.explain_method, explain_layer=args.explain_layer, **overrides,
    )  # fmt: skip


def _cmd_ingest(args: argparse.Namespace) -> int:
    from volcnn.io.ingest import IngestError, ingest

    try:
        result = ingest(args.sources, args.out, progress=not args.no_progress)
    except IngestError as e:
        logger.error("%s", e)
        return 2
    n_done, n_skip, n_bad = len(result.converted), len(result.skipped), len(result.failures)
    print(f"converted {n_done}, skipped {n_skip} (already done), failed {n_bad}")
    for failure in result.failures:
        print(f"  FAILED {failure['error']}")
    print(
        f"manifest: {result.out_dir}/manifest.json"
        + (f"; failures: {result.out_dir}/failures.json" if result.failures else "")
    )
    return result.exit_code


def _cmd_datalist(args: argparse.Namespace) -> int:
    from volcnn.io.datalist import DatalistError
    from volcnn.io.datalist_check import check_datalist
    from volcnn.io.datalist_import import from_csv, from_luna16

    try:
        if args.datalist_command == "check":
            report = check_datalist(args.datalist, args.dataset_dir, load_images=not args.no_load, progress=True)
            print(report.format())
            return 0 if report.ok else 1
        split = {"val_fraction": args.val_fraction, "test_fraction": args.test_fraction, "seed": args.seed}
        if args.datalist_command == "from-luna16":
            summary = from_luna16(
                args.candidates,
                args.images,
                args.out,
                annotations_csv=args.annotations,
                skip_missing=args.skip_missing,
                dataset_dir=args.dataset_dir,
                **split,
            )
        else:
            summary = from_csv(
                args.csv, args.out, dataset_dir=args.dataset_dir, skip_missing=args.skip_missing, **split
            )
    except (DatalistError, ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 1 if isinstance(e, DatalistError) else 2
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 1 if summary.get("problems") else 0


def _add_split_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="datalist JSON to write")
    p.add_argument("--dataset-dir", default=None, help="folder the image paths are made relative to")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of patients in validation")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of patients in test")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    p.add_argument(
        "--skip-missing", action="store_true", help="drop rows whose image is missing (listed) instead of failing"
    )


def _cmd_networks(args: argparse.Namespace) -> int:
    from volcnn.networks import list_networks

    print("\n".join(list_networks()))
    return 0


def add_evaluate_findings_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``evaluate-findings`` arguments to ``parser`` (a subcommand parser or a standalone one)."""
    parser.add_argument("findings_dir", metavar="FINDINGS_DIR", help="'volcnn infer' output: <case>/findings.json")
    parser.add_argument(
        "--annotations",
        required=True,
        metavar="CSV",
        help="nodules: LUNA16 annotations.csv (seriesuid,coordX,coordY,coordZ,diameter_mm; LPS) or nodules.csv (RAS)",
    )
    parser.add_argument("--excluded", default=None, metavar="CSV", help="irrelevant annotations (findings ignored)")
    parser.add_argument(
        "--coords",
        choices=("auto", "lps", "ras"),
        default="auto",
        help="coordinate convention of the CSVs (auto: from the header)",
    )
    parser.add_argument("--out", default=None, metavar="DIR", help="where froc.json and froc.png go (FINDINGS_DIR)")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N", help="bootstrap resamples for 95%% CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def _cmd_export(args: argparse.Namespace) -> int:
    from volcnn.bundle import export_bundle

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    try:
        written = export_bundle(args.bundle, formats=formats, ckpt=args.ckpt)
    except (ValueError, FileNotFoundError) as e:
        print(f"volcnn export: {e}", file=sys.stderr)
        return 1
    for fmt, path in written.items():
        print(f"{fmt}: {path}")
    return 0


def _cmd_evaluate_findings(args: argparse.Namespace) -> int:
    from volcnn.inference.evaluate_findings import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``volcnn`` and its subcommands."""
    parser = argparse.ArgumentParser(prog="volcnn", description="3D CT classification with MONAI: data, inference.")
    parser.add_argument("--version", action="version", version=f"volcnn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic chest-CT cohort (NIfTI, optional DICOM, CSVs, datalists)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cases", type=int, default=20, help="number of cases (one patient each)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes")
    p.add_argument("--size", choices=["tiny", "small", "full"], default="small", help="tiny: tests; small: demo")
    p.add_argument("--dicom", action="store_true", help="also write each case as a DICOM series")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of patients in validation")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of patients in test")
    p.add_argument("--negatives", type=int, default=None, help="negative candidates per case (default: by size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("infer", help="heat map, findings and score for whole volumes with a trained bundle")
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
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser(
        "evaluate-findings", help="FROC and CPM (LUNA16 style) of 'volcnn infer' findings against annotations"
    )
    add_evaluate_findings_arguments(p)
    p.set_defaults(func=_cmd_evaluate_findings)

    p = sub.add_parser(
        "export", help="export a trained bundle to TorchScript (models/model.ts) and ONNX (models/model.onnx)"
    )
    p.add_argument("--bundle", required=True, help="bundle folder with models/model.pt")
    p.add_argument("--formats", default="ts,onnx", help="comma-separated: ts, onnx (default: both)")
    p.add_argument("--ckpt", default=None, help="weights to export (default: BUNDLE/models/model.pt)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("ingest", help="validate scans and convert them to NIfTI with a manifest (DICOM, NIfTI, .mhd)")
    p.add_argument("sources", nargs="+", metavar="SRC", help="files or folders, walked for series and volumes")
    p.add_argument("--out", required=True, help="output folder: <name>.nii.gz, manifest.json, failures.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("datalist", help="build datalists (LUNA16 CSVs, plain CSV) and check them")
    dsub = p.add_subparsers(dest="datalist_command", required=True, metavar="ACTION")
    q = dsub.add_parser("from-luna16", help="LUNA16 candidates.csv (LPS mm) + scan folder -> datalist (RAS mm)")
    q.add_argument("--candidates", required=True, help="LUNA16 candidates CSV: seriesuid,coordX,coordY,coordZ,class")
    q.add_argument("--images", required=True, help="folder (with subset* subfolders) of <seriesuid>.mhd / .nii.gz")
    q.add_argument("--annotations", default=None, help="LUNA16 annotations CSV, adds diameter_mm to nodules")
    _add_split_options(q)
    q = dsub.add_parser("from-csv", help="CSV image,label[,patient][,center_x,center_y,center_z] -> datalist")
    q.add_argument("csv", help="the CSV (centres in RAS mm)")
    _add_split_options(q)
    q = dsub.add_parser("check", help="every image loads, labels declared, centres inside, no patient in two splits")
    q.add_argument("datalist", help="datalist JSON")
    q.add_argument("--dataset-dir", "--dataset_dir", dest="dataset_dir", default=None, help="base of relative paths")
    q.add_argument("--no-load", action="store_true", help="only check that images exist (faster, no centre check)")
    p.set_defaults(func=_cmd_datalist)

    p = sub.add_parser("networks", help="list the registered network names (for network_def)")
    p.set_defaults(func=_cmd_networks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``volcnn`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
