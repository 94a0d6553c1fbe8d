"""Benchmark DICOM ingest: volcnn's validated ``load_volume`` vs SimpleITK's ImageSeriesReader on the same files.

Usage::

    python -m pipelines.bench_ingest [--dicom SERIES_DIR] [--repeats 3] [--out bench_ingest.json]

Without ``--dicom`` a 512x512x~300 synthetic series is generated into a temporary folder
(``synthesize_cohort(size="full", dicom=True, cases=1)``, about 10 s). Both readers produce float32 HU
(SimpleITK's output is converted with ``astype(float32)`` so that the comparison is like for like); the
script also checks that both give the same voxel values. Target: ours <= 1.5x SimpleITK.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["bench", "main"]


def _time(fn: Any, repeats: int) -> tuple[float, list[float], Any]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def bench(series_dir: Path, repeats: int = 3) -> dict[str, Any]:
    """Time both readers on ``series_dir`` (median of ``repeats`` runs each, interleaved after one warm-up).

    Returns:
        A JSON-able dict: shape, file count, times in seconds, ratio ours / SimpleITK, values_match.
    """
    import SimpleITK as sitk

    from volcnn.io import load_volume

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir)))

    def ours() -> np.ndarray:
        return load_volume(series_dir).array

    def simpleitk() -> np.ndarray:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        return sitk.GetArrayFromImage(reader.Execute()).astype(np.float32)

    ours(), simpleitk()  # warm the page cache and imports
    ours_t, sitk_t = [], []
    a = b = None
    for _ in range(repeats):
        _, t, a = _time(ours, 1)
        ours_t += t
        _, t, b = _time(simpleitk, 1)
        sitk_t += t
    assert a is not None and b is not None
    zyx = np.ascontiguousarray(a.transpose(2, 1, 0))
    # SimpleITK sorts slices along its own axis: the same voxels, possibly in reverse slice order
    match = bool(np.array_equal(zyx, b) or np.array_equal(zyx[::-1], b))
    return {
        "series": str(series_dir),
        "files": len(files),
        "shape_xyz": list(a.shape),
        "repeats": repeats,
        "ours_s": statistics.median(ours_t),
        "simpleitk_s": statistics.median(sitk_t),
        "ours_runs_s": ours_t,
        "simpleitk_runs_s": sitk_t,
        "ratio": statistics.median(ours_t) / statistics.median(sitk_t),
        "values_match": match,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dicom", type=Path, help="a folder holding one DICOM series (default: generate one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        series = args.dicom
        if series is None:
            from volcnn.data import synthesize_cohort

            print("generating a 512x512 synthetic series ...", flush=True)
            synthesize_cohort(tmp, cases=1, seed=0, size="full", dicom=True)
            series = next((Path(tmp) / "dicom").iterdir())
        result = bench(series, args.repeats)
    print(
        f"{result['files']} slices, volume {tuple(result['shape_xyz'])}: volcnn load_volume "
        f"{result['ours_s']:.3f} s, SimpleITK ImageSeriesReader {result['simpleitk_s']:.3f} s, "
        f"ratio {result['ratio']:.2f}x (target <= 1.5x), values match: {result['values_match']}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["values_match"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
