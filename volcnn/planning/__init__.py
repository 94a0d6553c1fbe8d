"""Planning from a dataset fingerprint (``volcnn plan``): what the images are, and the training settings that
follow, as ``train.json`` overrides with the reason for each."""

from __future__ import annotations

from volcnn.planning.fingerprint import VERDICTS, PlanError, fingerprint_dataset, intensity_verdict
from volcnn.planning.plan import DEVICES, PLAN_KEYS, plan_report, plan_settings, write_plan

__all__ = [
    "DEVICES",
    "PLAN_KEYS",
    "VERDICTS",
    "PlanError",
    "fingerprint_dataset",
    "intensity_verdict",
    "plan_report",
    "plan_settings",
    "write_plan",
]
