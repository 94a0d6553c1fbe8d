"""Heat-map speed: volcnn's dense inference vs MONAI's SlidingWindowInferer, same classifier, stride and device.

One ``full`` synthetic chest CT (512×512 slices) is preprocessed as in training (RAS, ``pixdim``, HU window).
Then, each in a fresh process so that peak RSS is its own:

- **ours**: :func:`volcnn.inference.body_mask` + :func:`volcnn.inference.dense_heatmap` (one trunk pass per
  tile, windows pooled from the feature map, air outside the body skipped);
- **ours, no mask**: the same over the whole volume (the gain from structure alone);
- **MONAI SWI**: ``monai.inferers.SlidingWindowInferer`` over the whole volume with ``roi_size`` = the patch,
  ``overlap = 1 - stride/patch``, the classifier's probability broadcast over each window. To compare window for
  window, the wrapper writes each window's probability at the window's centre voxel and a second, network-free
  pass with ones divides out SWI's averaging, so the per-window probability is recovered exactly.

Agreement is the largest |p_ours - p_swi| over the window centres both evaluated (inside the body mask, on our
grid). Printed as a table with the speed-up ratio; ``--out`` writes JSON::

    python -m pipelines.bench_inference [--bundle demo_out/bundle] [--stride-mm 8] [--out results.json]

Without ``--bundle`` (a bundle with ``models/model.pt``), a randomly initialised network is timed; agreement is
then less telling because its probabilities vary little.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.bench_preprocess import synthetic_full_ct
from pipelines.common import memory_mb, run_child

METHODS = ("ours", "ours_nomask", "swi")


def _network(args: argparse.Namespace):
    import torch

    from volcnn.networks import create_network

    torch.manual_seed(0)  # without weights, every process builds the same random network
    net = create_network(args.network, in_channels=1, num_classes=2, spatial_size=[args.patch] * 3)
    if args.weights:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    return net.eval()


def _preprocess(path: str, pixdim: float):
    from volcnn.transforms import volume_transforms

    chain = volume_transforms("image", (pixdim,) * 3, (-1000.0, 400.0))
    return chain({"image": path})["image"]


def _child(args: argparse.Namespace) -> dict:
    """One measurement in this process; returns timings and peak RSS."""
    import torch

    torch.set_grad_enabled(False)
    net = _network(args)
    t0 = time.perf_counter()
    image = _preprocess(args.image, args.pixdim)
    t_pre = time.perf_counter() - t0
    stride = max(1, round(args.stride_mm / args.pixdim))
    result: dict = {"method": args.method, "shape": list(image.shape[1:]), "preprocess_s": t_pre}
    t0 = time.perf_counter()
    if args.method in ("ours", "ours_nomask"):
        from volcnn.inference import body_mask, dense_heatmap

        mask = body_mask(image[0]) if args.method == "ours" else None
        heat, heat_affine = dense_heatmap(image, net, [args.patch] * 3, stride, mask=mask)
        result["seconds"] = time.perf_counter() - t0
        np.savez(args.save, heat=heat, heat_affine=heat_affine, mask=np.asarray(mask) if mask is not None else 0)
    else:
        from monai.inferers import SlidingWindowInferer

        p, c = args.patch, args.patch // 2

        def centre_prob(x: torch.Tensor) -> torch.Tensor:
            prob = torch.softmax(net(x), dim=1)[:, 1]
            out = torch.zeros_like(x)
            out[:, 0, c, c, c] = prob
            return out

        def centre_one(x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(x)
            out[:, 0, c, c, c] = 1.0
            return out

        inferer = SlidingWindowInferer(
            roi_size=[p] * 3, sw_batch_size=args.batch, overlap=1 - stride / p, mode="constant"
        )
        x = image.as_tensor()[None]
        swi = inferer(x, centre_prob)[0, 0]
        result["seconds"] = time.perf_counter() - t0
        ones = inferer(x, centre_one)[0, 0]
        hit = ones > 0
        idx = torch.nonzero(hit)
        probs = (swi[hit] / ones[hit]).numpy()
        np.savez(args.save, centres=idx.numpy(), probs=probs, affine=np.asarray(image.affine))
        result["windows"] = int(idx.shape[0])
    result["peak_rss_mb"] = memory_mb()[1]
    return result


def _stack_slices(path: str, slices: int, out: Path) -> str:
    """The CT at ``path`` mirrored along its last axis until it has ``slices`` slices (same spacing and affine)."""
    import nibabel as nib

    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    while data.shape[2] < slices:
        data = np.concatenate([data, data[:, :, ::-1]], axis=2)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data[:, :, :slices]), img.affine, img.header), out)
    return str(out)


def central_slab(path: str, slices: int, out: Path) -> str:
    """The central ``slices`` slices (last voxel axis) of the CT at ``path``, with the affine shifted to match."""
    import nibabel as nib

    img = nib.load(path)
    n = img.shape[2]
    if slices >= n:
        return path
    start = (n - slices) // 2
    nib.save(img.slicer[:, :, start : start + slices], out)
    return str(out)


def _agreement(ours: Path, swi: Path) -> dict:
    a, b = np.load(ours), np.load(swi)
    heat, heat_affine, mask = a["heat"], a["heat_affine"], a["mask"]
    centres, probs, affine = b["centres"], b["probs"], b["affine"]
    world = centres @ affine[:3, :3].T + affine[:3, 3]
    inv = np.linalg.inv(heat_affine)
    grid = world @ inv[:3, :3].T + inv[:3, 3]
    on_grid = np.all(np.abs(grid - np.rint(grid)) < 1e-3, axis=1)
    g = np.rint(grid).astype(int)
    inside = on_grid & np.all((g >= 0) & (g < np.asarray(heat.shape)), axis=1)
    if np.ndim(mask) == 3:
        inside &= mask[centres[:, 0], centres[:, 1], centres[:, 2]].astype(bool)
    if not inside.any():
        return {"compared": 0, "max_abs": None, "mean_abs": None}
    diff = np.abs(heat[g[inside, 0], g[inside, 1], g[inside, 2]] - probs[inside])
    return {"compared": int(inside.sum()), "max_abs": float(diff.max()), "mean_abs": float(diff.mean())}


def run(
    image: str,
    work: Path,
    weights: str | None = None,
    network: str = "valid_cnn3d",
    patch: int = 32,
    pixdim: float = 1.0,
    stride_mm: float = 8.0,
    batch: int = 32,
    repeats: int = 3,
    methods: tuple[str, ...] = METHODS,
) -> dict:
    """Time each method ``repeats`` times, each in its own process, interleaved; medians and the agreement.

    Args:
        image: the CT (NIfTI) to map.
        work: a scratch folder for the heat maps being compared.
        weights: a ``model.pt`` state dict for ``network`` (default: random initialisation).

    Returns:
        ``{"results": {method: {...,"seconds": median, "runs": [...]}}, "agreement": {...},
        "heatmap_speedup_vs_swi": ..., "heatmap_speedup_vs_swi_no_mask": ..., "heatmap_agreement_max_abs": ...}``.
    """
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for i in range(repeats):
        for method in methods:
            args = ["--method", method, "--save", str(work / f"{method}.npz"), "--image", image, "--network", network,
                    "--patch", str(patch), "--pixdim", str(pixdim), "--stride-mm", str(stride_mm),
                    "--batch", str(batch)]  # fmt: skip
            if weights:
                args += ["--weights", weights]
            print(f"  inference: {method}, run {i + 1} of {repeats} ...", flush=True)
            runs[method].append(run_child("bench_inference", args, f"inference benchmark ({method})"))
    results = {}
    for method, rs in runs.items():
        results[method] = {**rs[0], "seconds": statistics.median(r["seconds"] for r in rs),
                           "runs": [r["seconds"] for r in rs],
                           "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}  # fmt: skip
    summary: dict = {"results": results, "agreement": None}
    if "swi" in results and "ours" in results:
        agreement = _agreement(work / "ours.npz", work / "swi.npz")
        summary["agreement"] = agreement
        summary["heatmap_speedup_vs_swi"] = results["swi"]["seconds"] / results["ours"]["seconds"]
        if "ours_nomask" in results:
            summary["heatmap_speedup_vs_swi_no_mask"] = results["swi"]["seconds"] / results["ours_nomask"]["seconds"]
        summary["heatmap_agreement_max_abs"] = agreement["max_abs"]
    return summary


def table(summary: dict, network: str, patch: int, stride_mm: float, pixdim: float) -> str:
    """The printed form of :func:`run`'s result."""
    shape = next(iter(summary["results"].values()))["shape"]
    names = {"ours": "volcnn dense + body mask", "ours_nomask": "volcnn dense, no mask",
             "swi": "MONAI SlidingWindowInferer"}  # fmt: skip
    lines = [f"inference: {network} {patch}^3, stride {stride_mm} mm, volume {shape[0]}x{shape[1]}x{shape[2]} at "
             f"{pixdim} mm; medians", f"{'method':28} {'heat map s':>11} {'runs':>24} {'peak RSS MB':>12}"]  # fmt: skip
    for m, r in summary["results"].items():
        runs = ", ".join(f"{s:.1f}" for s in r["runs"])
        lines.append(f"{names[m]:28} {r['seconds']:11.1f} {runs:>24} {r['peak_rss_mb']:12.0f}")
    if "heatmap_speedup_vs_swi" in summary:
        swi = summary["results"]["swi"]
        line = f"speed-up vs SWI: {summary['heatmap_speedup_vs_swi']:.1f}x"
        if "heatmap_speedup_vs_swi_no_mask" in summary:
            line += f" (structure alone, no mask: {summary['heatmap_speedup_vs_swi_no_mask']:.1f}x)"
        lines.append(line + f"; SWI windows {swi['windows']}")
        a = summary["agreement"]
        lines.append(f"agreement over {a['compared']} window centres: max |dp| {a['max_abs']}, mean {a['mean_abs']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle folder with models/model.pt (default: random weights)")
    p.add_argument("--weights", default=None, help="a model.pt state dict (instead of --bundle)")
    p.add_argument("--network", default="valid_cnn3d")
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--pixdim", type=float, default=1.0)
    p.add_argument("--stride-mm", type=float, default=8.0)
    p.add_argument("--batch", type=int, default=32, help="SWI windows per forward pass")
    p.add_argument("--image", default=None, help="a CT to use instead of a synthetic full-size one")
    p.add_argument("--slices", type=int, default=None, help="stack the synthetic CT to this many slices (e.g. 600)")
    p.add_argument("--slab", type=int, default=None, help="keep only the central N slices (a faster comparison)")
    p.add_argument("--repeats", type=int, default=1, help="runs per method (median)")
    p.add_argument("--skip-swi", action="store_true", help="time ours only (the SWI baseline takes minutes)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bundle and not args.weights:
        args.weights = str(Path(args.bundle) / "models" / "model.pt")
    if args.method:
        print(json.dumps(_child(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.image is None:
            args.image = str(synthetic_full_ct(Path(tmp) / "data"))
        if args.slices:
            args.image = _stack_slices(args.image, args.slices, Path(tmp) / "stacked.nii.gz")
        if args.slab:
            args.image = central_slab(args.image, args.slab, Path(tmp) / "slab.nii.gz")
        methods = ("ours", "ours_nomask") + (() if args.skip_swi else ("swi",))
        summary = run(args.image, Path(tmp), args.weights, args.network, args.patch, args.pixdim, args.stride_mm,
                      args.batch, args.repeats, methods)  # fmt: skip
    print(table(summary, args.network, args.patch, args.stride_mm, args.pixdim))
    if args.out:
        meta = {"network": args.network, "patch": args.patch, "stride_mm": args.stride_mm,
                "trained": bool(args.weights), "python": platform.python_version()}  # fmt: skip
        Path(args.out).write_text(json.dumps({"config": meta, **summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
