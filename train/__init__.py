"""Training for llama_jax: the Optax train step, data pipelines, and the resumable loop (`python -m train`)."""

from train.config import TrainConfig, load_config
from train.data import Batches, alpaca_example, build_rows, chat_example, model_batch, pack_rows
from train.loop import TrainingDiverged, run
from train.step import lr_schedule, make_optimizer, make_train_step, train_step

__all__ = ["Batches", "TrainConfig", "TrainingDiverged", "alpaca_example", "build_rows", "chat_example",
           "load_config", "lr_schedule", "make_optimizer", "make_train_step", "model_batch",
           "pack_rows", "run", "train_step"]
