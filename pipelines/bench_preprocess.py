"""Benchmark preprocessing of one CT (load, RAS, 1 mm, HU window): volcnn vs SimpleITK, each run in a fresh process.

Usage::

    python -m pipelines.bench_preprocess [--volume CT.nii.gz] [--repeats 3] [--out bench_preprocess.json]

Without ``--volume`` one ``full`` synthetic CT (512x512 slices, int16 ``.nii.gz`` as ``volcnn synth --size full``
writes it; ``synthesize_cohort(size="full", cases=1, seed=5)``, the case :mod:`pipelines.benchmark` uses) is
written to a temporary folder first (about 15 s).

The two sides, each producing a float32 volume on a 1 mm grid with HU ``[-1000, 400]`` mapped to ``[0, 1]``:

* **ours**: ``volume_transforms(pixdim=(1, 1, 1), hu_window=(-1000, 400))({"image": path})``: the validated
  loader (:class:`~volcnn.io.reader.LoadVolumed`: geometry, NaN/Inf and HU checks, gzip CRC), channel first,
  ``Orientationd`` to RAS, :class:`~volcnn.transforms.resample.ResampleToSpacingd` (trilinear, float32) and
  :class:`~volcnn.transforms.intensity.HUWindowd`; a ``(1, X, Y, Z)`` MetaTensor.
* **SimpleITK**, as its users write it: ``sitk.ReadImage``; a ``sitk.ResampleImageFilter`` with linear
  interpolation, output spacing 1 mm, the input's origin and direction (SimpleITK works in physical space, so no
  reorientation is needed), output size ``round((size - 1) * spacing / 1 mm + 1)`` per axis (the same physical
  extent, between the first and last voxel centres: the grid size ours gets), default pixel value -1024 and
  float32 output; then ``sitk.IntensityWindowing(image, -1000, 400, 0, 1)`` (float32
  in, float32 out), read as numpy through ``sitk.GetArrayViewFromImage`` (no copy).

Protocol: every measurement is one fresh Python process (``--child``) that imports what it needs (volcnn, MONAI,
torch and SimpleITK for ours, which reads ``.nii.gz`` bytes through SimpleITK; SimpleITK and numpy for
SimpleITK), records its RSS after the imports (``VmRSS``: the baseline), times the work alone with
``time.perf_counter`` and then records its peak RSS (``VmHWM``); extra RSS = peak - baseline. Runs of the two
sides are interleaved (ours, SimpleITK, then SimpleITK, ours, ...), ``repeats`` each; times are medians, peak and
extra RSS the largest over the runs. The file is read once beforehand so that both sides find it in the page
cache. Threads: each side's defaults (``torch_threads``, ``sitk_threads`` in the result).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.common import memory_mb, run_child

__all__ = ["run", "table", "synthetic_full_ct", "main"]

HU_WINDOW = (-1000.0, 400.0)
PIXDIM_MM = 1.0
SITK_DEFAULT_PIXEL = -1024.0
#: seconds one child may take before the benchmark gives up on it
CHILD_TIMEOUT_S = 600


def _child_ours(path: str) -> dict[str, Any]:
    import numpy as np
    import SimpleITK as sitk  # noqa: F401  (ours reads .nii.gz bytes through it: imported before timing, as torch)
    import torch

    from volcnn.transforms.volume_cache import volume_transforms

    chain = volume_transforms(pixdim=(PIXDIM_MM,) * 3, hu_window=HU_WINDOW)
    baseline = memory_mb()[0]
    t0 = time.perf_counter()
    out = chain({"image": path})["image"]
    seconds = time.perf_counter() - t0
    peak = memory_mb()[1]
    data = out.as_tensor() if hasattr(out, "as_tensor") else out
    return {
        "seconds": seconds,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "shape": [int(s) for s in data.shape[1:]],
        "mean": float(data.double().mean()),
        "dtype": str(data.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
    }


def _grid_size(n: int, spacing: float) -> int:
    """Voxels at :data:`PIXDIM_MM` spanning the extent between the first and last of ``n`` voxel centres
    ``spacing`` apart, rounded as MONAI's ``Spacing`` rounds it (half to even): the same grid size as ours."""
    return max(1, int(round((n - 1) * spacing / PIXDIM_MM + 1)))


