"""facebce.train: recipes (YAML) -> a trained backbone + head, with exact resume.

`train_from_recipe(path, overrides, resume=False, init_backbone=None, out_dir=None) -> TrainResult`
backs `facebce train`; `train(cfg)` takes a `TrainConfig` from `load_config`.
Uses facebce.data, models, heads and eval; never deploy or cli.
"""
from facebce.train.callbacks import Callback, Checkpointer, MetricsLogger, ModelFiles, ProgressBar, Verification
from facebce.train.checkpoint import latest_checkpoint, list_checkpoints, load_backbone_init, load_checkpoint
from facebce.train.config import TrainConfig, load_config, parse_override, save_config
from facebce.train.engine import Trainer, TrainingDiverged, TrainResult, lr_at, train, train_from_recipe

__all__ = [
    "Callback", "Checkpointer", "MetricsLogger", "ModelFiles", "ProgressBar", "TrainConfig", "TrainResult", "Trainer",
    "TrainingDiverged", "Verification", "latest_checkpoint", "list_checkpoints", "load_backbone_init",
    "load_checkpoint", "load_config", "lr_at", "parse_override", "save_config", "train", "train_from_recipe",
]
