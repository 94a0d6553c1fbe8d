"""Hard-negative mining: the training CTs' own false positives become negatives, and training continues.

The patch classifier learns from the candidates of the datalist (LUNA16 style: nodules, and negatives a candidate
generator proposed). Run over a whole CT, it also fires on structures no candidate generator proposed (vessel
bifurcations, the hilum, the chest wall), and those false positives, not the candidates, decide the FROC. Every
LUNA16 false-positive-reduction system therefore mines: run the detector over the *training* CTs, keep its findings
that lie outside every annotated nodule, add them as negatives, and train on.

One round (:func:`mine_round`), from the weights of the round before (round 1: the run's ``models/model.pt``):

1. the heat map of every training CT (:class:`~volcnn.inference.InferenceRunner`, its findings at or above
   ``threshold``, at most ``max_per_image`` per CT) into ``RUN/mining/round_<r>/heatmaps/`` (a killed round
   skips the CTs already done, as ``volcnn infer`` does);
2. findings farther than a nodule's radius plus ``margin_mm`` from every annotated nodule of their CT (the
   annotation CSV, and the datalist's positive centres) and farther than ``dedupe_mm`` from every training entry
   of their CT become entries ``{"image", "label": 0, "center", "patient", "source": "mined", "round": r}``; every
   other training entry carries ``"source"`` (``"datalist"`` unless it had one) and ``"round"`` too, so a batch
   collates entries with the same keys;
3. ``RUN/mining/round_<r>/datalist.json``: the training section of the round before plus the mined negatives;
   validation and test sections copied unchanged;
4. training through the bundle's ``train.json`` (``monai.bundle.run("training", ...)``) with that datalist,
   ``output_dir`` the round's folder, ``init_weights`` the round before's best weights, ``max_epochs`` the round's
   epochs and ``resume`` true, so a killed round continues from its last checkpoint;
5. ``done.json`` in the round's folder marks it finished; a re-run skips finished rounds.

Only the datalist's ``training`` section is ever read for mining: validation and test CTs are never inferred.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from volcnn.core.atomic import atomic_write_json
from volcnn.core.errors import UsageError
from volcnn.core.hashing import sha256_file
from volcnn.engines.run_record import SETTING_DEFAULTS
from volcnn.evaluation.findings import read_annotations
from volcnn.inference.runner import InferenceRunner
from volcnn.io.datalist import load_datalist, read_datalist_json
from volcnn.io.sources import case_name
from volcnn.models.weights import load_weights

__all__ = ["MiningSettings", "final_weights", "mine_negatives", "mine_round", "run_mining"]

logger = logging.getLogger(__name__)

#: keys of train.json a round needs resolved (the rest of the bundle is run as configured)
_SETTINGS = (
    "network_def", "patch_size", "pixdim", "intensity", "hu_window", "num_classes", "datalist", "dataset_dir", "device"
)  # fmt: skip


@dataclass(frozen=True)
class MiningSettings:
    """How negatives are mined and how long each round trains.

    Attributes:
        rounds: mining rounds (each: mine over the training CTs, then train).
        epochs: training epochs per round (from the round before's best weights).
        learning_rate: learning rate of a round's training; None keeps the bundle's.
        threshold: smallest finding probability mined.
        max_per_image: most findings mined per CT (the most probable first).
        margin_mm: a finding within a nodule's radius plus this is the nodule, not a negative.
        default_radius_mm: radius of an annotated nodule whose diameter is unknown (a datalist positive without
            ``diameter_mm`` and no annotation CSV row).
        dedupe_mm: a finding this close to an entry of the training datalist is that entry, not a new one.
        stride_mm: heat-map grid step of the mining pass.
    """

    rounds: int = 1
    epochs: int = 5
    learning_rate: float | None = None
    threshold: float = 0.3
    max_per_image: int = 20
    margin_mm: float = 5.0
    default_radius_mm: float = 10.0
    dedupe_mm: float = 3.0
    stride_mm: float = 4.0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.epochs < 1 or self.max_per_image < 1:
            raise ValueError(f"rounds, epochs and max_per_image must be >= 1, got {self}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


def _nodules(
    entries: Sequence[Mapping[str, Any]], annotations: Mapping[str, list[tuple[list[float], float]]], default_r: float
) -> dict[str, list[tuple[np.ndarray, float]]]:
    """``{image: [(centre RAS mm, radius mm), ...]}``: the annotation CSV's nodules (by case name) and the
    datalist's positive centres of each training image."""
    out: dict[str, list[tuple[np.ndarray, float]]] = {}
    for e in entries:
        image = e["image"]
        if image not in out:
            out[image] = [(np.asarray(c, dtype=np.float64), 0.5 * d) for c, d in annotations.get(case_name(image), [])]
        if int(e.get("label", 0)) != 0 and e.get("center") is not None:
            d = e.get("diameter_mm")
            radius = 0.5 * float(d) if d is not None and float(d) > 0 else default_r
            out[image].append((np.asarray(e["center"], dtype=np.float64), radius))
    return out


def mine_negatives(
    findings: Mapping[str, Sequence[Mapping[str, Any]]],
    entries: Sequence[Mapping[str, Any]],
    raw_entries: Sequence[Mapping[str, Any]],
    nodules: Mapping[str, Sequence[tuple[np.ndarray, float]]],
    round_index: int,
    settings: MiningSettings,
) -> list[dict[str, Any]]:
    """New negative entries from the findings of the training images.

    Args:
        findings: ``{image (resolved path): findings.json's findings}``, most probable first.
        entries: the training section as :func:`~volcnn.io.load_datalist` resolves it (absolute ``image``).
        raw_entries: the same entries as written in the datalist (``image`` as the datalist has it).
        nodules: ``{image: [(centre, radius), ...]}`` (see :func:`_nodules`).
        round_index: the round the entries are tagged with.
        settings: margin, dedupe distance, cap per image.

    Returns:
        ``[{"image", "label": 0, "center", ("patient", "case" when the image's entries have them), "source":
        "mined", "round"}, ...]`` in image order, each image's most probable first.
    """
    by_image: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        by_image.setdefault(e["image"], []).append(i)
    mined: list[dict[str, Any]] = []
    for image, indices in by_image.items():
        taken = [np.asarray(entries[i]["center"], dtype=np.float64) for i in indices if entries[i].get("center")]
        template = raw_entries[indices[0]]
        kept = 0
        for finding in findings.get(image, []):
            if kept >= settings.max_per_image:
                break
            c = np.asarray(finding["center_ras_mm"], dtype=np.float64)
            if any(np.linalg.norm(c - n) <= r + settings.margin_mm for n, r in nodules.get(image, [])):
                continue
            if any(np.linalg.norm(c - t) <= settings.dedupe_mm for t in taken):
                continue
            entry: dict[str, Any] = {"image": template["image"], "label": 0, "center": [round(float(v), 3) for v in c]}
            entry.update({k: template[k] for k in ("patient", "case") if k in template})
            entry.update(source="mined", round=int(round_index))
            mined.append(entry)
            taken.append(c)
            kept += 1
    return mined


def _tagged(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {**entry, "source": entry.get("source", "datalist"), "round": int(entry.get("round", 0))}


def _resolved_settings(config_files: Sequence[str], overrides: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """The values of :data:`_SETTINGS` after the overrides, and the parser (nothing else is instantiated yet)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.update(dict(overrides))
    # a train.json from before a setting has its default (SETTING_DEFAULTS: one from before `intensity` windows HU)
    return {key: parser.get_parsed_content(key, default=SETTING_DEFAULTS.get(key)) for key in _SETTINGS}, parser


def round_dir(run_dir: str | os.PathLike[str], round_index: int) -> Path:
    """``RUN/mining/round_<r>``."""
    return Path(run_dir) / "mining" / f"round_{int(round_index)}"


def final_weights(run_dir: str | os.PathLike[str]) -> Path:
    """The best weights of the last finished mining round, or the run's own ``models/model.pt`` when none is."""
    mining = Path(run_dir) / "mining"
    done = sorted(
        (int(p.parent.name.split("_")[1]), p.parent) for p in mining.glob("round_*/done.json") if p.parent.is_dir()
    )
    return (done[-1][1] if done else Path(run_dir)) / "models" / "model.pt"


def mine_round(
    config_files: Sequence[str],
    run_dir: str | os.PathLike[str],
    round_index: int,
    overrides: Mapping[str, Any],
    settings: MiningSettings,
    annotations: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """One mining round (see the module docstring); returns its ``done.json`` content.

    Args:
        config_files: the bundle's training configs (``train.json``, overlays).
        run_dir: the training run's output folder (``models/model.pt`` from its training).
        round_index: 1, 2, ...
        overrides: the training's config overrides (``dataset_dir``, ``datalist``, ``bundle_root``...).
        settings: the mining settings.
        annotations: nodule CSV (LUNA16 ``annotations.csv`` or volcnn ``nodules.csv``), for the nodules' radii.
    """
    from monai.bundle import run as bundle_run

    out = round_dir(run_dir, round_index)
    done_file = out / "done.json"
    if done_file.is_file():
        logger.info("mining round %d already done (%s)", round_index, done_file)
        return dict(json.loads(done_file.read_text()))
    before = Path(run_dir) if round_index == 1 else round_dir(run_dir, round_index - 1)
    weights_in = before / "models" / "model.pt"
    if not weights_in.is_file():
        raise UsageError(f"{weights_in}: weights to mine with not found; train the run first")
    resolved, parser = _resolved_settings(config_files, overrides)
    datalist_in = Path(resolved["datalist"]) if round_index == 1 else before / "datalist.json"
    raw = read_datalist_json(datalist_in)
    raw_training = [e if isinstance(e, dict) else {"image": e} for e in raw.get("training", [])]
    entries = load_datalist(datalist_in, "training", resolved["dataset_dir"])
    if not entries:
        raise UsageError(f"{datalist_in}: no training entries to mine")

    network = load_weights(parser.get_parsed_content("network"), weights_in, resolved["device"])
    runner = InferenceRunner(
        network,
        patch_size=resolved["patch_size"],
        pixdim=resolved["pixdim"],
        hu_window=resolved["hu_window"],
        intensity=resolved["intensity"],
        stride_mm=settings.stride_mm,
        device=resolved["device"],
        threshold=settings.threshold,
        max_findings=settings.max_per_image + 10,  # some are nodules or known entries, and get dropped
        model_info={"name": "mining", "version": str(round_index), "sha256": sha256_file(weights_in)},
        progress=False,
    )
    images = list(dict.fromkeys(e["image"] for e in entries))
    logger.info("mining round %d: heat maps of %d training CTs with %s", round_index, len(images), weights_in)
    result = runner.run(images, out / "heatmaps")
    findings = _read_findings(result, out / "heatmaps")
    table = read_annotations(annotations)[0] if annotations is not None else {}
    mined = mine_negatives(
        findings, entries, raw_training, _nodules(entries, table, settings.default_radius_mm), round_index, settings
    )
    datalist_out = out / "datalist.json"
    rounds_doc = {**raw, "training": [_tagged(e) for e in raw_training] + mined}
    atomic_write_json(datalist_out, rounds_doc)
    logger.info(
        "mining round %d: %d new negatives from %d CTs (%d failed); training %d epochs on %d entries",
        round_index, len(mined), len(images), len(result["failures"]), settings.epochs, len(rounds_doc["training"]),
    )  # fmt: skip

    train_overrides = {
        **overrides,
        "datalist": str(datalist_out),
        "output_dir": str(out),
        "init_weights": str(weights_in),
        "max_epochs": settings.epochs,
        "resume": True,
    }
    if settings.learning_rate is not None:
        train_overrides["learning_rate"] = settings.learning_rate
    bundle_run("training", config_file=list(config_files), **train_overrides)
    if not (out / "models" / "model.pt").is_file():
        raise RuntimeError(f"{out}: the round's training wrote no models/model.pt")
    doc = {
        "round": round_index,
        "weights_in": str(weights_in),
        "weights_out": str(out / "models" / "model.pt"),
        "datalist": str(datalist_out),
        "training_images": len(images),
        "failed_images": [f["input"] for f in result["failures"]],
        "mined": len(mined),
        "mined_per_image": dict(Counter(str(m["image"]) for m in mined)),
        "training_entries": len(rounds_doc["training"]),
        "settings": asdict(settings),
    }
    atomic_write_json(done_file, doc)
    return doc


def _read_findings(result: Mapping[str, Any], out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """``{input path: findings}`` of a runner result, from each processed case's ``OUT/<case>/findings.json``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for item in result["processed"]:
        path = out_dir / item["case"] / "findings.json"
        if path.is_file():
            out[item["input"]] = list(json.loads(path.read_text())["findings"])
    return out


def run_mining(
    config_files: Sequence[str],
    run_dir: str | os.PathLike[str],
    overrides: Mapping[str, Any],
    settings: MiningSettings,
    annotations: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Every round of :class:`MiningSettings` over a trained run; writes ``RUN/mining/mining.json``.

    Returns:
        ``{"rounds": [done.json of each round], "final_weights": path, "settings": ...}``.

    Raises:
        UsageError: the run has no trained weights, or the datalist no training entries.
    """
    if not (Path(run_dir) / "models" / "model.pt").is_file():
        raise UsageError(f"{Path(run_dir) / 'models' / 'model.pt'}: not found; train the run before mining it")
    if annotations is not None and not Path(annotations).is_file():
        raise UsageError(f"{annotations}: annotations CSV not found")
    rounds = [
        mine_round(config_files, run_dir, r, overrides, settings, annotations) for r in range(1, settings.rounds + 1)
    ]
    summary = {"rounds": rounds, "final_weights": str(final_weights(run_dir)), "settings": asdict(settings)}
    atomic_write_json(Path(run_dir) / "mining" / "mining.json", summary)
    return summary
