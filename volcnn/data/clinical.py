"""Clinical features of the synthetic patients and the risk model that labels their nodules (``synth --clinical``).

Each patient gets age, sex, smoking pack-years, family history of lung cancer, emphysema and a blood marker
(carcinoembryonic antigen, ``cea``). A nodule is still *drawn* as before (:func:`~volcnn.data.nodules.sample_nodule`
given an appearance class), but its malignancy label is then drawn from a Brock/PanCan-style logistic risk model
over the patient's clinical traits and the nodule's visible image traits::

    P(malignant) = sigmoid(intercept + clinical_logit(patient) + image_logit(nodule))

so that the image and the clinical data each carry part of the signal and their combination more. The image and
clinical traits are drawn independently, so ``P(malignant | clinical traits)`` is an increasing function of
``clinical_logit`` alone (and likewise for the image): the AUC of each partial logit is the best AUC any model of
that modality can reach (the *oracle* AUC, :func:`oracle_aucs`).

All randomness comes from a generator of its own per case (:func:`clinical_rng`), never from the one that draws the
image, so a cohort's images do not depend on whether clinical features are generated. About
:data:`MISSING_FRACTION` of every feature value except age and sex is then removed (``None``) at random; the
label is drawn from the complete values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from volcnn.data.nodules import Nodule, sample_nodule

__all__ = [
    "FEATURES",
    "MISSING_FRACTION",
    "NEVER_MISSING",
    "RISK_MODEL",
    "ClinicalCase",
    "RiskModel",
    "assign_clinical",
    "clinical_rng",
    "image_traits",
    "mask_missing",
    "oracle_aucs",
    "roc_auc",
    "sample_patient",
    "simulate",
]

#: The top-level ``features`` declaration written into ``datalist_malignancy.json`` (see ``volcnn.io.features``).
FEATURES: dict[str, dict[str, Any]] = {
    "age": {"type": "numeric", "unit": "years", "min": 0, "max": 120},
    "sex": {"type": "categorical", "values": ["F", "M"]},
    "pack_years": {"type": "numeric", "unit": "pack-years", "min": 0, "max": 300},
    "family_history": {"type": "binary", "description": "lung cancer in a first-degree relative"},
    "emphysema": {"type": "binary", "description": "emphysema on a previous CT"},
    "cea": {"type": "numeric", "unit": "ng/mL", "min": 0, "description": "serum carcinoembryonic antigen"},
}
MISSING_FRACTION = 0.05
NEVER_MISSING = ("age", "sex")
_STREAM = 17  # the clinical generator of case i is default_rng([seed, i, _STREAM])


def clinical_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of case ``index``'s clinical draws (independent of the one that draws its image)."""
    return np.random.default_rng([seed, index, _STREAM])


def sample_patient(rng: np.random.Generator) -> dict[str, Any]:
    """Draw one patient's complete clinical features (a screening-like population), as written to the datalist.

    Age 45-85 (mean 63); 45% women; 30% never-smokers (0 pack-years), the others log-normal around 30 pack-years,
    more in older patients and in men; family history 18%, independent of the rest; emphysema about 13%, rising
    steeply with pack-years and with age; CEA log-normal around 2 ng/mL, higher with pack-years and with emphysema.
    The risk factors are correlated as in screening cohorts (smoking drives emphysema and raises CEA): ln(1 +
    pack-years) correlates with ln CEA at about 0.8 (most of it the never-smokers) and with emphysema at about 0.4,
    age with both at 0.15-0.25. A value a patient lacks can then be partly inferred from the others, which is what
    the networks' conditional imputation (:class:`volcnn.networks.tabular.FeatureNormalizer`) does. Values are
    rounded as written (age in whole years, pack-years to 0.1, CEA to 0.01), and the risk model sees exactly these.

    Every draw is made whatever the earlier outcomes (a fixed number of draws per patient).

    Returns:
        ``{"age": int, "sex": "F" | "M", "pack_years": float, "family_history": bool, "emphysema": bool,
        "cea": float}``.
    """
    age = int(np.clip(round(rng.normal(63.0, 8.0)), 45, 85))
    female = bool(rng.random() < 0.45)
    smoker = rng.random() >= 0.3
    heavy = rng.lognormal(math.log(30.0) + 0.05 * (age - 63) - 0.25 * female, 0.6)
    pack_years = round(float(np.clip(heavy, 1.0, 150.0)), 1) if smoker else 0.0
    family_history = bool(rng.random() < 0.18)
    smoke = math.log1p(pack_years) - 2.5  # ~0 at 11 pack-years, -2.5 for never-smokers, +1 at 33
    emphysema = bool(rng.random() < _sigmoid(-3.0 + 1.35 * smoke + 0.06 * (age - 63)))
    log_cea = math.log(2.0) + 0.3 * smoke + 0.3 * emphysema + rng.normal(0.0, 0.4)
    cea = round(float(np.clip(math.exp(log_cea), 0.1, 200.0)), 2)
    return {
        "age": age,
        "sex": "F" if female else "M",
        "pack_years": pack_years,
        "family_history": family_history,
        "emphysema": emphysema,
        "cea": cea,
    }


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def mask_missing(
    values: Mapping[str, Any], rng: np.random.Generator, fraction: float = MISSING_FRACTION
) -> dict[str, Any]:
    """A copy of ``values`` with each feature not in :data:`NEVER_MISSING` set to ``None`` with probability
    ``fraction`` (one draw per declared feature, in declaration order, whatever the outcome)."""
    out = dict(values)
    u = rng.random(len(FEATURES))
    for name, ui in zip(FEATURES, u, strict=True):
        if name not in NEVER_MISSING and ui < fraction:
            out[name] = None
    return out