def _sitk_preprocess(path: str) -> Any:
    """The SimpleITK side: read, resample to 1 mm (linear), window to [0, 1]; returns the windowed image."""
    import SimpleITK as sitk

    image = sitk.ReadImage(path)
    size = [_grid_size(n, s) for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)]
    resample = sitk.ResampleImageFilter()
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetOutputSpacing((PIXDIM_MM,) * 3)
    resample.SetSize(size)
    resample.SetOutputOrigin(image.GetOrigin())
    resample.SetOutputDirection(image.GetDirection())
    resample.SetDefaultPixelValue(SITK_DEFAULT_PIXEL)
    resample.SetOutputPixelType(sitk.sitkFloat32)
    resampled = resample.Execute(image)
    return sitk.IntensityWindowing(resampled, HU_WINDOW[0], HU_WINDOW[1], 0.0, 1.0)


def _child_sitk(path: str) -> dict[str, Any]:
    import numpy as np
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    baseline = memory_mb()[0]
    t0 = time.perf_counter()
    image = _sitk_preprocess(path)
    array = sitk.GetArrayViewFromImage(image)  # (Z, Y, X), no copy
    seconds = time.perf_counter() - t0
    peak = memory_mb()[1]
    return {
        "seconds": seconds,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "shape": [int(s) for s in image.GetSize()],
        "mean": float(np.mean(array, dtype=np.float64)),
        "dtype": str(array.dtype),
        "sitk_threads": int(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()),
    }


def _run_child(side: str, path: Path) -> dict[str, Any]:
    """One measurement in a fresh interpreter; its JSON result (the last line of its stdout)."""
    args = ["--child", side, "--volume", str(path)]
    return run_child("bench_preprocess", args, f"bench_preprocess child '{side}'", timeout=CHILD_TIMEOUT_S)


def describe_volume(path: Path) -> dict[str, Any]:
    """Shape, spacing, voxel type, orientation, format and size of the file (no path, no header text)."""
    import nibabel as nib
    import numpy as np

    name = path.name
    fmt = ".nii.gz" if name.endswith(".nii.gz") else path.suffix
    info: dict[str, Any] = {"format": fmt, "file_mb": round(path.stat().st_size / 2**20, 1)}
    if fmt in (".nii", ".nii.gz"):
        img: Any = nib.load(str(path))
        info.update(
            shape=[int(n) for n in img.shape],
            spacing_mm=[round(float(z), 6) for z in img.header.get_zooms()[:3]],
            dtype=str(np.dtype(img.get_data_dtype())),
            orientation="".join(nib.aff2axcodes(img.affine)),
        )
    else:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        info.update(
            shape=list(reader.GetSize()),
            spacing_mm=[round(float(s), 6) for s in reader.GetSpacing()],
            dtype=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        )
    return info


def run(volume_path: Path, repeats: int = 3) -> dict[str, Any]:
    """Time ours and SimpleITK on ``volume_path``, each run in a fresh process, interleaved; see the module doc.

    Returns:
        A JSON-able dict: ``ours_s`` / ``sitk_s`` (median seconds), ``ours_runs`` / ``sitk_runs`` (all runs),
        ``preprocess_time_ratio_vs_sitk`` (``ours_s / sitk_s``), ``*_peak_rss_mb`` (largest over runs),
        ``*_baseline_rss_mb`` (after imports), ``*_extra_rss_mb`` (peak minus baseline), ``*_shape`` (output
        ``(X, Y, Z)``), ``*_mean`` (mean output intensity), ``volume`` (see :func:`describe_volume`),
        ``sitk_threads``, ``torch_threads``, ``repeats``.
    """
    path = Path(volume_path)
    if not path.exists():
        raise FileNotFoundError(path)
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if path.is_file():
        with open(path, "rb") as f:  # into the page cache, for both sides alike
            while f.read(1 << 24):
                pass
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "sitk": []}
    for r in range(int(repeats)):
        for side in ("ours", "sitk") if r % 2 == 0 else ("sitk", "ours"):
            runs[side].append(_run_child(side, path))
    result: dict[str, Any] = {"repeats": int(repeats)}
    for side, rs in runs.items():
        peak = max(x["peak_rss_mb"] for x in rs)
        baseline = min(x["baseline_rss_mb"] for x in rs)
        result[f"{side}_s"] = statistics.median(x["seconds"] for x in rs)
        result[f"{side}_runs"] = [x["seconds"] for x in rs]
        result[f"{side}_peak_rss_mb"] = peak
        result[f"{side}_baseline_rss_mb"] = baseline
        result[f"{side}_extra_rss_mb"] = max(x["peak_rss_mb"] - x["baseline_rss_mb"] for x in rs)
        result[f"{side}_shape"] = rs[-1]["shape"]
        result[f"{side}_mean"] = rs[-1]["mean"]
        result[f"{side}_dtype"] = rs[-1]["dtype"]
    result["preprocess_time_ratio_vs_sitk"] = result["ours_s"] / result["sitk_s"]
    result["volume"] = describe_volume(path)
    result["sitk_threads"] = runs["sitk"][-1]["sitk_threads"]
    result["torch_threads"] = runs["ours"][-1]["torch_threads"]
    result["work"] = {
        "ours": "volume_transforms(pixdim=(1, 1, 1), hu_window=(-1000, 400)): validated load, RAS, "
        "ResampleToSpacingd (trilinear, float32), HUWindowd",
        "sitk": "ReadImage, ResampleImageFilter (linear, 1 mm, float32, default -1024), "
        "IntensityWindowing(-1000, 400 -> 0, 1)",
    }
    return result


