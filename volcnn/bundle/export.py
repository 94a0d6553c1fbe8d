"""Exporting a bundle's trained network to TorchScript (``models/model.ts``) and ONNX (``models/model.onnx``).

Each file carries the settings needed to run it without the bundle (patch size, voxel size, HU window, classes,
network, bundle version, sha256 of the source ``model.pt``); see :mod:`volcnn.models.exported`, whose
:func:`~volcnn.models.load_exported` reads them back:

* ``model.ts`` is written by MONAI's ``ckpt_export`` (scripted, or traced where scripting fails), as
  :func:`~volcnn.bundle.check_export` does; its extra files are the bundle's ``metadata.json``, here with the
  description added under ``"volcnn"``, and ``inference.json``.
* ``model.onnx`` holds the network in eval mode for input ``(B, C, *patch_size)`` with a dynamic batch axis
  (input ``image``, output ``logits``), exported by torch's dynamo exporter or, where that fails, by the
  TorchScript-based one. The description, ``metadata.json`` and ``inference.json`` are ``metadata_props``.

A network that takes clinical features (``modality`` ``clinical`` or ``fusion``) has a second input, ``features``
``(B, F)``: the raw encoding of :meth:`~volcnn.io.features.FeatureSpec.encode`, NaN where a value is missing (the
network imputes and standardises with the training statistics it holds as buffers). Its TorchScript file is
scripted, or traced on example inputs, by :func:`torch.jit.script` / :func:`torch.jit.trace` here (MONAI's
``ckpt_export`` traces one input only), with the same extra files.

Every file is written to a temporary name, loaded back and compared with the eager network (softmax
probabilities within ``atol`` on a random batch in [0, 1]) before it replaces the previous export.

Example:
    >>> from volcnn.bundle import export_bundle  # doctest: +SKIP
    >>> export_bundle("bundles/lung_nodule_ct_classification")  # doctest: +SKIP
    {'ts': PosixPath('.../models/model.ts'), 'onnx': PosixPath('.../models/model.onnx')}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from volcnn.core.atomic import atomic_path, atomic_write_json
from volcnn.core.hashing import sha256_file
from volcnn.io.features import parse_feature_spec
from volcnn.models.bundle_config import CONFIG_FILE, META_FILE, bundle_overrides, load_bundle_network
from volcnn.models.exported import METADATA_KEY, load_exported
from volcnn.models.weights import weights_key

__all__ = ["EXPORT_FORMATS", "ONNX_OPSET", "export_bundle", "export_onnx", "export_torchscript"]

logger = logging.getLogger(__name__)

#: formats :func:`export_bundle` writes, and their files under ``models/``
EXPORT_FORMATS = {"ts": "model.ts", "onnx": "model.onnx"}
#: ONNX opset of the export (the dynamo exporter's own default is 18)
ONNX_OPSET = 18


def _versions() -> dict[str, str]:
    import monai

    import volcnn

    return {
        "torch_version": torch.__version__,
        "monai_version": monai.__version__,
        "volcnn_version": volcnn.__version__,
    }


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the dynamo exporter's and its optimiser's INFO logs and notices out of the caller's log."""
    names = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def example_inputs(description: dict[str, Any], batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of the described network for tracing and parity checks: ``(image,)`` with ``image`` ``(batch, C,
    *patch_size)`` uniform in [0, 1], plus, for a network taking clinical features, their raw encoding ``(batch,
    F)``: each row a valid value of every feature (numerics spread over their declared range, or 0-100), each
    feature missing (NaN) in some rows, and the last row all missing."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, int(description["in_channels"]), *description["patch_size"], generator=gen)
    if description.get("features") is None:
        return (image,)
    spec = parse_feature_spec(description["features"], "description")
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(batch):
        values: dict[str, Any] = {}
        for k, d in enumerate(spec.decls):
            if b == batch - 1 or (b + k) % 3 == 2:
                continue  # missing
            if d.type == "numeric":
                lo = 0.0 if d.min is None else float(d.min)
                hi = lo + 100.0 if d.max is None else float(d.max)
                values[d.name] = float(rng.uniform(lo, hi))
            elif d.type == "binary":
                values[d.name] = int(rng.integers(0, 2))
            else:
                values[d.name] = d.values[int(rng.integers(0, len(d.values)))]
        rows.append(spec.encode(values, f"example row {b}"))
    return image, torch.from_numpy(np.stack(rows))


def check_parity(path: Path, network: nn.Module, description: dict[str, Any], atol: float) -> float:
    """Max |softmax(eager) - softmax(exported)| on a random batch of 3; raises ValueError beyond ``atol``."""
    exported, _ = load_exported(path)
    inputs = example_inputs(description, batch=3)
    with torch.inference_mode():
        p_ref = torch.softmax(network.eval()(*inputs).float(), dim=1)
        p_exp = torch.softmax(exported(*inputs).float(), dim=1)
    if p_exp.shape != p_ref.shape:
        raise ValueError(f"{path}: exported output shape {tuple(p_exp.shape)}, eager {tuple(p_ref.shape)}")
    diff = float((p_ref - p_exp).abs().max())
    if not diff <= atol:
        raise ValueError(f"{path}: exported probabilities differ from eager by {diff:.3g} > atol {atol:g}")
    return diff


def export_torchscript(
    bundle_dir: Path,
    ckpt: Path,
    dest: Path,
    description: dict[str, Any],
    *,
    net_id: str = "network",
    input_shape: Sequence[int],
) -> str:
    """Write ``dest`` with MONAI's ``ckpt_export``: scripted, or traced with ``input_shape`` when scripting fails.

    The bundle's ``configs/metadata.json`` (plus ``description`` under ``"volcnn"``) and ``configs/inference.json``
    are stored as extra files.

    Returns:
        ``"script"`` or ``"trace"``, the conversion used.
    """
    from monai.bundle import ckpt_export

    meta: dict[str, Any] = json.loads((bundle_dir / "configs" / META_FILE).read_text(encoding="utf-8"))
    if description.get("features") is not None:
        return _torchscript_with_features(bundle_dir, ckpt, dest, description, meta, net_id=net_id)
    with tempfile.TemporaryDirectory(prefix="volcnn-export-") as tmp:
        meta_file = Path(tmp) / META_FILE  # the bundle's metadata with the description: ckpt_export stores it as is

        overrides: dict[str, Any] = dict(bundle_overrides(bundle_dir, "cpu"))

        def run(use_trace: bool) -> None:
            exporter = "torchscript-trace" if use_trace else "torchscript-script"
            atomic_write_json(meta_file, {**meta, METADATA_KEY: {**description, "exporter": exporter}})
            ckpt_export(
                net_id=net_id,
                filepath=str(dest),
                ckpt_file=str(ckpt),
                meta_file=str(meta_file),
                config_file=str(bundle_dir / "configs" / CONFIG_FILE),
                key_in_ckpt=weights_key(ckpt),
                use_trace=use_trace,
                input_shape=list(input_shape) if use_trace else None,
                **overrides,
            )

        try:
            run(use_trace=False)
        except Exception as err:
            logger.warning("torch.jit.script failed (%s); retrying with torch.jit.trace", _first_line(err))
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", torch.jit.TracerWarning
                )  # shape checks frozen: the loader checks shapes
                run(use_trace=True)
            return "trace"
    return "script"