def image_traits(nodule: Nodule) -> dict[str, float]:
    """The nodule's visible traits that the risk model uses.

    Returns:
        ``log_diameter`` (ln of the diameter / 8 mm), ``part_solid``, ``ground_glass``, ``spiculated`` (any spike),
        ``lobulation`` (10 x the largest lobe amplitude: 0 smooth, ~1 barely, 1.2-3.2 clearly lobulated),
        ``calcified``.
    """
    lobes = np.asarray(nodule.lobes)
    return {
        "log_diameter": math.log(nodule.diameter_mm / 8.0),
        "part_solid": float(nodule.texture == "part-solid"),
        "ground_glass": float(nodule.texture == "ground-glass"),
        "spiculated": float(len(nodule.spikes) > 0),
        "lobulation": float(10.0 * lobes[:, 3].max()) if len(lobes) else 0.0,
        "calcified": float(nodule.calcified),
    }


def _clinical_traits(patient: Mapping[str, Any]) -> dict[str, float]:
    """The clinical terms of the risk model from a patient's complete features."""
    return {
        "age_decades": (patient["age"] - 63.0) / 10.0,
        "female": float(patient["sex"] == "F"),
        "log_pack_years": math.log1p(patient["pack_years"]),
        "family_history": float(patient["family_history"]),
        "emphysema": float(patient["emphysema"]),
        "log_cea": math.log(patient["cea"] / 2.0),
    }


@dataclass(frozen=True)
class RiskModel:
    """A logistic malignancy model: ``logit = intercept + sum(clinical coef x term) + sum(image coef x term)``.

    Attributes:
        intercept: the logit of a nodule whose terms are all 0.
        clinical: coefficient per clinical term (keys of the patient terms: ``age_decades``, ``female``, ...).
        image: coefficient per image term (keys of :func:`image_traits`).
    """

    intercept: float
    clinical: dict[str, float] = field(default_factory=dict)
    image: dict[str, float] = field(default_factory=dict)

    def clinical_logit(self, patient: Mapping[str, Any]) -> float:
        """The clinical part of the logit, from the patient's complete features."""
        terms = _clinical_traits(patient)
        return float(sum(c * terms[k] for k, c in self.clinical.items()))

    def image_logit(self, nodule: Nodule) -> float:
        """The image part of the logit, from the nodule's visible traits."""
        terms = image_traits(nodule)
        return float(sum(c * terms[k] for k, c in self.image.items()))

    def probability(self, clinical_logit: float | np.ndarray, image_logit: float | np.ndarray) -> Any:
        """P(malignant) from the two partial logits (scalars or arrays of one shape)."""
        return 1.0 / (1.0 + np.exp(-(self.intercept + np.asarray(clinical_logit) + np.asarray(image_logit))))

    def to_json(self) -> dict[str, Any]:
        """The model as JSON (for ``cohort.json``)."""
        return {
            "form": "P(malignant) = sigmoid(intercept + sum(clinical coef * term) + sum(image coef * term))",
            "intercept": self.intercept,
            "clinical": dict(self.clinical),
            "image": dict(self.image),
            "terms": {
                "age_decades": "(age - 63) / 10",
                "female": "sex == F",
                "log_pack_years": "ln(1 + pack_years)",
                "log_cea": "ln(cea / 2 ng/mL)",
                "log_diameter": "ln(diameter_mm / 8)",
                "lobulation": "10 * largest lobe amplitude (0: smooth)",
            },
        }


