"""hatrack's trainer: datasets in, LoRA/QLoRA adapter trained with TRL, evaluated
against its base, registered with its lineage. torch/transformers/trl are imported
only when a run starts."""

from hatrack.trainer.api import TrainConfig, TrainOutcome, evaluate, train
from hatrack.trainer.data import DatasetError
from hatrack.trainer.loop import TrainingInterrupted
from hatrack.trainer.render import LabelMaskError

__all__ = ["DatasetError", "LabelMaskError", "TrainConfig", "TrainOutcome", "TrainingInterrupted", "evaluate", "train"]
