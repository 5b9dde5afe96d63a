"""Training and checkpointing: ``train_model`` + ``TrainConfig``, safetensors checkpoints with JSON sidecars."""

from mergescope.train.checkpoint import (
    checkpoint_sha256,
    load_checkpoint,
    load_state_dict_file,
    read_checkpoint_info,
    save_checkpoint,
    sidecar_path,
)
from mergescope.train.evaluation import evaluate_model
from mergescope.train.schedules import get_schedule, list_schedules, register_schedule
from mergescope.train.trainer import TrainConfig, train_model

__all__ = [
    "TrainConfig",
    "checkpoint_sha256",
    "evaluate_model",
    "get_schedule",
    "list_schedules",
    "load_checkpoint",
    "load_state_dict_file",
    "read_checkpoint_info",
    "register_schedule",
    "save_checkpoint",
    "sidecar_path",
    "train_model",
]
