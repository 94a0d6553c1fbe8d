"""Offline verification of a MONAI bundle: metadata schema, network input/output, TorchScript export.

MONAI's own ``verify_metadata`` downloads the schema named in ``metadata.json`` and so fails without a network.
Here the schema is vendored next to this module and pinned by its sha256: a changed file is refused rather than
silently used. The network check and the export go through MONAI's ``verify_net_in_out`` and ``ckpt_export`` so
that the bundle is checked the way the model zoo checks it.

Example:
    >>> from volcnn.bundle import verify_bundle
    >>> results = verify_bundle("bundles/lung_nodule_ct_classification")  # doctest: +SKIP
    >>> all(r.ok for r in results)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jsonschema import Draft201909Validator

from volcnn.core.errors import VolcnnError
from volcnn.core.hashing import sha256_file
from volcnn.models.bundle_config import bundle_overrides, bundle_parser
from volcnn.models.weights import load_weights, weights_key

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_SHA256",
    "CheckResult",
    "MetadataValidationError",
    "SchemaIntegrityError",
    "check_export",
    "check_network_io",
    "load_schema",
    "validate_metadata",
    "verify_bundle",
]

logger = logging.getLogger(__name__)

#: File name of the vendored schema, the one MONAI model-zoo bundles point at in their ``schema`` field:
#: https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json
SCHEMA_NAME = "meta_schema_20240725.json"
#: sha256 of ``schema/meta_schema_20240725.json``. Source: Project-MONAI/project-monai.github.io,
#: ``public/schema/meta_schema_20240725.json`` (commit abfc0515409b160a9af8f5cef631dff45d503162), a verbatim copy
#: of the MONAI-extra-test-data 0.8.1 release asset, also served at https://project-monai.github.io/schema/.
SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"

_SCHEMA_PATH = Path(__file__).with_name("schema") / SCHEMA_NAME
_CONFIG = Path("configs") / "inference.json"
_META = Path("configs") / "metadata.json"

Status = Literal["pass", "fail", "skip"]


class SchemaIntegrityError(VolcnnError, RuntimeError):
    """The vendored schema file is missing or its sha256 differs from :data:`SCHEMA_SHA256` (exit code 1)."""


class MetadataValidationError(VolcnnError, ValueError):
    """``metadata.json`` does not satisfy the schema; ``errors`` lists one line per violation."""

    def __init__(self, errors: Sequence[str], source: str = "metadata") -> None:
        self.errors = list(errors)
        super().__init__(f"{source} fails {SCHEMA_NAME} ({len(self.errors)} error(s)):\n  " + "\n  ".join(errors))


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check.

    Attributes:
        name: short name of the check (``metadata``, ``network_io``, ``export``).
        status: ``"pass"``, ``"fail"`` or ``"skip"``.
        detail: one line on what was checked, or why it failed.
    """

    name: str
    status: Status
    detail: str

    @property
    def ok(self) -> bool:
        """True unless the check failed (a skipped check is not a failure)."""
        return self.status != "fail"

    def __str__(self) -> str:
        return f"{self.status.upper():4} {self.name}: {self.detail}"


def load_schema(path: str | os.PathLike[str] | None = None, *, expected_sha256: str = SCHEMA_SHA256) -> dict[str, Any]:
    """Load the vendored metadata schema after checking its sha256.

    Args:
        path: schema file; defaults to the copy vendored in ``volcnn/bundle/schema``.
        expected_sha256: the hash the file must have.

    Raises:
        SchemaIntegrityError: when the file is missing or its hash differs.
    """
    schema_path = _SCHEMA_PATH if path is None else Path(path)
    if not schema_path.is_file():
        raise SchemaIntegrityError(f"vendored schema not found: {schema_path}")
    digest = sha256_file(schema_path)
    if digest != expected_sha256:
        raise SchemaIntegrityError(
            f"vendored schema {schema_path} has sha256 {digest}, expected {expected_sha256}; "
            "refusing to validate against a modified schema"
        )
    schema: dict[str, Any] = json.loads(schema_path.read_text(encoding="utf-8"))
    return schema


def _error_line(error: Any) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "<root>"
    return f"{where}: {error.message}"


