"""Errors the evaluator raises, each with a message a user can act on.

The service maps them onto HTTP statuses and submission failure messages, so every message
says what was wrong and what to do about it.
"""


class EvaluatorError(Exception):
    """Base class: a problem with the user's model, data or options, not a bug."""


class ModelFormatError(EvaluatorError):
    """The file is not a model format we accept (pickle, TorchScript, a broken archive)."""


class WeightsMismatchError(EvaluatorError):
    """safetensors weights do not fit the named architecture (keys, shapes, dtypes, NaN/inf)."""


class UnknownArchitectureError(EvaluatorError):
    """The architecture name is not in the registry."""


class UnknownBenchmarkError(EvaluatorError):
    """The benchmark name is not known."""


class DatasetMissingError(EvaluatorError):
    """The dataset's files are not in the data directory; the message says which go where."""


class ModelOutputError(EvaluatorError):
    """The model ran but returned something unusable: wrong shape, NaN or infinite logits."""


class EvaluationCancelled(EvaluatorError):
    """The caller asked the evaluation to stop."""


class ModelNotDifferentiableError(EvaluatorError):
    """The model's logits cannot be differentiated with respect to its input, so a gradient
    attack cannot run; the first-order metric is reported as not available, not as a number."""
