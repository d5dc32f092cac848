"""Raw tensors over pipes between the evaluator and the model process, and the remote model.

`FrameChannel` writes and reads frames (`worker.messages.FRAME_HEADER` plus the tensor's raw
bytes, read straight into the tensor's memory): no pickle, nothing but numbers and a kind.
The pipes are enlarged so a batch crosses in a few system calls.

On the evaluator's side, `RemoteModel` is an ``nn.Module`` whose forward is a
``torch.autograd.Function``: forward sends the images and receives logits, backward sends the
images and the cotangent and receives the gradient with respect to the images (a
vector-Jacobian product computed by the model process). So `evaluator.attacks.Classifier` and
plain autograd through ``classifier.model(x)`` work unchanged. Every answer is checked (kind,
dtype, shape, finite) before it is used: the model process is not trusted.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from evaluator.errors import EvaluatorError, ModelNotDifferentiableError, ModelOutputError
from worker.messages import (
    DTYPE_BYTES,
    FRAME_HEADER,
    FRAME_MAGIC,
    MAX_DIMS,
    MAX_ERROR_BYTES,
    FrameDtype,
    FrameKind,
    ModelErrorCode,
    ModelProcessError,
)

__all__ = [
    "ChannelClosed",
    "Frame",
    "FrameChannel",
    "ModelClient",
    "ModelProcessDied",
    "RemoteModel",
    "RemoteModelError",
    "enlarge_pipe",
]

_F_SETPIPE_SZ = 1031
# A 512-image CIFAR batch is 6 MiB; above /proc/sys/fs/pipe-max-size only root may go.
_PIPE_SIZES = (16 * 2**20, 4 * 2**20, 2**20)
_TORCH_DTYPES = {FrameDtype.FLOAT32: torch.float32, FrameDtype.UINT8: torch.uint8}
_FRAME_DTYPES = {v: k for k, v in _TORCH_DTYPES.items()}
# Logits beyond a million classes, or images beyond 1 GiB a batch, are not a model's answer.
MAX_CLASSES = 1_000_000
MAX_TENSOR_BYTES = 2**30


class ChannelClosed(Exception):
    """The other side closed its end (it exited, or was killed)."""


class ModelProcessDied(EvaluatorError):
    """The model process went away without an answer; the worker knows how it ended."""


class RemoteModelError(EvaluatorError):
    """The model process reported an error (its text is the model's, not ours)."""

    def __init__(self, report: ModelProcessError) -> None:
        super().__init__(report.message)
        self.code = report.code
        self.error = report.error


def enlarge_pipe(fd: int) -> None:
    for size in _PIPE_SIZES:
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
            return
        except OSError:
            continue


@dataclass(frozen=True)
class Frame:
    kind: FrameKind
    dtype: FrameDtype
    shape: tuple[int, ...]
    code: int
    length: int


class FrameChannel:
    """One read end and one write end; frames in order, one writer per end."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        for fd in (read_fd, write_fd):
            enlarge_pipe(fd)

    # --- writing ---

    def send(self, kind: FrameKind, tensor: Tensor | None = None, code: int = 0) -> None:
        if tensor is None:
            tensor = torch.empty(0, dtype=torch.uint8)
        dtype = _FRAME_DTYPES[tensor.dtype]
        if tensor.ndim > MAX_DIMS:
            raise ValueError(f"a frame holds at most {MAX_DIMS} dimensions")
        data = tensor.detach().cpu().contiguous()
        shape = list(data.shape) + [0] * (MAX_DIMS - data.ndim)
        length = data.numel() * DTYPE_BYTES[dtype]
        header = FRAME_HEADER.pack(FRAME_MAGIC, kind, dtype, data.ndim, code, *shape, length)
        self._write(memoryview(header))
        if length:
            self._write(data.view(torch.uint8).reshape(-1).numpy().data)

    def send_error(self, report: ModelProcessError) -> None:
        text = report.model_dump_json().encode()[:MAX_ERROR_BYTES]
        payload = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        self.send(FrameKind.ERROR, payload, code=report.code)

    def _write(self, view: memoryview) -> None:
        try:
            while view:
                view = view[os.write(self.write_fd, view) :]
        except BrokenPipeError as exc:
            raise ChannelClosed() from exc

    # --- reading ---

    def receive_header(self) -> Frame:
        raw = bytearray(FRAME_HEADER.size)
        self._read_into(memoryview(raw))
        magic, kind, dtype, ndim, code, *rest = FRAME_HEADER.unpack(raw)
        shape, length = rest[:MAX_DIMS], rest[MAX_DIMS]
        if magic != FRAME_MAGIC or ndim > MAX_DIMS:
            raise ValueError("not a frame")
        frame = Frame(FrameKind(kind), FrameDtype(dtype), tuple(shape[:ndim]), code, length)
        expected = DTYPE_BYTES[frame.dtype]
        for size in frame.shape:
            expected *= size
        if expected != length or any(shape[ndim:]):
            raise ValueError("a frame whose length does not match its shape")
        return frame

    def receive_payload(self, frame: Frame, max_bytes: int = MAX_TENSOR_BYTES) -> Tensor:
        if frame.length > max_bytes:
            raise ValueError(f"a frame of {frame.length} bytes, over {max_bytes}")
        tensor = torch.empty(frame.shape, dtype=_TORCH_DTYPES[frame.dtype])
        if frame.length:
            self._read_into(tensor.view(torch.uint8).reshape(-1).numpy().data)
        return tensor

    def skip_payload(self, frame: Frame) -> None:
        self.receive_payload(frame)

    def _read_into(self, view: memoryview) -> None:
        while view:
            got = os.readv(self.read_fd, [view])
            if got == 0:
                raise ChannelClosed()
            view = view[got:]

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


# --- The evaluator's side ----------------------------------------------------------------------


class ModelClient:
    """Requests to the model process, with every answer checked before it is returned."""

    def __init__(self, channel: FrameChannel, num_classes: int) -> None:
        self.channel = channel
        self.num_classes = num_classes

    def wait_ready(self) -> None:
        self._expect(self._header(), FrameKind.READY)

    def logits(self, images: Tensor) -> Tensor:
        batch = images.detach().to("cpu", torch.float32)
        self._send(FrameKind.LOGITS_REQUEST, batch)
        frame = self._header()
        self._expect(frame, FrameKind.LOGITS)
        n = batch.shape[0]
        if frame.dtype is not FrameDtype.FLOAT32 or len(frame.shape) != 2:
            raise ModelOutputError(
                f"the model returned a {len(frame.shape)}-dimensional {frame.dtype.name.lower()} "
                f"tensor for a batch of {tuple(batch.shape)}; expected float logits of shape "
                f"({n}, {self.num_classes})."
            )
        if frame.shape != (n, self.num_classes):
            raise ModelOutputError(
                f"the model returned {frame.shape} for a batch of {tuple(batch.shape)}; "
                f"expected logits of shape ({n}, {self.num_classes}). Check the number of "
                "classes and that the model takes (N, C, H, W) images in [0, 1]."
            )
        out = self.channel.receive_payload(frame)
        if not bool(torch.isfinite(out).all()):
            raise ModelOutputError(
                "the model produced NaN or infinite logits; check the weights and the "
                "normalisation (mean/std), and that the model is in eval mode."
            )
        return out.to(images.device)

    def vjp(self, images: Tensor, cotangent: Tensor) -> Tensor:
        batch = images.detach().to("cpu", torch.float32)
        self._send(FrameKind.VJP_REQUEST, batch)
        self._send(FrameKind.COTANGENT, cotangent.detach().to("cpu", torch.float32))
        frame = self._header()
        self._expect(frame, FrameKind.GRADIENT)
        if frame.dtype is not FrameDtype.FLOAT32 or frame.shape != tuple(batch.shape):
            raise ModelOutputError(
                f"the model's input gradient has shape {frame.shape}; expected "
                f"{tuple(batch.shape)}."
            )
        grad = self.channel.receive_payload(frame)
        if not bool(torch.isfinite(grad).all()):
            raise ModelNotDifferentiableError(
                "the model's gradient with respect to its input has NaN or infinite values."
            )
        return grad.to(images.device)

    def shutdown(self) -> None:
        try:
            self.channel.send(FrameKind.SHUTDOWN)
        except ChannelClosed:
            pass

    def _send(self, kind: FrameKind, tensor: Tensor) -> None:
        try:
            self.channel.send(kind, tensor)
        except ChannelClosed:
            # The model process stopped reading; what it answered before is still in the
            # pipe, and reading it says what happened (an answer, an error, or its exit).
            pass

    def _header(self) -> Frame:
        try:
            return self.channel.receive_header()
        except ChannelClosed:
            raise ModelProcessDied("the model process exited") from None
        except ValueError as exc:
            raise ModelOutputError(f"the model process broke the protocol: {exc}") from None

    def _expect(self, frame: Frame, kind: FrameKind) -> None:
        if frame.kind is FrameKind.ERROR:
            raise self._error(frame)
        if frame.kind is not kind:
            raise ModelOutputError(
                f"the model process answered {frame.kind.name} to a request for {kind.name}"
            )

    def _error(self, frame: Frame) -> Exception:
        try:
            data = self.channel.receive_payload(frame, MAX_ERROR_BYTES)
            report = ModelProcessError.model_validate_json(data.numpy().tobytes())
        except (ChannelClosed, ValueError):
            return ModelOutputError("the model process sent a malformed error report")
        if report.code is ModelErrorCode.NOT_DIFFERENTIABLE:
            return ModelNotDifferentiableError(report.message)
        return RemoteModelError(report)


class _RemoteForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, images: Tensor, client: ModelClient) -> Tensor:
        ctx.client = client
        ctx.save_for_backward(images)
        return client.logits(images)

    @staticmethod
    def backward(ctx: Any, grad_logits: Tensor) -> tuple[Tensor, None]:
        (images,) = ctx.saved_tensors
        return ctx.client.vjp(images, grad_logits), None


class RemoteModel(nn.Module):
    """The model in the model process, as a module of the evaluator: logits out, gradients
    back. It has no parameters; ``.to()`` and ``.eval()`` change nothing remote."""

    def __init__(self, client: ModelClient) -> None:
        super().__init__()
        self.client = client
        self.training = False

    def forward(self, images: Tensor) -> Tensor:
        out: Tensor = _RemoteForward.apply(images, self.client)
        return out