def validate_metadata(
    metadata: Mapping[str, Any] | str | os.PathLike[str], schema: Mapping[str, Any] | None = None
) -> None:
    """Validate bundle metadata against the vendored MONAI schema, with no network access.

    Besides the schema, the ``schema`` field of the metadata must name the vendored schema file, so that a
    bundle written for another schema version is not passed by this one.

    Args:
        metadata: the parsed metadata or the path of ``metadata.json``.
        schema: the schema to use; defaults to :func:`load_schema` (hash checked).

    Raises:
        MetadataValidationError: listing every violation, each as ``path: message``
            (e.g. ``<root>: 'authors' is a required property``).
        SchemaIntegrityError: when the vendored schema was modified.
    """
    source = "metadata"
    if not isinstance(metadata, Mapping):
        source = str(metadata)
        metadata = json.loads(Path(metadata).read_text(encoding="utf-8"))
        if not isinstance(metadata, Mapping):
            raise MetadataValidationError([f"<root>: expected a JSON object, got {type(metadata).__name__}"], source)
    schema = load_schema() if schema is None else schema
    validator = Draft201909Validator(schema)
    errors = [_error_line(e) for e in sorted(validator.iter_errors(dict(metadata)), key=lambda e: list(e.path))]
    url = metadata.get("schema")
    if isinstance(url, str) and url.rsplit("/", 1)[-1] != SCHEMA_NAME:
        errors.append(f"schema: {url!r} does not name the vendored {SCHEMA_NAME}")
    if errors:
        raise MetadataValidationError(errors, source)
    logger.info("%s is valid against %s", source, SCHEMA_NAME)