#: Brock-like in form, coefficients scaled so that each modality alone reaches an oracle AUC of about 0.8 and the two
#: together over 0.9, with about 38% malignant. Tuned by :func:`simulate` (20000 draws, appearance malignant 40%):
#: tiny (4-12 mm) image 0.81, clinical 0.76, both 0.915; small/full (4-30 mm) image 0.83, clinical 0.75, both 0.93.
#: The clinical coefficients are 0.6 x those of volcnn 0.6's model, whose features were drawn nearly independently:
#: with the correlated risk factors of :func:`sample_patient` the old coefficients made the clinical data the
#: stronger modality (oracle 0.80 against the image's 0.78).
RISK_MODEL = RiskModel(
    intercept=-3.0,
    clinical={
        "age_decades": 0.66,
        "female": 0.54,
        "log_pack_years": 0.39,
        "family_history": 0.87,
        "emphysema": 0.75,
        "log_cea": 1.29,
    },
    image={
        "log_diameter": 2.9,
        "part_solid": 0.9,
        "ground_glass": -0.45,
        "spiculated": 1.15,
        "lobulation": 0.45,
        "calcified": -2.9,
    },
)


@dataclass(frozen=True)
class ClinicalCase:
    """The clinical draw of one case.

    Attributes:
        features: the features as written (``None`` where missing).
        complete: the complete features the labels were drawn from.
        clinical_logit: the clinical part of the logit (one per patient).
        image_logits: the image part of the logit, one per nodule ``(n,)``.
        risks: P(malignant) per nodule ``(n,)``.
        labels: the drawn malignancy labels ``(n,)``, 0/1.
    """

    features: dict[str, Any]
    complete: dict[str, Any]
    clinical_logit: float
    image_logits: list[float]
    risks: list[float]
    labels: list[int]


