"""The model process: ``python -m worker.model_process REQUEST_FD ANSWER_FD``.

The only process that opens the uploaded model. Started by `worker.sandbox` under bubblewrap
(no network, no view of the service's files, an unprivileged user) with its configuration
(`worker.messages.ModelProcessConfig`) as JSON on stdin. It limits itself, opens the model,
says READY, and then answers frames from the evaluator until SHUTDOWN or end of input:

- LOGITS_REQUEST (images) -> LOGITS (float32 ``(N, K)``);
- VJP_REQUEST (images) + COTANGENT (``(N, K)``) -> GRADIENT (the images' gradient);
- anything that goes wrong -> ERROR (`worker.messages.ModelProcessError`).

It never sees labels, image indices, metrics or the worker's report channel: whatever the
model's code does here, it can only change the logits it answers, which the evaluator checks.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from torch import Tensor, nn

from worker.channel import ChannelClosed, FrameChannel
from worker.limits import apply_limits, limit_memory
from worker.messages import FrameKind, ModelErrorCode, ModelProcessConfig, ModelProcessError

__all__ = ["LocalModelProcess", "Runner", "main", "serve"]

_MAX_CONFIG_BYTES = 1 << 20


class NotATensorError(Exception):
    """The model returned something other than a tensor."""


class Runner:
    """The loaded model and how to run it, as `evaluator.attacks.Classifier` runs it."""

    def __init__(self, model: nn.Module, device: torch.device, bf16: bool) -> None:
        self.device = device
        self.bf16 = bf16
        # channels_last: the same memory format as an in-process evaluation, so the numbers
        # agree with `spatialbench evaluate` bit for bit.
        self.model = model.to(device).to(memory_format=torch.channels_last)

    def _call(self, images: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(images)
        if isinstance(out, tuple | list) and out:
            out = out[0]
        if not isinstance(out, Tensor):
            raise NotATensorError(f"the model returned a {type(out).__name__}, not a tensor")
        return out

    def logits(self, images: Tensor) -> Tensor:
        batch = images.to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self._call(batch).float()

    def vjp(self, images: Tensor, cotangent: Tensor) -> Tensor:
        batch = images.to(self.device).requires_grad_(True)
        with torch.enable_grad():
            out = self._call(batch).float()
            if not out.requires_grad or out.shape != cotangent.shape:
                raise _NotDifferentiable(
                    "the model's logits do not depend differentiably on its input"
                    if not out.requires_grad
                    else f"the model returned {tuple(out.shape)} logits for the gradient"
                )
            try:
                (grad,) = torch.autograd.grad(out, batch, cotangent.to(self.device))
            except RuntimeError as exc:
                raise _NotDifferentiable(str(exc)) from exc
        return grad.float()


class _NotDifferentiable(Exception):
    pass


def _load(config: ModelProcessConfig) -> Runner:
    from evaluator.models.loading import load_model

    device = torch.device(config.device)
    model = load_model(
        config.model_path,
        arch=config.architecture,
        num_classes=config.num_classes,
        mean=config.mean,
        std=config.std,
        device=device,
        allow_export=config.model_format == "export",
    )
    return Runner(model, device, config.bf16)


def _code(exc: BaseException) -> ModelErrorCode:
    text = str(exc)
    if isinstance(exc, MemoryError | torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError)
        and any(s in text for s in ("can't allocate memory", "out of memory", "bad_alloc"))
    ):
        return ModelErrorCode.OUT_OF_MEMORY
    if isinstance(exc, _NotDifferentiable):
        return ModelErrorCode.NOT_DIFFERENTIABLE
    if isinstance(exc, NotATensorError):
        return ModelErrorCode.OUTPUT
    return ModelErrorCode.RAISED


def _report(exc: BaseException, code: ModelErrorCode | None = None) -> ModelProcessError:
    from evaluator.errors import EvaluatorError

    name = type(exc).__name__ if isinstance(exc, EvaluatorError) else "Error"
    message = str(exc) if isinstance(exc, EvaluatorError) else f"{type(exc).__name__}: {exc}"
    return ModelProcessError(
        code=code or _code(exc), error=name[:100], message=message[:4000] or type(exc).__name__
    )


def serve(channel: FrameChannel, runner: Runner) -> None:
    """Answer requests until SHUTDOWN or the evaluator closes its end."""
    while True:
        frame = channel.receive_header()
        if frame.kind is FrameKind.SHUTDOWN:
            return
        try:
            images = channel.receive_payload(frame)
            if frame.kind is FrameKind.LOGITS_REQUEST:
                channel.send(FrameKind.LOGITS, runner.logits(images))
            elif frame.kind is FrameKind.VJP_REQUEST:
                cotangent_frame = channel.receive_header()
                cotangent = channel.receive_payload(cotangent_frame)
                channel.send(FrameKind.GRADIENT, runner.vjp(images, cotangent))
            else:
                channel.send_error(
                    ModelProcessError(
                        code=ModelErrorCode.PROTOCOL, message=f"unexpected {frame.kind.name}"
                    )
                )
        except ChannelClosed:
            raise
        except BaseException as exc:  # the model's code may raise anything, MemoryError too
            traceback.print_exc(file=sys.stderr)
            channel.send_error(_report(exc))


def main(argv: list[str]) -> int:
    request_fd, answer_fd = int(argv[0]), int(argv[1])
    config = ModelProcessConfig.model_validate_json(sys.stdin.buffer.read(_MAX_CONFIG_BYTES))
    apply_limits(open_files=config.open_files, file_bytes=config.file_bytes)
    limit_memory(config.memory_bytes, torch.device(config.device).type)
    if config.threads:
        torch.set_num_threads(config.threads)
    channel = FrameChannel(request_fd, answer_fd)
    try:
        runner = _load(config)
    except BaseException as exc:
        traceback.print_exc(file=sys.stderr)
        channel.send_error(_report(exc, _load_code(exc)))
        return 1
    channel.send(FrameKind.READY)
    try:
        serve(channel, runner)
    except ChannelClosed:
        pass
    return 0


def _load_code(exc: BaseException) -> ModelErrorCode:
    code = _code(exc)
    return code if code is ModelErrorCode.OUT_OF_MEMORY else ModelErrorCode.LOAD


class LocalModelProcess:
    """A model process started without the sandbox, for benchmarks and tests of the channel:
    ``client`` is a `worker.channel.ModelClient` connected to it. Use as a context manager."""

    def __init__(self, config: ModelProcessConfig) -> None:
        import subprocess

        from worker.channel import FrameChannel, ModelClient

        request_r, request_w = os.pipe()
        answer_r, answer_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.model_process", str(request_r), str(answer_w)],
            stdin=subprocess.PIPE,
            pass_fds=(request_r, answer_w),
        )
        os.close(request_r)
        os.close(answer_w)
        assert self.proc.stdin is not None
        self.proc.stdin.write(config.model_dump_json().encode())
        self.proc.stdin.close()
        self.client = ModelClient(FrameChannel(answer_r, request_w), config.num_classes)
        self.client.wait_ready()

    def __enter__(self) -> LocalModelProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.shutdown()
        self.client.channel.close()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
