"""The closed vocabularies that the evaluator shares with the service: the model formats it
loads and the training methods a model is described by. Their values are stored with every
submission, so they never change. A leaf module (no torch), so the database layer can import it
without loading the library."""

from enum import StrEnum

__all__ = ["ModelFormat", "TrainingMethod"]


class ModelFormat(StrEnum):
    """The model file formats SpatialBench accepts."""

    SAFETENSORS = "safetensors"
    EXPORT = "export"  # a torch.export archive (.pt2)


class TrainingMethod(StrEnum):
    """How a model was trained: the submission API's and the database's ``training_method``.
    ``OTHER`` only describes a submission; `evaluator.train` trains with the rest."""

    STANDARD = "standard"
    AUGMENTATION = "augmentation"
    WORST_OF_K = "worst-of-k"
    OTHER = "other"