def assign_clinical(rng: np.random.Generator, nodules: Sequence[Nodule], model: RiskModel = RISK_MODEL) -> ClinicalCase:
    """Draw a patient, mask some features, and draw each nodule's malignancy label from ``model``.

    Draw order (fixed, so a case's features do not depend on its nodules): patient, missingness, one uniform per
    nodule.

    Args:
        rng: the case's clinical generator (:func:`clinical_rng`).
        nodules: the case's placed nodules (their final diameters).
        model: the risk model.
    """
    complete = sample_patient(rng)
    features = mask_missing(complete, rng)
    c = model.clinical_logit(complete)
    img = np.array([model.image_logit(n) for n in nodules], dtype=np.float64)
    risks = np.asarray(model.probability(c, img), dtype=np.float64).reshape(-1)
    labels = (rng.random(len(nodules)) < risks).astype(int)
    return ClinicalCase(features, complete, c, [float(v) for v in img], [float(v) for v in risks], labels.tolist())


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); ``None`` when one class is absent.

    Args:
        scores: ``(N,)`` higher means more likely positive.
        labels: ``(N,)`` 0/1.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    start = 0
    for end in range(1, len(s) + 1):  # average ranks over ties
        if end == len(s) or sorted_s[end] != sorted_s[start]:
            ranks[order[start:end]] = 0.5 * (start + end - 1) + 1.0
            start = end
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def oracle_aucs(
    clinical_logits: Sequence[float] | np.ndarray,
    image_logits: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
) -> dict[str, float | None]:
    """The AUC of each modality's true partial logit, and of their sum, for the drawn labels (all ``(N,)``).

    Returns:
        ``{"image": ..., "clinical": ..., "both": ...}`` (``None`` when one class is absent).
    """
    c = np.asarray(clinical_logits, dtype=np.float64)
    i = np.asarray(image_logits, dtype=np.float64)
    return {
        "image": _round(roc_auc(i, labels)),
        "clinical": _round(roc_auc(c, labels)),
        "both": _round(roc_auc(c + i, labels)),
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def simulate(
    rng: np.random.Generator,
    n: int,
    diameter_range: tuple[float, float],
    malignant_p: float = 0.4,
    model: RiskModel = RISK_MODEL,
) -> dict[str, np.ndarray]:
    """Draw ``n`` nodules of ``n`` patients as the cohort does (without images or placement) and label them.

    Used to tune :data:`RISK_MODEL` and to test that labels depend on both modalities.

    Returns:
        ``clinical_logit``, ``image_logit``, ``risk`` float ``(n,)``, ``label`` int ``(n,)``,
        ``appearance`` int ``(n,)`` (the class the nodule was drawn as), and per trait ``(n,)`` arrays of the
        clinical features (``pack_years``, ``age``, ...) and of :func:`image_traits`.
    """
    nodules = [sample_nodule(rng, bool(rng.random() < malignant_p), diameter_range) for _ in range(n)]
    cases = [assign_clinical(rng, [nod], model) for nod in nodules]
    out: dict[str, np.ndarray] = {
        "clinical_logit": np.array([c.clinical_logit for c in cases]),
        "image_logit": np.array([c.image_logits[0] for c in cases]),
        "risk": np.array([c.risks[0] for c in cases]),
        "label": np.array([c.labels[0] for c in cases]),
        "appearance": np.array([int(nod.malignant) for nod in nodules]),
    }
    for key in cases[0].complete if cases else ():
        out[key] = np.array([c.complete[key] for c in cases])
    traits = [image_traits(nod) for nod in nodules]
    for key in traits[0] if traits else ():
        out[key] = np.array([t[key] for t in traits])
    return out


def oracle_auc_with_missing(
    fraction: float,
    *,
    n: int = 20000,
    seed: int = 0,
    diameter_range: tuple[float, float] = (4.0, 12.0),
    model: RiskModel = RISK_MODEL,
) -> dict[str, float]:
    """What the generating model itself loses when clinical values are missing: the ROC AUC of its full logit on
    ``n`` simulated nodules (:func:`simulate`), with complete values and with each clinical value hidden with
    probability ``fraction``. A hidden term is replaced by its conditional mean given the patient's other terms
    (Gaussian, from the simulated terms' mean and covariance: the best linear guess, what a model that imputes from
    the other features can do), and for comparison by its plain mean (what a model that imputes the training mean
    can do). A trained model's loss is judged against these floors.

    Returns:
        ``{"fraction", "n", "complete", "missing", "lost", "missing_mean_imputed", "lost_mean_imputed"}`` (AUCs
        rounded to 4 decimals; ``missing`` and ``lost`` with the conditional means).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    sim = simulate(rng, n, diameter_range, model=model)
    names = list(FEATURES)
    rows = [_clinical_traits({k: sim[k][j] for k in names}) for j in range(n)]
    keys = list(model.clinical)
    terms = np.array([[r[k] for k in keys] for r in rows])  # (n, T)
    coef = np.array([model.clinical[k] for k in keys])
    hidden = rng.random(terms.shape) < fraction
    mean = terms.mean(axis=0)
    conditional = conditional_means(terms, hidden, mean, np.cov(terms, rowvar=False))
    y = sim["label"]
    aucs = [roc_auc(sim["image_logit"] + t @ coef, y) for t in (terms, conditional, np.where(hidden, mean, terms))]
    complete, missing, plain = (round(float(v), 4) for v in aucs)  # type: ignore[arg-type]
    return {"fraction": fraction, "n": n, "complete": complete, "missing": missing,
            "lost": round(complete - missing, 4), "missing_mean_imputed": plain,
            "lost_mean_imputed": round(complete - plain, 4)}  # fmt: skip


def conditional_means(values: np.ndarray, hidden: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``values`` ``(N, T)`` with each row's ``hidden`` ``(N, T)`` entries replaced by their Gaussian conditional
    mean given the row's other entries: ``mean_h + cov_ho cov_oo^-1 (x_o - mean_o)`` (``mean`` ``(T,)``, ``cov``
    ``(T, T)``); a row with every entry hidden gets ``mean``."""
    out = np.array(values, dtype=np.float64, copy=True)
    for i in np.flatnonzero(hidden.any(axis=1)):
        h = hidden[i]
        o = ~h
        out[i, h] = mean[h]
        if o.any():
            out[i, h] += cov[np.ix_(h, o)] @ np.linalg.solve(cov[np.ix_(o, o)], values[i, o] - mean[o])
    return out
