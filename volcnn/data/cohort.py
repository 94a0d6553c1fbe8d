"""The synthetic cohort: cases (phantom + nodules + scanner), LUNA16 CSVs, datalists and a summary.

Each case is built in a canonical RAS grid, blurred (partial volume) and given scanner noise, then
stored in one of several orientations (axis flips and permutations) with the matching affine, so that
every reported RAS centre is exactly where the nodule is in the written volume. Everything depends
only on ``seed``: the same seed gives the same bytes in every file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from volcnn.core.atomic import atomic_write_bytes
from volcnn.data.clinical import FEATURES, RISK_MODEL, ClinicalCase, assign_clinical, clinical_rng, oracle_aucs
from volcnn.data.dicom_series import nifti_gz_bytes, write_dicom_series
from volcnn.data.nodules import Nodule, place_nodules, sample_candidates, sample_nodule
from volcnn.data.phantom import SIZES, CaseGeometry, SizeSpec, build_phantom, chunk_slices
from volcnn.io.datalist import SECTIONS
from volcnn.io.datalist_split import split_patients

__all__ = [
    "ORIENTATIONS",
    "SPLITS",
    "SyntheticCase",
    "acquire",
    "sample_geometry",
    "synthesize_case",
    "synthesize_cohort",
]

logger = logging.getLogger(__name__)

ORIENTATIONS = ("RAS", "LPS", "LAS", "RPI", "LPI", "PRS", "SLP", "IRA")
SPLITS = SECTIONS  # the datalist sections, in order
_NODULE_COUNT_P = (0.2, 0.36, 0.24, 0.12, 0.08)  # 0..4 nodules per case
_MALIGNANT_P = 0.4


@dataclass
class SyntheticCase:
    """One generated case.

    Attributes:
        case_id: ``"case_000"``; patient: ``"p000"``.
        geometry: canonical grid and storage orientation.
        image: int16 HU array ``(I, J, K)`` in storage order.
        affine: ``(4, 4)`` voxel-to-RAS affine of ``image``.
        nodules: the rendered nodules.
        candidates: ``[(center_ras, label, kind)]`` (see :func:`~volcnn.data.nodules.sample_candidates`).
    """

    case_id: str
    patient: str
    geometry: CaseGeometry
    image: np.ndarray
    affine: np.ndarray
    nodules: list[Nodule]
    candidates: list[tuple[tuple[float, float, float], int, str]]


#: entropy that separates the vessel-attachment draws of a case from its other draws
_ATTACH_STREAM = 0x7A5C


def sample_geometry(rng: np.random.Generator, spec: SizeSpec, orientation: str = "RAS") -> CaseGeometry:
    """Draw matrix, spacing (multiples of 1/256 mm) and a scanner-like origin (multiples of 1/64 mm)."""
    n = int(rng.choice(spec.matrix))
    sxy = int(rng.integers(math.ceil(spec.inplane_mm[0] * 256), math.floor(spec.inplane_mm[1] * 256) + 1)) / 256
    sz = int(rng.integers(math.ceil(spec.slice_mm[0] * 256), math.floor(spec.slice_mm[1] * 256) + 1)) / 256
    fov = n * sxy
    nz = int(np.clip(round(fov * rng.uniform(*spec.z_over_fov) / sz), *spec.slices))
    raw = (-fov / 2 + rng.uniform(-15, 15), -fov / 2 + rng.uniform(-25, 10), rng.uniform(-380, -150) - nz * sz / 2)
    ox, oy, oz = (round(o * 64) / 64 for o in raw)
    codes = (orientation[0], orientation[1], orientation[2])
    return CaseGeometry((n, n, nz), (sxy, sxy, sz), (ox, oy, oz), codes)


def _conv_axis(a: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Convolve ``a`` along ``axis`` with the odd symmetric kernel ``w`` (edge padding)."""
    r = len(w) // 2
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    p = np.moveaxis(np.pad(a, pad, mode="edge"), axis, 0)
    n = a.shape[axis]
    out = w[0] * p[0:n]
    for k in range(1, len(w)):
        out += w[k] * p[k : k + n]
    return np.moveaxis(out, 0, axis)


