"""Every message that crosses a process boundary of the sandbox, defined once for both sides.

Three processes take part in an evaluation (see `worker.sandbox`):

- the **worker** (trusted) starts the other two and accepts results only from the evaluator;
- the **evaluator process** (trusted code: data, transforms, attacks, metrics) never opens the
  model file; it reads its job (`EvaluatorJob`) and then one `ShardRequest` per line from the
  worker, and sends JSON lines (`Report`) back: a hello, then progress and one result per
  shard, or an error;
- the **model process** opens the uploaded model and only answers tensor requests. It never
  sees labels, image indices or the report channel.

Between the evaluator and the model process travel *frames*: a fixed 52-byte binary header
(`FRAME_HEADER`) followed by the raw bytes of one tensor, never pickle. This module imports
neither torch nor the evaluator, so the worker can use it.
"""

from __future__ import annotations

import struct
from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

# --- Frames between the evaluator and the model process ---------------------------------------

FRAME_MAGIC = b"SBT1"
MAX_DIMS = 4
# magic, kind, dtype, ndim, error code, 4 reserved bytes, the shape (4 x u64), then the
# payload's length in bytes (u64), so a reader checks a frame before it reads the payload.
FRAME_HEADER = struct.Struct(f"<4sBBBB4x{MAX_DIMS}QQ")


class FrameKind(IntEnum):
    READY = 1  # model -> evaluator: the model is loaded (empty payload)
    LOGITS_REQUEST = 2  # evaluator -> model: images (N, C, H, W) float32
    LOGITS = 3  # model -> evaluator: logits (N, K) float32
    VJP_REQUEST = 4  # evaluator -> model: images, then a COTANGENT frame
    COTANGENT = 5  # evaluator -> model: d(loss)/d(logits) (N, K) float32
    GRADIENT = 6  # model -> evaluator: d(loss)/d(images) (N, C, H, W) float32
    ERROR = 7  # model -> evaluator: a `ModelProcessError` as UTF-8 JSON (uint8 payload)
    SHUTDOWN = 8  # evaluator -> model: exit now


class FrameDtype(IntEnum):
    FLOAT32 = 1
    UINT8 = 2


DTYPE_BYTES = {FrameDtype.FLOAT32: 4, FrameDtype.UINT8: 1}


class ModelErrorCode(IntEnum):
    """Why the model process could not answer; the evaluator turns it into an error type."""

    LOAD = 1  # the file cannot be opened as a model of this architecture
    OUTPUT = 2  # the model returned something that is not a tensor
    NOT_DIFFERENTIABLE = 3  # a gradient was asked for and the model has none
    OUT_OF_MEMORY = 4
    RAISED = 5  # the model's code raised while running
    PROTOCOL = 6  # the evaluator sent something the model process does not understand


# At most this many bytes of error text cross from the model process.
MAX_ERROR_BYTES = 16 * 1024


class ModelProcessError(BaseModel):
    """The payload of an ERROR frame. Written by untrusted code: it only ever fails the job."""

    model_config = ConfigDict(extra="forbid")

    code: ModelErrorCode
    error: str = Field(default="Error", max_length=100)
    message: str = Field(default="", max_length=4000)


# --- The model process's configuration (worker -> model process) -----------------------------


class ModelProcessConfig(BaseModel):
    """What the model process needs to open the model; nothing about the data."""

    model_config = ConfigDict(extra="forbid")

    model_path: str
    model_format: Literal["safetensors", "export"]
    architecture: str | None = None
    num_classes: int = Field(ge=1, le=1_000_000)
    mean: list[float] | None = None
    std: list[float] | None = None
    device: str = "cpu"
    bf16: bool = False
    threads: int | None = None
    memory_bytes: int | None = None
    open_files: int = 4096
    file_bytes: int = 2**30


# --- The evaluator's job (worker -> evaluator process) ----------------------------------------