def _torchscript_with_features(
    bundle_dir: Path, ckpt: Path, dest: Path, description: dict[str, Any], meta: dict[str, Any], *, net_id: str
) -> str:
    """:func:`export_torchscript` of a network ``(image, features)``: scripted, else traced on
    :func:`example_inputs`; saved with the ``metadata.json`` (description under ``"volcnn"``) and ``inference.json``
    extra files that ``ckpt_export`` writes."""
    network, _, _ = load_bundle_network(bundle_dir, ckpt, "cpu", net_id=net_id)
    network = network.eval()
    config = (bundle_dir / "configs" / CONFIG_FILE).read_text(encoding="utf-8")
    try:
        module, how = torch.jit.script(network), "script"
    except Exception as err:
        logger.warning("torch.jit.script failed (%s); tracing on example inputs", _first_line(err))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks frozen: the loader checks shapes
            module, how = torch.jit.trace(network, example_inputs(description), check_trace=False), "trace"
    exporter = f"torchscript-{how}"
    extra = {META_FILE: json.dumps({**meta, METADATA_KEY: {**description, "exporter": exporter}}), CONFIG_FILE: config}
    torch.jit.save(module, str(dest), _extra_files=extra)
    return how


def export_onnx(
    network: nn.Module,
    dest: Path,
    description: dict[str, Any],
    *,
    config: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    opset: int = ONNX_OPSET,
) -> str:
    """Write ``network`` (eval mode, CPU) to ``dest`` as ONNX with a dynamic batch axis and the settings embedded.

    The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) is tried first; where it fails, the
    TorchScript-based exporter (``dynamo=False``) is used, and the warning says why.

    Args:
        network: ``(B, C, *patch_size)`` -> logits ``(B, K)``; or ``(image, features (B, F))`` -> logits when
            ``description`` declares ``features`` (ONNX inputs ``image`` and ``features``).
        dest: the ``.onnx`` file (written in place; the caller makes it atomic).
        description: stored as JSON under ``metadata_props["volcnn"]``, with ``exporter`` and ``opset`` added.
        config: the bundle's inference config, stored as ``metadata_props["inference.json"]``.
        meta: the bundle's metadata, stored as ``metadata_props["metadata.json"]``.
        opset: ONNX opset (>= 17).

    Returns:
        ``"dynamo"`` or ``"torchscript"``, the exporter used.
    """
    import onnx

    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    network = network.eval().cpu()
    inputs = example_inputs(description, batch=2)  # batch 2: not specialised to 1
    names = ["image", "features"][: len(inputs)]
    batch = torch.export.Dim("batch", min=1)
    exporter = "dynamo"
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                network,
                inputs,
                input_names=names,
                output_names=["logits"],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=tuple({0: batch} for _ in inputs),
                verbose=False,
            )
        if program is None:
            raise RuntimeError("torch.onnx.export returned no ONNXProgram")
        model = program.model_proto
    except Exception as err:
        logger.warning("dynamo ONNX export failed (%s); using the TorchScript-based exporter", _first_line(err))
        exporter = "torchscript"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation notice, and TracerWarnings about shape checks
            torch.onnx.export(
                network,
                inputs,
                str(dest),
                input_names=names,
                output_names=["logits"],
                opset_version=opset,
                dynamo=False,
                dynamic_axes={**{name: {0: "batch"} for name in names}, "logits": {0: "batch"}},
                do_constant_folding=True,
            )
        model = onnx.load_model(str(dest))
    props = {
        METADATA_KEY: json.dumps({**description, "exporter": f"onnx-{exporter}", "opset": opset}),
        META_FILE: json.dumps(meta or {}),
        CONFIG_FILE: json.dumps(config or {}),
    }
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"{description.get('bundle_name')} {description.get('bundle_version')} (volcnn export)"
    onnx.checker.check_model(model)
    onnx.save_model(model, str(dest))
    return exporter