def acquire(volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scanner model: partial-volume blur, noise, clipping and rounding (modifies ``volume`` in place).

    Gaussian blur with sigma 0.5-0.8 voxel along each axis, Gaussian noise with sigma 10-30 HU and a
    random in-plane correlation, clipping to [-1024, 3071], rounding.

    Args:
        volume: float32 HU ``(Z, Y, X)``.
        rng: random generator.

    Returns:
        int16 ``(Z, Y, X)``.
    """
    sigma = rng.uniform(0.5, 0.8)
    w = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2).astype(np.float32)
    w /= w.sum()
    nz, ny, nx = volume.shape
    for sl in chunk_slices(nz, ny * nx):
        c = volume[sl]
        c[...] = _conv_axis(_conv_axis(c, w, 1), w, 2)
    rows = max(1, 4_000_000 // (nz * nx))
    for y0 in range(0, ny, rows):
        c = volume[:, y0 : y0 + rows]
        c[...] = _conv_axis(c, w, 0)
    noise_hu, rho = rng.uniform(10.0, 30.0), rng.uniform(0.0, 0.4)
    out = np.empty(volume.shape, dtype=np.int16)
    for sl in chunk_slices(nz, ny * nx):
        c = volume[sl]
        wn = rng.standard_normal(c.shape, dtype=np.float32)
        if rho > 0:
            wn = wn + rho * (np.roll(wn, 1, axis=1) + np.roll(wn, 1, axis=2))
        c += wn * np.float32(noise_hu / math.sqrt(1 + 2 * rho * rho))
        np.clip(c, -1024, 3071, out=c)
        out[sl] = np.rint(c)
    return out


def synthesize_case(
    case_id: str,
    patient: str,
    spec: SizeSpec,
    rng: np.random.Generator,
    orientation: str = "RAS",
    junctions: int = 0,
    juxtavascular: float = 0.0,
    attach_rng: np.random.Generator | None = None,
) -> SyntheticCase:
    """Generate one case in memory: geometry, anatomy, nodules, candidates, scanner model, orientation.

    ``junctions`` adds that many negatives at vessel branch points; the image does not depend on it.
    ``juxtavascular`` is the share of nodules moved against a vessel, drawn from ``attach_rng``
    (see :func:`~volcnn.data.nodules.place_nodules`).
    """
    geom = sample_geometry(rng, spec, orientation)
    ph = build_phantom(geom, rng, spec)
    n_nod = int(rng.choice(len(_NODULE_COUNT_P), p=_NODULE_COUNT_P))
    drawn = [sample_nodule(rng, bool(rng.random() < _MALIGNANT_P), spec.nodule_mm) for _ in range(n_nod)]
    nodules = place_nodules(ph, rng, drawn, juxtavascular=juxtavascular, attach_rng=attach_rng)
    n_negatives = int(rng.integers(spec.negatives[0], spec.negatives[1] + 1))
    candidates = sample_candidates(ph, rng, nodules, n_negatives, n_junctions=junctions)
    canonical = acquire(ph.volume, rng).T  # (X, Y, Z) RAS, Fortran order
    ornt = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(orientation)))
    image = apply_orientation(canonical, ornt)
    affine = geom.affine @ inv_ornt_aff(ornt, canonical.shape)
    return SyntheticCase(case_id, patient, geom, image, affine, nodules, candidates)


def _split(strata: list[int], patients: list[str], seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    """Split cases (one patient each) into training/validation/test, balanced over ``strata``."""
    assignment = split_patients(
        dict(zip(patients, strata, strict=True)),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        stream=0x5EED,
    )
    return [assignment[p] for p in patients]


def _csv(header: list[str], rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def _f(v: float) -> str:
    return f"{v + 0.0:.3f}"  # + 0.0 turns -0.0 into 0.0


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _check_args(cases: int, seed: int, size: str, val_fraction: float, test_fraction: float) -> None:
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < 1:
        raise ValueError(f"cases must be an integer >= 1, got {cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(frac, (int, float)) or not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")


def synthesize_cohort(
    out_dir: str | Path,
    cases: int,
    seed: int,
    size: str = "small",
    dicom: bool = False,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    progress: bool = False,
    negatives: int | None = None,
    junctions: int = 0,
    clinical: bool = False,
    juxtavascular: float = 0.0,
) -> dict[str, Any]:
    """Generate a synthetic chest-CT cohort with nodules, LUNA16 CSVs and MONAI datalists.

    Writes, under ``out_dir``: ``images/case_XXX.nii.gz`` (int16 HU, sform/qform code 1),
    ``annotations.csv`` and ``candidates.csv`` (LUNA16 format, LPS mm), ``nodules.csv`` (RAS mm),
    ``datalist.json`` (candidates: nodule vs non-nodule), ``datalist_malignancy.json`` (nodules: benign vs
    malignant), ``datalist_volume.json`` (whole volumes: any nodule), ``cohort.json`` (the summary) and,
    with ``dicom``, ``dicom/case_XXX/IM0001.dcm...`` and ``datalist_dicom.json``. Splits are by patient.

    Args:
        out_dir: output folder (created).
        cases: number of cases (one patient each), >= 1.
        seed: random seed, >= 0; the same seed gives byte-identical files.
        size: ``"tiny"`` (tests), ``"small"`` (demo) or ``"full"`` (512x512, benchmarks); see :data:`SIZES`.
        dicom: also write every case as a DICOM series.
        val_fraction: fraction of patients in validation, in [0, 1).
        test_fraction: fraction of patients in test, in [0, 1); the two sum to < 1.
        progress: show a tqdm bar over cases.
        negatives: negative candidates per case (default: the size's range, e.g. 6-12 for ``small``); a model
            whose heat map must stay quiet over the whole lung field needs more of them.
        junctions: further negative candidates per case at vessel branch points (``kind`` "junction" in
            ``candidates.csv``), the structures a whole-CT heat map most often mistakes for nodules; the images
            are the same whatever the number.
        clinical: give each patient clinical features (age, sex, pack-years, family history, emphysema, CEA; about
            5% of the values missing, see :mod:`volcnn.data.clinical`) and draw each nodule's malignancy label from a
            risk model over them and the nodule's visible traits. ``datalist_malignancy.json`` then declares and
            carries the features, ``clinical.csv`` holds them per case, ``nodules.csv`` adds the risk and the class
            the nodule was drawn as (``appearance_malignant``) and ``cohort.json`` the model and its oracle AUCs.
            The images are the same with or without it (its draws come from a generator of their own).
        juxtavascular: share of nodules placed against a pulmonary vessel that runs into them, in [0, 1]; when
            above 0, ``nodules.csv`` gets a ``juxtavascular`` column and ``cohort.json`` the share. Their draws come
            from a generator of their own: every other nodule, candidate and voxel is the same as with 0, the
            default, whose files are those of a cohort made before the option existed.

    Returns:
        The summary (JSON-able): ``out_dir``, ``cases``, ``seed``, ``size``, per-split counts of cases,
        nodules (benign / malignant) and candidates, and the written files (relative to ``out_dir``).
        ``cohort.json`` holds the same with ``out_dir`` set to ``"."`` so that it does not depend on the path.

    Raises:
        ValueError: bad ``cases``, ``seed``, ``size`` or fractions.
    """
    _check_args(cases, seed, size, val_fraction, test_fraction)
    spec = SIZES[size]
    if negatives is not None:
        if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 0:
            raise ValueError(f"negatives must be an integer >= 0, got {negatives!r}")
        spec = dataclasses.replace(spec, negatives=(negatives, negatives))
    if isinstance(junctions, bool) or not isinstance(junctions, int) or junctions < 0:
        raise ValueError(f"junctions must be an integer >= 0, got {junctions!r}")
    if isinstance(juxtavascular, bool) or not isinstance(juxtavascular, int | float) or not 0 <= juxtavascular <= 1:
        raise ValueError(f"juxtavascular must be a share in [0, 1], got {juxtavascular!r}")
    out = Path(out_dir)
    width = max(3, len(str(cases - 1)))
    ids = [(f"case_{i:0{width}d}", f"p{i:0{width}d}") for i in range(cases)]
    orients = [ORIENTATIONS[k] for k in np.random.default_rng([seed, 0x0A1E]).permutation(len(ORIENTATIONS))]
    iterator: Any = range(cases)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"synth {size}", unit="case")
    records: list[_Record] = []
    for i in iterator:
        case_id, patient = ids[i]
        attach = np.random.default_rng([seed, i, _ATTACH_STREAM])
        case = synthesize_case(
            case_id,
            patient,
            spec,
            np.random.default_rng([seed, i]),
            orients[i % len(orients)],
            junctions,
            juxtavascular=float(juxtavascular),
            attach_rng=attach,
        )
        atomic_write_bytes(out / "images" / f"{case_id}.nii.gz", nifti_gz_bytes(case.image, case.affine))
        if dicom:
            entropy = ["volcnn-synthetic", str(seed), size, case_id]
            write_dicom_series(
                case.image, case.affine, out / "dicom" / case_id, uid_entropy=entropy, patient_id=f"SYNTH-{patient}"
            )
        spacing = [float(v) for v in np.linalg.norm(case.affine[:3, :3], axis=0)]
        orient = "".join(case.geometry.orientation)
        rec = _Record(case_id, patient, case.nodules, case.candidates, orient, list(case.image.shape), spacing)
        if clinical:  # relabel the nodules by the risk model; the class they were drawn as is their appearance
            rec.clinical = assign_clinical(clinical_rng(seed, i), case.nodules)
            rec.appearance = [n.malignant for n in case.nodules]
            labels = rec.clinical.labels
            rec.nodules = [dataclasses.replace(n, malignant=bool(y)) for n, y in zip(case.nodules, labels, strict=True)]
        records.append(rec)
        logger.info("%s: %s %s, %d nodules", case_id, orient, case.image.shape, len(case.nodules))
        del case
    strata = [2 if any(n.malignant for n in r.nodules) else int(bool(r.nodules)) for r in records]
    splits = _split(strata, [r.patient for r in records], seed, val_fraction, test_fraction)
    for rec, split in zip(records, splits, strict=True):
        rec.split = split
    summary: dict[str, Any] = {
        "name": "volcnn-synthetic",
        "out_dir": ".",
        "cases": cases,
        "seed": seed,
        "size": size,
        "dicom": dicom,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "splits": {s: _counts([r for r in records if r.split == s]) for s in SPLITS},
        "files": _write_tables(
            out, records, f"volcnn synthetic chest CT (seed {seed}, size {size})", dicom, clinical, juxtavascular > 0
        ),
        "case_list": [
            {"case": r.case_id, "patient": r.patient, "split": r.split, "orientation": r.orientation}
            | {"shape": r.shape, "spacing": r.spacing, "nodules": len(r.nodules)}
            for r in records
        ],
    }
    if clinical:
        summary["clinical"] = _clinical_summary(records)
    if juxtavascular > 0:
        summary["juxtavascular"] = float(juxtavascular)
    summary["files"]["cohort"] = "cohort.json"
    atomic_write_bytes(out / "cohort.json", _json(summary))
    logger.info("synthetic cohort: %d cases in %s", cases, out)
    return {**summary, "out_dir": str(out.resolve())}


@dataclass
class _Record:
    """What the tables need of one written case."""

    case_id: str
    patient: str
    nodules: list[Nodule]
    candidates: list[tuple[tuple[float, float, float], int, str]]
    orientation: str
    shape: list[int]
    spacing: list[float]
    split: str = ""
    clinical: ClinicalCase | None = None  # with ``clinical``: features, risks; ``nodules`` carry the final labels
    appearance: list[bool] = dataclasses.field(default_factory=list)  # with ``clinical``: the class drawn as

    @property
    def image(self) -> str:
        return f"images/{self.case_id}.nii.gz"

    def entry(self, label: int, center: tuple[float, float, float] | None = None) -> dict[str, Any]:
        """A datalist entry (volume mode without ``center``)."""
        out: dict[str, Any] = {"image": self.image, "label": label}
        if center is not None:
            out["center"] = list(center)
        return out | {"patient": self.patient, "case": self.case_id}


def _counts(records: list[_Record]) -> dict[str, Any]:
    """Per-split counts of cases, nodules and candidates."""
    nods = [n for r in records for n in r.nodules]
    labels = [c[1] for r in records for c in r.candidates]
    return {
        "cases": len(records),
        "cases_with_nodules": sum(bool(r.nodules) for r in records),
        "nodules": {"benign": sum(not n.malignant for n in nods), "malignant": sum(n.malignant for n in nods)},
        "candidates": {"positive": sum(labels), "negative": len(labels) - sum(labels)},
    }


def _clinical_summary(records: list[_Record]) -> dict[str, Any]:
    """What ``cohort.json`` says of the clinical features: declaration, risk model, missing shares, oracle AUCs."""
    cases = [r for r in records if r.clinical is not None]
    per_split: dict[str, Any] = {}
    for split in ("all", *SPLITS):
        drawn = [(r.clinical, len(r.nodules)) for r in cases if split in ("all", r.split) and r.clinical]
        clin = [c.clinical_logit for c, n in drawn for _ in range(n)]
        img = [v for c, _ in drawn for v in c.image_logits]
        y = [v for c, _ in drawn for v in c.labels]
        per_split[split] = {"nodules": len(y), "malignant": sum(y)} | oracle_aucs(clin, img, y)
    patients = [r.clinical.features for r in cases if r.clinical]
    return {
        "features": FEATURES,
        "missing": {k: sum(p[k] is None for p in patients) for k in FEATURES},
        "risk_model": RISK_MODEL.to_json(),
        "oracle_auc": per_split,
        "oracle_auc_note": "ROC AUC of the true partial logits (image, clinical) and of their sum, per split",
    }


def _write_clinical_csv(out: Path, records: list[_Record]) -> None:
    """``clinical.csv``: one row per case, a column per feature, empty where missing, binaries 0/1."""

    def cell(v: Any) -> str:
        return "" if v is None else str(int(v)) if isinstance(v, bool) else str(v)

    rows = [[r.case_id, *(cell(r.clinical.features[k]) for k in FEATURES)] for r in records if r.clinical]
    atomic_write_bytes(out / "clinical.csv", _csv(["case", *FEATURES], rows))


def _write_tables(
    out: Path, records: list[_Record], desc: str, dicom: bool, clinical: bool = False, attached: bool = False
) -> dict[str, Any]:
    """Write the CSVs and the datalists; return the written paths relative to ``out``."""
    ann = [
        [r.case_id, _f(-n.center[0]), _f(-n.center[1]), _f(n.center[2]), _f(n.diameter_mm)]
        for r in records
        for n in r.nodules
    ]
    cand = [[r.case_id, _f(-c[0][0]), _f(-c[0][1]), _f(c[0][2]), c[1]] for r in records for c in r.candidates]
    nods = [
        [
            r.case_id,
            r.patient,
            r.split,
            *(_f(v) for v in n.center),
            _f(n.diameter_mm),
            n.texture,
            int(n.malignant),
            int(n.calcified),
            *([int(n.juxtavascular)] if attached else []),
            *([] if r.clinical is None else [int(r.appearance[k]), f"{r.clinical.risks[k]:.4f}"]),
        ]
        for r in records
        for k, n in enumerate(r.nodules)
    ]
    atomic_write_bytes(out / "annotations.csv", _csv(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"], ann))
    atomic_write_bytes(out / "candidates.csv", _csv(["seriesuid", "coordX", "coordY", "coordZ", "class"], cand))
    header = ["case", "patient", "split", "x_ras", "y_ras", "z_ras", "diameter_mm", "texture", "malignant", "calcified"]
    header += ["juxtavascular"] if attached else []  # a cohort without them keeps the tables it had
    if clinical:
        header += ["appearance_malignant", "risk"]
    atomic_write_bytes(out / "nodules.csv", _csv(header, nods))
    files: dict[str, Any] = {"images": [r.image for r in records]}
    files |= {"annotations": "annotations.csv", "candidates": "candidates.csv", "nodules": "nodules.csv"}
    if clinical:
        _write_clinical_csv(out, records)
        files["clinical"] = "clinical.csv"
    nodule_labels = {"0": "non-nodule", "1": "nodule"}

    def candidates(r: _Record) -> list[dict[str, Any]]:
        return [r.entry(label, center) for center, label, _ in r.candidates]

    def dicom_candidates(r: _Record) -> list[dict[str, Any]]:
        return [e | {"image": f"dicom/{r.case_id}"} for e in candidates(r)]

    def malignancy(r: _Record) -> list[dict[str, Any]]:
        extra = {} if r.clinical is None else {"features": r.clinical.features}
        return [r.entry(int(n.malignant), n.center) | extra for n in r.nodules]

    what_malignancy = "nodules: benign vs malignant"
    if clinical:
        what_malignancy += " (drawn from a risk model over the clinical features and the nodule's visible traits)"
    specs = [
        ("datalist", nodule_labels, "candidates: nodule vs non-nodule", candidates),
        ("datalist_malignancy", {"0": "benign", "1": "malignant"}, what_malignancy, malignancy),
        (
            "datalist_volume",
            {"0": "no nodule", "1": "nodule"},
            "volumes: any nodule",
            lambda r: [r.entry(int(bool(r.nodules)))],
        ),
    ]
    if dicom:
        specs.append(("datalist_dicom", nodule_labels, "candidates on the DICOM series", dicom_candidates))
        files["dicom"] = [f"dicom/{r.case_id}" for r in records]
    for name, labels, what, make in specs:
        body: dict[str, Any] = {"name": "volcnn-synthetic", "description": f"{desc}; {what}; centers in RAS mm"}
        body["labels"] = labels
        if clinical and name == "datalist_malignancy":
            body["features"] = FEATURES
        for split in SPLITS:
            body[split] = [e for r in records if r.split == split for e in make(r)]
        atomic_write_bytes(out / f"{name}.json", _json(body))
        files[name] = f"{name}.json"
    return files
