"""Small typed factories and helpers for the worker tests."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import SecretStr
from safetensors.torch import save_file
from sqlalchemy.orm import Session
from torch import Tensor, nn

from config.settings import Settings
from db.models import Submission
from tests import factories

if TYPE_CHECKING:
    from evaluator.benchmarks import BenchmarkSpec
    from evaluator.options import EvalOptions
    from evaluator.results import EvaluationResult

ROOT = Path(__file__).resolve().parents[2]

# A coarse variant of the digits benchmark, so an end-to-end run takes seconds on a CPU: the
# same code paths, 45 grid points instead of 775.
QUICK_BENCHMARK = "digits-quick"
QUICK_BENCHMARK_TOML = """
[benchmarks.digits-quick]
base = "digits"
title = "Digits, coarse grid (tests)"
grid = [5, 3, 3]
worst_of_k = 3
vote_samples = 3
vote_subset = 10
"""


def small_cnn_file(path: Path, seed: int = 0) -> Path:
    """safetensors weights of the registry's ``small_cnn``, randomly initialised."""
    from evaluator.models.architectures import small_cnn

    torch.manual_seed(seed)
    save_file(small_cnn().state_dict(), str(path))
    return path


def _evaluation(
    benchmark: BenchmarkSpec, model: Path, options: EvalOptions, **model_options: Any
) -> EvaluationResult:
    """``model`` (small_cnn weights) evaluated in this process, with no worker or sandbox."""
    from evaluator.attacks import Classifier
    from evaluator.data import load_dataset, resolve_benchmark
    from evaluator.evaluate import evaluate
    from evaluator.models.loading import load_model

    torch.set_num_threads(1)
    dataset = load_dataset(benchmark)
    spec = resolve_benchmark(benchmark, dataset)
    classifier = Classifier(
        load_model(model, arch="small_cnn", **model_options), 10, batch_size=256
    )
    return evaluate(classifier, dataset, spec, options)


def digits_result(folder: Path, **options: Any) -> dict[str, Any]:
    """A real evaluation of a randomly initialised ``small_cnn`` on the digits benchmark, as
    ``EvaluationResult.to_dict()`` gives it (``options`` go to ``EvalOptions``; the
    benchmark's defaults otherwise)."""
    from evaluator.benchmarks import get_benchmark
    from evaluator.options import EvalOptions

    model = small_cnn_file(folder / "m.safetensors")
    return _evaluation(get_benchmark("digits"), model, EvalOptions(**options)).to_dict()


def quick_accuracies(
    settings: Settings, model: Path, limit: int | None, **model_options: Any
) -> dict[str, float | None]:
    """The accuracy of each metric for ``model`` on the quick benchmark of ``settings``,
    computed here: what a worker's run of the same job must store (``model_options``, such as
    ``mean`` and ``std``, go to ``load_model``)."""
    from evaluator.benchmarks import get_benchmark, load_benchmark_file
    from evaluator.options import EvalOptions

    assert settings.benchmarks_file is not None
    spec = get_benchmark(QUICK_BENCHMARK, load_benchmark_file(settings.benchmarks_file))
    result = _evaluation(spec, model, EvalOptions(limit=limit), **model_options)
    return {key: value.accuracy for key, value in result.metrics.items()}


def trained_small_cnn_file(path: Path, epochs: int = 2) -> Path:
    """``small_cnn`` trained briefly on digits (about 85% natural accuracy, a few CPU-seconds):
    a model the grid attack fools quickly, as it fools standard models."""
    from evaluator.benchmarks import get_benchmark
    from evaluator.dataset_readers import digits_split
    from evaluator.models.architectures import small_cnn
    from evaluator.train import train

    images, labels = digits_split("train")
    torch.manual_seed(0)
    model = small_cnn()
    box = get_benchmark("digits").box
    train(model, images, labels, method="standard", box=box, epochs=epochs, batch_size=64, lr=0.05)
    save_file(model.state_dict(), str(path))
    return path


class _Broken(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.linear = nn.Linear(3, 10)

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=(2, 3))
        logits = self.linear(pooled)
        if self.mode == "nan":
            return logits * float("nan")
        if self.mode == "shape":
            return logits[:, :7]
        if self.mode == "memory":
            # 24 GiB at run time; tracing only sees its shape.
            big = torch.ones(6 * 2**30, device=x.device)
            return logits + big[:1]
        if self.mode == "slow":
            # About 100 GFLOP per batch: tens of seconds on one CPU thread.
            w = x.new_ones(2048, 2048) * 1e-3
            for _ in range(6):
                w = w @ w
            return logits + w[:1, :10] * 0
        return logits


def export_file(path: Path, mode: str, size: int = 32) -> Path:
    """A torch.export archive of a tiny module that misbehaves as ``mode`` says: "nan"
    (NaN logits), "shape" (7 classes), "memory" (allocates 24 GiB), "slow", or "ok"."""
    module = _Broken(mode).eval()
    example = torch.rand(2, 3, size, size)
    program = torch.export.export(
        module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, str(path))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_model(settings: Settings, source: Path) -> tuple[str, int]:
    """Put a model file where the API stores uploads; returns (sha256, size)."""
    digest = sha256(source)
    target = settings.model_path(digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return digest, target.stat().st_size


def create_model_submission(
    session: Session, settings: Settings, model: Path, **overrides: Any
) -> Submission:
    """A queued submission of ``model`` on the quick benchmark, the file stored like an upload
    (`tests.factories.create_submission` for the rest, a new owner unless ``owner`` is given)."""
    digest, size = store_model(settings, model)
    fields: dict[str, Any] = {
        "display_name": model.stem,
        "benchmark": QUICK_BENCHMARK,
        "file_sha256": digest,
        "file_size": size,
        **overrides,
    }
    return factories.create_submission(session, fields.pop("owner", None), **fields)


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as SPATIALBENCH_ environment variables, for a worker subprocess."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        # A secret dumps as asterisks; the worker needs its value (the S3 key, for one).
        raw = getattr(settings, name)
        if isinstance(raw, SecretStr):
            value = raw.get_secret_value()
        env[f"SPATIALBENCH_{name.upper()}"] = str(value)
    return env


def wait_for(
    condition: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


class WorkerProcess:
    """``spatialbench worker`` in a subprocess, with its log in a file."""

    def __init__(self, settings: Settings, log_path: Path, name: str = "w1") -> None:
        env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
        env.pop("SPATIALBENCH_TEST_REDIS_URL", None)
        self.log_path = log_path
        self.log = log_path.open("ab")
        self.pool_pid = 0
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from spatialbench.cli import main; main()",
                "worker",
                "--loglevel=info",
                f"--hostname={name}@%h",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(
            lambda: b"ready." in self.log_path.read_bytes() or self.proc.poll() is not None,
            timeout,
            what="the worker to start",
        )
        assert self.proc.poll() is None, self.log_path.read_text()

    def pool_pids(self) -> list[int]:
        """The worker's pool processes (its children)."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def kill(self) -> None:
        """SIGKILL the worker and its pool (as a crash or the OOM killer would)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
