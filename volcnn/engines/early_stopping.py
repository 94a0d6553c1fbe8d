"""Early stopping on the key validation metric, by Ignite's ``EarlyStopping``, with patience counted in epochs.

The README defines ``early_stop_patience`` as "stop when validation ROC AUC has not improved for this many epochs".
Ignite's ``EarlyStopping`` counts the calls it receives without improvement; in Ignite's examples it is called at the
evaluator's ``COMPLETED``, which would count validations. :class:`ValidationEarlyStopping` calls it on the trainer's
``EPOCH_COMPLETED`` instead, once per epoch, and adds one to its counter in an epoch with no validation, so:

* patience counts epochs since the best validation, as documented, whatever ``val_interval`` is;
* the run stops only at a validation whose metric did not improve, never in an epoch whose weights were not
  validated. With ``val_interval`` 2 and patience 3, after a best validation at epoch 10 the run stops at the
  validation of epoch 14 (the first at least 3 epochs later) if neither epoch 12 nor 14 improved;
* an epoch whose metric is undefined (NaN: ROC AUC of a one-class validation set) counts as an epoch without
  improvement but cannot stop the run; before the first defined value nothing counts.

Ignite's ``EarlyStopping.attach()`` is not used: it also registers ``reset()`` at ``STARTED`` of the same engine,
which on the trainer would forget a resumed run's counter, and on the evaluator would reset it at every validation,
so that the run could never stop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping

from volcnn.engines.validation_metric import epoch_metric

__all__ = ["ValidationEarlyStopping"]

logger = logging.getLogger(__name__)


class ValidationEarlyStopping:
    """Stop training when the key validation metric has not improved for ``patience`` epochs (module docstring).

    List it in the trainer's handlers after the ``ValidationHandler`` and before the
    :class:`~volcnn.engines.checkpoint.TrainingCheckpointer`, and put it in the checkpointer's ``save_dict``: its
    state (Ignite's ``EarlyStopping.state_dict()``, whose counter here is in epochs, and whether this run stopped)
    then goes into every full checkpoint, and resuming a run that stopped early does nothing more. Every rank
    decides alike from the gathered validation metric, so every rank stops at the same epoch.

    Args:
        patience: epochs without improvement before stopping; 0 turns early stopping off (nothing is attached).
        validator: the evaluator run by ``ValidationHandler``.
        key_metric: metric name in ``validator.state.metrics`` (e.g. ``"val_auc"``).
        mode: ``"max"`` or ``"min"``.
        min_delta: an improvement smaller than this does not count (Ignite's ``threshold``, with ``cumulative=True``:
            small gains do not move the best value either, so they cannot add up to an improvement unnoticed).

    Raises:
        ValueError: for a negative patience or ``min_delta``, an unknown mode, or a patience without a validator and
            key metric to watch.
    """

    def __init__(
        self,
        patience: int = 0,
        validator: Engine | None = None,
        key_metric: str | None = None,
        mode: str = "max",
        min_delta: float = 0.0,
    ) -> None:
        self.patience = int(patience or 0)
        if self.patience < 0:
            raise ValueError(f"early stopping patience must be 0 (off) or positive, got {patience}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if float(min_delta) < 0:
            raise ValueError(f"min_delta must not be negative, got {min_delta}")
        if self.patience and (validator is None or key_metric is None):
            raise ValueError("early stopping needs the validator and the name of its key metric")
        self.validator = validator
        self.key_metric = key_metric
        self.mode = mode
        self.min_delta = float(min_delta)
        self.stopped = False
        self.handler: EarlyStopping | None = None
        self._pending: dict[str, Any] | None = None  # Ignite state loaded before attach
        self._value = 0.0

    def attach(self, trainer: Engine) -> None:
        """Create Ignite's ``EarlyStopping`` for ``trainer`` and call it at every ``EPOCH_COMPLETED``."""
        if not self.patience or self.handler is not None:
            return
        self.handler = EarlyStopping(
            patience=self.patience, score_function=self._score, trainer=trainer, threshold=self.min_delta,
            cumulative=True, mode=self.mode,  # type: ignore[arg-type]
        )  # fmt: skip
        if self._pending is not None:
            self.handler.load_state_dict(self._pending)
            self._pending = None
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _score(self, engine: Engine) -> float:
        return self._value

    def _epoch_completed(self, trainer: Engine) -> None:
        es = self.handler
        if es is None:
            return
        epoch = int(trainer.state.epoch)
        value = epoch_metric(self.validator, epoch, self.key_metric)
        if value is None:  # no validation this epoch, or an undefined metric: one more epoch without improvement
            if es.best_score is not None:
                es.counter += 1
            return
        self._value = value
        es(trainer)  # resets the counter on an improvement, else adds one and terminates the trainer at patience
        if es.counter >= es.patience:
            self.stopped = True
            logger.info(
                "early stopping at epoch %d: %s has not improved for %d epochs (best %.4f at epoch %d)",
                epoch, self.key_metric, es.counter, es.best_score, epoch - es.counter,
            )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """``{"stopped": bool, "ignite": EarlyStopping.state_dict() or None when off}`` (weights-only loadable)."""
        ignite_state = dict(self.handler.state_dict()) if self.handler is not None else self._pending
        return {"stopped": self.stopped, "ignite": ignite_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stopped = bool(state.get("stopped", False))
        ignite_state = state.get("ignite")
        if ignite_state is None:  # saved with early stopping off: count from here
            if self.handler is not None:
                self.handler.reset()
        elif self.handler is not None:
            self.handler.load_state_dict(ignite_state)
        elif self.patience:
            self._pending = dict(ignite_state)

    @staticmethod
    def state_from_v1(ckpt: Mapping[str, Any]) -> dict[str, Any]:
        """This handler's state from a format-1 checkpoint, which kept ``early_stopping: {patience, stopped}`` and
        the best value and epoch at the top level; the counter is the epochs since the best one, as here."""
        best = ckpt.get("best") or {}
        value = best.get("value")
        epoch = int((ckpt.get("trainer") or {}).get("epoch", 0))
        counter = epoch - int(best.get("epoch", 0)) if value is not None else 0
        stopped = bool((ckpt.get("early_stopping") or {}).get("stopped", False))
        return {"stopped": stopped, "ignite": {"counter": counter, "best_score": value, "threshold_mode": "abs"}}
