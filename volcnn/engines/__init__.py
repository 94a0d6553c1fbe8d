"""Trainer / evaluator pieces on MONAI + Ignite used by the bundles: AMP, on-device augmentation, checkpoints, resume,
best model, early stopping, monitoring."""

from __future__ import annotations

from volcnn.core.options import as_bool
from volcnn.engines.amp import AmpPolicy, resolve_amp
from volcnn.engines.best_model import BestModelSaver
from volcnn.engines.checkpoint import CheckpointError, TrainingCheckpointer, load_training_checkpoint
from volcnn.engines.dist import (
    BroadcastBuffers,
    is_rank0,
    process_rank,
    rank_seed,
    shutdown_process_group,
    world_size,
)
from volcnn.engines.early_stopping import ValidationEarlyStopping
from volcnn.engines.evaluation import EvaluationReport, PredictionCollector
from volcnn.engines.feature_importance import feature_importance_from_workflow
from volcnn.engines.imbalance import class_weights
from volcnn.engines.mining import MiningSettings, final_weights, mine_round, run_mining
from volcnn.engines.monitor import TrainingMonitor
from volcnn.engines.prepare import AugmentOnDevice, train_random_sources
from volcnn.engines.progress import progress_bar
from volcnn.engines.roc_auc import RocAuc
from volcnn.engines.run_record import RUN_FILE, RunRecordError, read_run_record, record_run
from volcnn.engines.sampling import ShardSampler, make_sampler
from volcnn.engines.trainer import AutocastInferer, NonFiniteLossError, SchedulerStepper, VolcnnTrainer
from volcnn.engines.workflow import load_initial_weights, quiet_non_rank0, run_training, seed_everything

__all__ = [
    "AmpPolicy",
    "MiningSettings",
    "final_weights",
    "load_initial_weights",
    "mine_round",
    "run_mining",
    "AugmentOnDevice",
    "AutocastInferer",
    "BestModelSaver",
    "BroadcastBuffers",
    "shutdown_process_group",
    "CheckpointError",
    "EvaluationReport",
    "NonFiniteLossError",
    "PredictionCollector",
    "RocAuc",
    "RUN_FILE",
    "RunRecordError",
    "SchedulerStepper",
    "TrainingCheckpointer",
    "TrainingMonitor",
    "ValidationEarlyStopping",
    "VolcnnTrainer",
    "as_bool",
    "class_weights",
    "feature_importance_from_workflow",
    "is_rank0",
    "load_training_checkpoint",
    "make_sampler",
    "ShardSampler",
    "process_rank",
    "rank_seed",
    "read_run_record",
    "record_run",
    "world_size",
    "progress_bar",
    "quiet_non_rank0",
    "resolve_amp",
    "run_training",
    "seed_everything",
    "train_random_sources",
]
