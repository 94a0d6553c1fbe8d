"""The tiny cohort with clinical features that the multimodal engine tests share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from volcnn.data import synthesize_cohort

#: the declaration of :func:`feature_cohort`'s datalist
DECL = {
    "age": {"type": "numeric", "unit": "years", "min": 0, "max": 120},
    "sex": {"type": "categorical", "values": ["F", "M"]},
    "smoker": {"type": "binary"},
}


def feature_cohort(out: Path) -> Path:
    """Synthesise 6 tiny cases into ``out`` and write ``out/datalist_mm.json``: the candidate datalist with
    :data:`DECL` and per entry features (age separates the labels; sex random; smoker random, 20% missing)."""
    synthesize_cohort(out, cases=6, seed=11, size="tiny", negatives=6)
    data = json.loads((out / "datalist.json").read_text())
    rng = np.random.default_rng(3)
    data["features"] = DECL
    for section in ("training", "validation", "test"):
        for e in data[section]:
            e["features"] = {
                "age": round(float(50 + 20 * e["label"] + 3 * rng.standard_normal()), 1),
                "sex": str(rng.choice(["F", "M"])),
                "smoker": None if rng.random() < 0.2 else bool(rng.random() < 0.5),
            }
    (out / "datalist_mm.json").write_text(json.dumps(data))
    return out