def _io_spec(meta_file: Path) -> tuple[int, tuple[int, ...], int]:
    """(input channels, input spatial shape, output channels) from ``network_data_format``."""
    fmt = json.loads(meta_file.read_text(encoding="utf-8"))["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    return int(image["num_channels"]), tuple(int(s) for s in image["spatial_shape"]), int(pred["num_channels"])


def _features_of(config: Path) -> Any:
    """The config's declared clinical features (a list or object), or None (an image network)."""
    try:
        features = json.loads(config.read_text(encoding="utf-8")).get("features")
    except (OSError, ValueError):
        return None
    return features if isinstance(features, list | dict) and features else None


def _check_multimodal_io(root: Path, config: Path, meta: Path, net_id: str, device: str) -> str:
    """``network(image, features)`` of a clinical or fusion bundle on ``(1, C, *spatial)`` and all-missing features
    ``(1, F_raw)`` gives ``(1, K)`` as in the metadata."""
    from volcnn.io.features import parse_feature_spec

    in_ch, spatial, out_ch = _io_spec(meta)
    spec = parse_feature_spec(_features_of(config), f"{config}: features")
    net = bundle_parser(root, config, device=device).get_parsed_content(net_id, instantiate=True).to(device).eval()
    x = torch.rand(1, in_ch, *spatial, device=device)
    feats = torch.full((1, spec.n_columns), float("nan"), device=device)
    with torch.no_grad():
        out = net(x, features=feats)
    if tuple(out.shape) != (1, out_ch):
        raise ValueError(f"output shape {tuple(out.shape)}, expected (1, {out_ch}) from metadata")
    if not bool(torch.isfinite(out).all()):
        raise ValueError("non-finite output with every feature missing: the missing values are not imputed")
    return (
        f"{net_id}: (1, {in_ch}, {', '.join(map(str, spatial))}) + features (1, {spec.n_columns}) -> (1, {out_ch}) "
        "as in metadata"
    )


def check_network_io(
    bundle_dir: str | os.PathLike[str],
    *,
    config_file: str | os.PathLike[str] | None = None,
    net_id: str = "network",
    device: str = "cpu",
) -> str:
    """Check the network against ``network_data_format`` with MONAI's ``verify_net_in_out``.

    ``verify_net_in_out`` forwards a random ``(1, C, *spatial_shape)`` tensor and compares ``output.shape[1]`` and
    the output dtype with ``outputs#pred``; for a classifier's ``(B, K)`` logits, ``shape[1]`` is K, so MONAI's
    check applies as is. The config's ``patch_size`` and ``num_classes`` (when present as plain values) must
    also agree with the metadata.

    Args:
        bundle_dir: the bundle root.
        config_file: config defining the network; defaults to ``configs/inference.json``.
        net_id: config id of the instantiated network (not ``network_def``, which is a registry name here).
        device: where to run the forward pass.

    Returns:
        A one-line summary.

    Raises:
        ValueError, KeyError: on a mismatch or a missing key.
    """
    from monai.bundle import verify_net_in_out

    root = Path(bundle_dir).resolve()
    config = root / _CONFIG if config_file is None else Path(config_file)
    meta = root / _META
    if _features_of(config) is not None:
        return _check_multimodal_io(root, config, meta, net_id, device)
    # the config's own `device` key cannot be overridden here (verify_net_in_out takes `device` as its argument);
    # it moves the network to `device` itself
    verify_net_in_out(net_id=net_id, meta_file=str(meta), config_file=str(config), device=device, bundle_root=str(root))
    in_ch, spatial, out_ch = _io_spec(meta)
    raw = json.loads(config.read_text(encoding="utf-8"))
    patch, classes = raw.get("patch_size"), raw.get("num_classes")
    if isinstance(patch, list) and tuple(patch) != spatial:
        raise ValueError(f"config patch_size {patch} differs from metadata input spatial_shape {list(spatial)}")
    if isinstance(classes, int) and classes != out_ch:
        raise ValueError(f"config num_classes {classes} differs from metadata pred num_channels {out_ch}")
    return f"{net_id}: (1, {in_ch}, {', '.join(map(str, spatial))}) -> (1, {out_ch}) as in metadata"


def check_export(
    bundle_dir: str | os.PathLike[str],
    *,
    config_file: str | os.PathLike[str] | None = None,
    net_id: str = "network",
    filepath: str | os.PathLike[str] | None = None,
    atol: float = 1e-4,
    use_trace: bool | None = None,
) -> str:
    """Export the network to TorchScript with MONAI's ``ckpt_export`` and compare it with the eager network.

    With ``models/model.pt`` present, that checkpoint is exported to ``models/model.ts`` (or ``filepath``).
    Without it, a freshly initialised network is saved and exported in a temporary directory, only to prove
    that export works. The TorchScript module is then loaded and its output on a random input of the
    metadata's shape must match the eager network's within ``atol``. Runs on the CPU.

    Args:
        bundle_dir: the bundle root.
        config_file: config defining the network; defaults to ``configs/inference.json``.
        net_id: config id of the instantiated network.
        filepath: where to write the ``.ts`` (with a checkpoint); defaults to ``models/model.ts``.
        atol: largest allowed absolute difference between eager and TorchScript outputs.
        use_trace: ``True`` traces, ``False`` scripts; ``None`` scripts and falls back to tracing if
            scripting fails.

    Returns:
        A one-line summary.

    Raises:
        ValueError: when the outputs differ or have the wrong shape; errors of the export itself propagate.
    """
    from monai.bundle import ckpt_export

    root = Path(bundle_dir).resolve()
    config = root / _CONFIG if config_file is None else Path(config_file)
    meta = root / _META
    if _features_of(config) is not None:
        return _check_export_with_features(root, net_id, filepath, atol)
    in_ch, spatial, out_ch = _io_spec(meta)
    parser = bundle_parser(root, config, device="cpu")
    net = parser.get_parsed_content(net_id, instantiate=True)
    ckpt = root / "models" / "model.pt"

    with tempfile.TemporaryDirectory(prefix="volcnn-export-") as tmp:
        if ckpt.is_file():
            target = root / "models" / "model.ts" if filepath is None else Path(filepath)
            source = f"{ckpt.relative_to(root)}"
        else:
            ckpt, target, source = Path(tmp) / "model.pt", Path(tmp) / "model.ts", "fresh weights (no models/model.pt)"
            torch.save(net.state_dict(), ckpt)
        key = weights_key(ckpt)
        load_weights(net, ckpt)

        how = "traced" if use_trace else "scripted"
        kwargs: dict[str, Any] = {
            "net_id": net_id,
            "filepath": str(target),
            "ckpt_file": str(ckpt),
            "meta_file": str(meta),
            "config_file": str(config),
            "key_in_ckpt": key,
            **bundle_overrides(root, "cpu"),
        }
        try:
            ckpt_export(use_trace=bool(use_trace), input_shape=[1, in_ch, *spatial], **kwargs)
        except Exception as err:
            if use_trace is not None:
                raise
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            logger.warning("torch.jit.script failed (%s); retrying with torch.jit.trace", first_line)
            ckpt_export(use_trace=True, input_shape=[1, in_ch, *spatial], **kwargs)
            how = f"traced (scripting failed: {first_line[:80]})"

        ts_net = torch.jit.load(str(target), map_location="cpu").eval()
        x = torch.rand(1, in_ch, *spatial, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            eager_out, ts_out = net.eval()(x), ts_net(x)
        if tuple(eager_out.shape) != (1, out_ch):
            raise ValueError(f"eager output shape {tuple(eager_out.shape)}, expected (1, {out_ch}) from metadata")
        diff = float((eager_out - ts_out).abs().max())
        if not diff <= atol:
            raise ValueError(f"TorchScript output differs from eager by {diff:.3g} > atol {atol:g}")
        where = "temporary model.ts" if source.startswith("fresh") else str(target)
    return f"{source} {how} to {where}; max |eager - ts| = {diff:.2e} <= {atol:g}"


def _check_export_with_features(root: Path, net_id: str, filepath: str | os.PathLike[str] | None, atol: float) -> str:
    """:func:`check_export` of a network ``(image, features)``, through :mod:`volcnn.bundle.export` (MONAI's
    ``ckpt_export`` traces a single input): scripted or traced, loaded back and compared on
    :func:`~volcnn.bundle.export.example_inputs` (features partly and wholly missing)."""
    from volcnn.bundle.export import check_parity, export_torchscript
    from volcnn.core.atomic import atomic_path
    from volcnn.models.bundle_config import load_bundle_network

    with tempfile.TemporaryDirectory(prefix="volcnn-export-") as tmp:
        ckpt = root / "models" / "model.pt"
        if ckpt.is_file():
            target, source = (root / "models" / "model.ts" if filepath is None else Path(filepath)), str(ckpt.name)
        else:
            net = bundle_parser(root, root / _CONFIG, device="cpu").get_parsed_content(net_id, instantiate=True)
            ckpt, target, source = Path(tmp) / "model.pt", Path(tmp) / "model.ts", "fresh weights (no models/model.pt)"
            torch.save(net.state_dict(), ckpt)
        network, description, _ = load_bundle_network(root, ckpt, "cpu", net_id=net_id)
        with atomic_path(target) as part:  # a failed check leaves the previous model.ts
            how = export_torchscript(root, ckpt, part, description, net_id=net_id, input_shape=[])
            diff = check_parity(part, network, description, atol)
        where = "temporary model.ts" if source.startswith("fresh") else str(target)
    how = {"script": "scripted", "trace": "traced"}.get(how, how)
    return f"{source} (image, features) {how} to {where}; max |p_eager - p_ts| = {diff:.2e} <= {atol:g}"


def verify_bundle(
    bundle_dir: str | os.PathLike[str], *, export: bool = True, net_id: str = "network", device: str = "cpu"
) -> list[CheckResult]:
    """Run the offline bundle checks: metadata schema, network input/output, TorchScript export.

    Every check runs even when an earlier one fails, so that one run lists all problems.

    Args:
        bundle_dir: the bundle root (holding ``configs/metadata.json`` and ``configs/inference.json``).
        export: run the export check (writes ``models/model.ts`` when ``models/model.pt`` exists).
        net_id: config id of the instantiated network in ``inference.json``.
        device: device of the input/output check; the export check always runs on the CPU.

    Returns:
        One :class:`CheckResult` per check, in order ``metadata``, ``network_io``, ``export``.

    Raises:
        SchemaIntegrityError: before any check, when the vendored schema was modified.
    """
    schema = load_schema()
    root = Path(bundle_dir).resolve()
    results: list[CheckResult] = []

    def run(name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            detail = fn(*args, **kwargs)
        except Exception as err:  # a failed check is reported, not raised
            logger.debug("check %s failed", name, exc_info=True)
            results.append(CheckResult(name, "fail", f"{type(err).__name__}: {err}"))
        else:
            results.append(CheckResult(name, "pass", detail))

    def metadata_check() -> str:
        validate_metadata(root / _META, schema)
        return f"{_META} is valid against {SCHEMA_NAME} (sha256 {SCHEMA_SHA256[:12]}...)"

    run("metadata", metadata_check)
    run("network_io", check_network_io, root, net_id=net_id, device=device)
    if export:
        run("export", check_export, root, net_id=net_id)
    else:
        results.append(CheckResult("export", "skip", "not requested"))
    for result in results:  # reported at INFO: the caller decides what a failure means
        logger.info("%s", result)
    return results
