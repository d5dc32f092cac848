"""What a torch.export archive may be, said once: the advice on how to export, the refusal
errors that carry it, and the name length every check of `evaluator.models.pt2` shares.
"""

from __future__ import annotations

from evaluator.errors import ModelFormatError

__all__ = ["HOW_TO_EXPORT", "MAX_NAME", "refuse", "refuse_pickle"]


HOW_TO_EXPORT = (
    "Export the model in eval mode, as a pure function of one image batch returning one logits "
    "tensor, with plain tensors as weights: torch.export.save(torch.export.export(model.eval(), "
    "(example,), dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2')."
)


# The longest name (module path, value name) an archive may use.
MAX_NAME = 300


def refuse(reason: str) -> ModelFormatError:
    return ModelFormatError(f"The torch.export archive is refused: {reason}. {HOW_TO_EXPORT}")


def refuse_pickle(what: str) -> ModelFormatError:
    return ModelFormatError(
        f"The torch.export archive is refused: {what} is stored with pickle, which can run code "
        "when loaded, and SpatialBench never unpickles uploads. torch.export.save pickles "
        "tensor subclasses (quantized, sparse or wrapper tensors) and custom objects: convert "
        "every parameter, buffer and constant to a plain dense tensor "
        "(for example model.float() and .to_dense()) before exporting. " + HOW_TO_EXPORT
    )