class EvaluatorJob(BaseModel):
    """What to evaluate, the first line on the evaluator's stdin; paths are those inside the
    evaluator's sandbox. Which positions of the evaluation order to evaluate comes next, one
    `ShardRequest` per line."""

    model_config = ConfigDict(extra="forbid")

    benchmark: str
    benchmarks_file: str | None = None
    data_dir: str | None = None
    device: str = "cpu"
    batch_size: int = Field(default=512, ge=1)
    bf16: bool = False
    limit: int | None = Field(default=None, ge=1)
    # Passed to `evaluator.evaluate.EvalOptions(**options)`; unknown keys, and ``shard`` (which
    # each `ShardRequest` sets), are refused there.
    options: dict[str, Any] | None = None
    examples: int = Field(default=0, ge=0, le=64)
    output_dir: str | None = None
    threads: int | None = None
    memory_bytes: int | None = None
    open_files: int = 4096
    file_bytes: int = 2**30


# Positions of the evaluation order a shard may name: far above any benchmark's images.
MAX_POSITION = 2**31


class ShardRequest(BaseModel):
    """One shard to evaluate: the positions ``start`` to ``stop`` (exclusive) of the job's
    fixed evaluation order (`evaluator.evaluate.EvalOptions.shard`). The worker sends one
    JSON line per shard on the evaluator's stdin after the job's line; the evaluator answers
    each with a result (which names the shard again) or an error."""

    model_config = ConfigDict(extra="forbid")

    start: int = Field(ge=0, le=MAX_POSITION)
    stop: int = Field(ge=0, le=MAX_POSITION)

    @model_validator(mode="after")
    def _ordered(self) -> ShardRequest:
        if self.stop < self.start:
            raise ValueError("a shard's stop comes before its start")
        return self


# --- Reports (evaluator process -> worker), one JSON line each ---------------------------------


class ErrorCategory(StrEnum):
    """Who can fix a failure; the worker words its message accordingly."""

    MODEL = "model"  # the user: format, weights, outputs, the model's own errors
    OUT_OF_MEMORY = "out_of_memory"
    DATASET = "dataset"  # the operator: files missing on the worker
    MODEL_DIED = "model_died"  # the model process exited; the worker knows how
    INTERNAL = "internal"


MAX_REPORT_TEXT = 4000


class Hello(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["hello"] = "hello"
    pid: int
    device: str = Field(max_length=200)
    network_isolated: bool
    # The benchmark's classes: the worker passes them on to the model process.
    num_classes: int = Field(ge=1, le=1_000_000)


class ProgressReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["progress"] = "progress"
    phase: str = Field(max_length=32)
    fraction: float = Field(ge=0.0, le=1.0)
    forward_passes: int = Field(ge=0)
    elapsed_s: float = Field(ge=0.0)
    eta_s: float | None = None


class ExamplePoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    theta: float
    dx: float
    dy: float


EXAMPLE_NAME = r"^[0-9]{2}_(original|transformed)\.png$"


class Example(BaseModel):
    """One example image pair the evaluator saved into its output folder."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    label: int = Field(ge=0)
    pred: int = Field(ge=0)
    fooled: bool
    point: ExamplePoint
    fool_pred: int = Field(ge=0)
    original: str = Field(pattern=EXAMPLE_NAME)
    transformed: str = Field(pattern=EXAMPLE_NAME)
    label_name: str | None = Field(default=None, max_length=100)
    fool_pred_name: str | None = Field(default=None, max_length=100)


class ResultReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["result"] = "result"
    # The shard this result answers: the worker checks it is the one it asked for.
    shard: ShardRequest
    # `EvaluationResult.to_dict()` of that shard; bounded against the benchmark by
    # `worker.result_bounds`.
    result: dict[str, Any]
    examples: list[Example] = Field(default_factory=list, max_length=64)


class ErrorReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["error"] = "error"
    error: str = Field(max_length=100)
    category: ErrorCategory
    message: str = Field(max_length=MAX_REPORT_TEXT)


Report = Annotated[Hello | ProgressReport | ResultReport | ErrorReport, Field(discriminator="type")]
REPORT = TypeAdapter(Report)