def export_bundle(
    bundle_dir: str | os.PathLike[str],
    *,
    formats: Sequence[str] = ("ts", "onnx"),
    ckpt: str | os.PathLike[str] | None = None,
    net_id: str = "network",
    opset: int = ONNX_OPSET,
    atol: float = 1e-4,
) -> dict[str, Path]:
    """Export the bundle's trained network to ``models/model.ts`` and/or ``models/model.onnx``.

    Args:
        bundle_dir: the bundle root (``configs/inference.json``, ``configs/metadata.json``).
        formats: any of ``"ts"``, ``"onnx"``.
        ckpt: the state dict to export (plain or nested under ``network`` / ``model`` / ``net``); defaults to
            ``models/model.pt``. Loaded with ``weights_only=True``.
        net_id: config id of the instantiated network.
        opset: ONNX opset.
        atol: largest allowed difference between the exported and the eager softmax probabilities.

    Returns:
        ``{format: path}`` of the files written.

    Raises:
        FileNotFoundError: naming the bundle config or checkpoint when missing.
        ValueError: for an unknown format or an opset below 17, or an export whose outputs differ from eager (the
            previous file is kept).
    """
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {sorted(EXPORT_FORMATS)}")
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    root = Path(bundle_dir).resolve()
    config_file, meta_file = root / "configs" / CONFIG_FILE, root / "configs" / META_FILE
    for needed in (config_file, meta_file):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: not found; {root} is not a bundle")
    ckpt_path = root / "models" / "model.pt" if ckpt is None else Path(ckpt).resolve()
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{ckpt_path}: checkpoint not found; train the bundle or pass ckpt")

    network, description, _ = load_bundle_network(root, ckpt_path, "cpu", net_id=net_id)
    description = {
        **description,
        "source_model": ckpt_path.name,
        "source_sha256": sha256_file(ckpt_path),
        **_versions(),
    }
    input_shape = [1, int(description["in_channels"]), *description["patch_size"]]
    config = json.loads(config_file.read_text(encoding="utf-8"))
    meta = json.loads(meta_file.read_text(encoding="utf-8"))

    writers: dict[str, Callable[[Path], str]] = {
        "ts": lambda tmp: export_torchscript(root, ckpt_path, tmp, description, net_id=net_id, input_shape=input_shape),
        "onnx": lambda tmp: export_onnx(network, tmp, description, config=config, meta=meta, opset=opset),
    }
    written: dict[str, Path] = {}
    for fmt in dict.fromkeys(formats):
        dest = root / "models" / EXPORT_FORMATS[fmt]
        start = time.perf_counter()
        with atomic_path(dest) as tmp:
            how = writers[fmt](tmp)
            diff = check_parity(tmp, network, description, atol)
        logger.info(
            "exported %s to %s (%s, %.1f s, %.1f MB); max |p_eager - p_%s| = %.1e",
            *(ckpt_path.name, dest, how, time.perf_counter() - start, dest.stat().st_size / 1e6, fmt, diff),
        )
        written[fmt] = dest
    return written