def table(result: dict[str, Any]) -> str:
    """The printed form of :func:`run`'s result."""
    v = result["volume"]
    shape = "x".join(str(n) for n in v.get("shape", []))
    spacing = "x".join(f"{s:g}" for s in v.get("spacing_mm", []))
    lines = [
        f"preprocessing one CT ({shape} {v.get('dtype', '?')} {v['format']}, {spacing} mm) to {PIXDIM_MM:g} mm + "
        f"HU window; fresh process per run, medians of {result['repeats']}",
        f"{'method':12} {'seconds':>8} {'runs':>24} {'peak RSS MB':>12} {'extra RSS MB':>13} {'output':>14} "
        f"{'mean':>7}",
    ]
    for side, name in (("ours", "volcnn"), ("sitk", "SimpleITK")):
        runs = ", ".join(f"{s:.2f}" for s in result[f"{side}_runs"])
        out = "x".join(str(n) for n in result[f"{side}_shape"])
        lines.append(
            f"{name:12} {result[f'{side}_s']:8.3f} {runs:>24} {result[f'{side}_peak_rss_mb']:12.0f} "
            f"{result[f'{side}_extra_rss_mb']:13.0f} {out:>14} {result[f'{side}_mean']:7.4f}"
        )
    lines.append(
        f"time ratio volcnn / SimpleITK: {result['preprocess_time_ratio_vs_sitk']:.3f} "
        f"(torch threads {result['torch_threads']}, SimpleITK threads {result['sitk_threads']})"
    )
    return "\n".join(lines)


def synthetic_full_ct(folder: Path, seed: int = 5) -> Path:
    """One ``full`` synthetic CT written by volcnn's synthesiser into ``folder``; returns its path."""
    from volcnn.data import synthesize_cohort

    synthesize_cohort(folder, cases=1, seed=seed, size="full", val_fraction=0, test_fraction=0)
    return next((folder / "images").glob("*.nii.gz"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volume", type=Path, default=None, help="a CT (.nii/.nii.gz/.mha/...); default: synthetic")
    p.add_argument("--repeats", type=int, default=3, help="runs per side (median); default 3")
    p.add_argument("--seed", type=int, default=5, help="seed of the synthetic CT (without --volume)")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the result")
    p.add_argument("--child", choices=("ours", "sitk"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        result = (_child_ours if args.child == "ours" else _child_sitk)(str(args.volume))
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="volcnn-bench-preprocess-") as tmp:
        volume = args.volume
        if volume is None:
            print(f"synthesising one full CT (seed {args.seed}) ...", flush=True)
            volume = synthetic_full_ct(Path(tmp) / "data", seed=args.seed)
        result = run(volume, repeats=args.repeats)
    print(table(result))
    if args.out is not None:
        from volcnn.core.atomic import atomic_write_json

        atomic_write_json(args.out, result)
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
