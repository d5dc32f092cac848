"""The sandbox: two bubblewrap processes, what they can see, how long they may run, what their
failures say, and the bounds on what comes back."""

from __future__ import annotations

import copy
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from evaluator.attacks import Classifier
from evaluator.benchmarks import get_benchmark
from evaluator.data import load_dataset, resolve_benchmark
from evaluator.errors import ModelNotDifferentiableError
from evaluator.evaluate import EvalOptions, evaluate
from evaluator.models.loading import load_model
from tests.worker.helpers import ROOT, digits_result, export_file, small_cnn_file
from worker.channel import RemoteModel
from worker.messages import ModelProcessConfig
from worker.model_process import LocalModelProcess
from worker.result_bounds import ResultRejected, check_result
from worker.sandbox import (
    SandboxFailure,
    SandboxJob,
    SandboxLimits,
    SandboxStopped,
    _collect_examples,
    remove_abandoned_job_dirs,
    run_sandboxed,
)

LIMITS = SandboxLimits(deadline_s=120, threads=1, memory_bytes=8 * 2**30)
SANDBOX_MODULES = (b"worker.model_process", b"worker.evaluator_process")


def _job(model: Path, **overrides: Any) -> SandboxJob:
    fields: dict[str, Any] = {
        "model_path": model,
        "model_format": "export" if model.suffix == ".pt2" else "safetensors",
        "benchmark": "digits",
        "architecture": None if model.suffix == ".pt2" else "small_cnn",
        "limit": 4,
        "batch_size": 256,
        "examples": 0,
    }
    fields.update(overrides)
    return SandboxJob(**fields)


def _processes() -> dict[int, tuple[int, str, bytes]]:
    """pid -> (parent pid, state, cmdline) of every process on this machine."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), fields[0], cmdline)
    return table


def _sandboxed_pythons() -> dict[int, bytes]:
    """pid -> cmdline of the sandboxed interpreters this test process started (not bwrap;
    other sessions' sandboxes on the same machine are not ours)."""
    table = _processes()

    def ours(pid: int) -> bool:
        for _ in range(16):
            if pid not in table:
                return False
            pid = table[pid][0]
            if pid == os.getpid():
                return True
        return False

    return {
        pid: cmdline
        for pid, (_ppid, state, cmdline) in table.items()
        if state != "Z"
        and b"python" in cmdline.split(b"\0", 1)[0]
        and any(m in cmdline for m in SANDBOX_MODULES)
        and ours(pid)
    }


def _alive(pid: int, cmdline: bytes) -> bool:
    """Whether ``pid`` is still that process, and not a zombie."""
    entry = _processes().get(pid)
    return entry is not None and entry[1] != "Z" and entry[2] == cmdline


def _failure(job: SandboxJob, limits: SandboxLimits = LIMITS) -> SandboxFailure:
    with pytest.raises(SandboxFailure) as info:
        run_sandboxed(job, limits)
    return info.value


def test_the_result_equals_the_evaluator_run_directly(trained_model: Path) -> None:
    out = run_sandboxed(_job(trained_model, limit=8), LIMITS)

    torch.set_num_threads(1)
    spec = get_benchmark("digits")
    dataset = load_dataset(spec)
    spec = resolve_benchmark(spec, dataset)
    classifier = Classifier(load_model(trained_model, arch="small_cnn"), 10, batch_size=256)
    direct = evaluate(classifier, dataset, spec, EvalOptions(limit=8)).to_dict()
    assert out.result["metrics"] == direct["metrics"]
    assert out.result["per_image"] == direct["per_image"]
    assert out.result["landscape"] == direct["landscape"]
    assert out.hello["device"] == "cpu"
    assert out.hello["network_isolated"] is True
    assert _sandboxed_pythons() == {}


def test_options_flow_to_the_evaluator_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    model = small_cnn_file(tmp_path / "m.safetensors")
    out = run_sandboxed(_job(model, options={"metrics": ["natural", "grid"]}), LIMITS)
    assert {"natural", "grid"} <= set(out.result["metrics"])
    assert "random" not in out.result["metrics"] and "vote_natural" not in out.result["metrics"]
    failure = _failure(_job(model, options={"bogus": 1}))
    assert failure.kind == "internal"
    assert "unknown evaluation options: bogus" in failure.message


def test_both_processes_see_none_of_the_parents_environment_run_unprivileged_and_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPATIALBENCH_DATABASE_URL", "postgresql://u:hunter2@db/x")
    monkeypatch.setenv("SPATIALBENCH_SECRET_KEY", "hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    seen: dict[int, tuple[bytes, bytes, str]] = {}

    def peek_then_stop() -> bool:
        for pid, cmdline in _sandboxed_pythons().items():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            uid = next(line for line in status.splitlines() if line.startswith("Uid:"))
            seen[pid] = (cmdline, environ, uid)
        roles = {m for cmdline, _, _ in seen.values() for m in SANDBOX_MODULES if m in cmdline}
        return len(roles) == 2

    model = export_file(tmp_path / "slow.pt2", "slow")
    with pytest.raises(SandboxStopped):
        run_sandboxed(_job(model, limit=500), LIMITS, tick=peek_then_stop, tick_interval_s=0.1)
    assert len(seen) >= 2
    for _cmdline, environ, uid in seen.values():
        names = {item.split(b"=", 1)[0].decode() for item in environ.split(b"\0") if item}
        assert b"hunter2" not in environ
        assert not any(name.startswith("SPATIALBENCH") for name in names)
        assert names <= {
            "PYTHONPATH",
            "PYTHONDONTWRITEBYTECODE",
            "PYTHONNOUSERSITE",
            "HOME",
            "TMPDIR",
            "LANG",
            "OMP_NUM_THREADS",
            "MKL_NUM_THREADS",
            "CUDA_VISIBLE_DEVICES",
            "LD_LIBRARY_PATH",
            "NVIDIA_VISIBLE_DEVICES",
            "TZ",
            "PWD",  # bubblewrap's --chdir: the private /tmp
        }
        if os.geteuid() == 0:  # never the worker's root: the sandbox user, on the host too
            nobody = str(pwd.getpwnam("nobody").pw_uid)
            assert uid.split()[1:] == [nobody] * 4
    # Stopped: both are gone.
    assert _sandboxed_pythons() == {}
    # (A killed sandbox's processes are reparented away from us: look them up by pid.)
    assert not any(_alive(pid, cmdline) for pid, (cmdline, _, _) in seen.items())


def test_the_deadline_kills_both_processes(tmp_path: Path) -> None:
    model = export_file(tmp_path / "slow.pt2", "slow")
    limits = SandboxLimits(deadline_s=6, threads=1)
    failure = _failure(_job(model, limit=500), limits)
    assert failure.kind == "deadline"
    assert "time limit of 6 s" in failure.message
    assert _sandboxed_pythons() == {}


def test_nan_logits_fail_with_a_message(tmp_path: Path) -> None:
    failure = _failure(_job(export_file(tmp_path / "nan.pt2", "nan")))
    assert failure.kind == "model"
    assert "NaN or infinite logits" in failure.message


def test_wrong_output_shape_fails_with_a_message(tmp_path: Path) -> None:
    failure = _failure(_job(export_file(tmp_path / "shape.pt2", "shape")))
    assert failure.kind == "model"
    assert "expected logits of shape" in failure.message
    assert ", 7)" in failure.message


def test_weights_for_another_architecture_fail_with_a_message(tmp_path: Path) -> None:
    model = small_cnn_file(tmp_path / "m.safetensors")
    failure = _failure(_job(model, architecture="resnet32"))
    assert failure.kind == "model"
    assert failure.message.startswith("The weights do not fit the architecture")
    assert "resnet32" in failure.message


def test_running_out_of_memory_fails_with_a_message(tmp_path: Path) -> None:
    model = export_file(tmp_path / "memory.pt2", "memory")
    limits = SandboxLimits(deadline_s=120, threads=1, memory_bytes=6 * 2**30)
    failure = _failure(_job(model), limits)
    assert failure.kind == "out_of_memory"
    assert "ran out of memory (the limit is 6.0 GiB" in failure.message
    assert "Reduce" in failure.message


def test_a_missing_dataset_says_so(tmp_path: Path) -> None:
    model = small_cnn_file(tmp_path / "m.safetensors")
    failure = _failure(_job(model, benchmark="cifar10", data_dir=tmp_path / "empty"))
    assert failure.kind == "dataset"
    assert "cifar-10-batches-py" in failure.message


def test_a_sandbox_that_cannot_start_fails_the_job_and_runs_nothing(tmp_path: Path) -> None:
    model = small_cnn_file(tmp_path / "m.safetensors")
    # bubblewrap refuses to mount a file that is not there: nothing may run without it.
    failure = _failure(_job(model, benchmarks_file=tmp_path / "missing.toml"))
    assert failure.kind == "internal"
    assert "cannot start its sandbox" in failure.message
    assert "bwrap" in failure.detail
    assert _sandboxed_pythons() == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox user applies to a root worker")
def test_a_root_worker_never_runs_the_sandbox_as_root(tmp_path: Path) -> None:
    model = small_cnn_file(tmp_path / "m.safetensors")
    for user in ("root", "no-such-user"):
        failure = _failure(_job(model), SandboxLimits(deadline_s=60, threads=1, user=user))
        assert failure.kind == "internal"
        assert "misconfigured" in failure.message


def test_example_files_that_are_links_are_dropped(tmp_path: Path) -> None:
    source = tmp_path / "out"
    source.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    (source / "00_original.png").symlink_to(secret)
    (source / "00_transformed.png").write_bytes(b"\x89PNG\r\n\x1a\nfine")
    (source / "01_original.png").write_bytes(b"\x89PNG\r\n\x1a\nfine")
    (source / "01_transformed.png").write_bytes(b"GIF89a")
    point = {"theta": 0.0, "dx": 0.0, "dy": 0.0}
    base = {"index": 0, "label": 0, "pred": 0, "fooled": True, "point": point, "fool_pred": 1}
    examples = [
        {**base, "original": f"{n:02d}_original.png", "transformed": f"{n:02d}_transformed.png"}
        for n in range(2)
    ] + [{**base, "original": "../../etc/passwd", "transformed": "00_transformed.png"}]
    kept, folder = _collect_examples(examples, source, os.getuid())
    assert (kept, folder) == ([], None)


def test_folders_of_dead_workers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f"spatialbench-job-{dead.pid}-abc"
    alive = tmp_path / f"spatialbench-job-{os.getpid()}-def"
    for folder in (abandoned, alive):
        (folder / "out").mkdir(parents=True)
    assert remove_abandoned_job_dirs(tmp_path) == [abandoned]
    assert alive.exists() and not abandoned.exists()


def test_the_worker_process_never_imports_torch() -> None:
    code = (
        "import sys, worker.tasks, worker.runner, worker.sandbox, worker.reaper, worker.cli;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --- The remote model: logits and gradients across the channel ---------------------------------


class _Step(nn.Module):
    """Logits that are a step function of the input: no gradient to give."""

    bright: Tensor
    dark: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bright", torch.arange(10.0))
        self.register_buffer("dark", torch.arange(10.0).flip(0))

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x.mean(dim=(1, 2, 3)).unsqueeze(1) > 0.5, self.bright, self.dark)


def test_remote_logits_and_gradients_equal_the_model_run_in_process(tmp_path: Path) -> None:
    weights = small_cnn_file(tmp_path / "m.safetensors")
    config = ModelProcessConfig(
        model_path=str(weights), model_format="safetensors", architecture="small_cnn",
        num_classes=10, threads=1,
    )  # fmt: skip
    local = load_model(weights, arch="small_cnn", num_classes=10)
    x = torch.rand(5, 3, 32, 32)
    with LocalModelProcess(config) as process:
        remote = RemoteModel(process.client)
        client_images = x.clone().requires_grad_(True)
        logits = remote(client_images)
        torch.nn.functional.cross_entropy(logits, torch.arange(5)).backward()
    local_images = x.clone().requires_grad_(True)
    expected = local(local_images)
    torch.nn.functional.cross_entropy(expected, torch.arange(5)).backward()
    torch.testing.assert_close(logits.detach(), expected.detach())
    assert client_images.grad is not None and local_images.grad is not None
    torch.testing.assert_close(client_images.grad, local_images.grad)


def test_a_model_without_gradients_raises_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "argmax.pt2"
    program = torch.export.export(
        _Step().eval(),
        (torch.rand(2, 3, 32, 32),),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    torch.export.save(program, str(path))
    config = ModelProcessConfig(
        model_path=str(path), model_format="export", num_classes=10, threads=1
    )
    with LocalModelProcess(config) as process:
        remote = RemoteModel(process.client)
        assert remote(torch.rand(3, 3, 32, 32)).shape == (3, 10)
        images = torch.rand(3, 3, 32, 32, requires_grad=True)
        with pytest.raises(ModelNotDifferentiableError):
            remote(images).sum().backward()


# --- Bounds on what comes back -----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return digits_result(
        tmp_path_factory.mktemp("m"), limit=4, metrics=frozenset({"natural", "grid"})
    )


def _tampered(result: dict[str, Any], change: Any) -> dict[str, Any]:
    copied = copy.deepcopy(result)
    change(copied)
    return copied


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r["metrics"]["grid"].update(correct=5, total=4),
        lambda r: r["metrics"]["grid"].update(correct=-1),
        lambda r: r["metrics"]["natural"].update(total=10**9),
        lambda r: r["landscape"].update(shape=[31, 5, 4]),
        lambda r: r["landscape"].update(correct=r["landscape"]["correct"][:-1]),
        lambda r: r["landscape"]["correct"].__setitem__(0, 10**6),
        lambda r: r["per_image"]["grid_fool_count"].__setitem__(0, 300_000),
        lambda r: r["per_image"]["label"].append(0),
        lambda r: r["benchmark"].update(name="cifar10"),
        lambda r: r["cost"].update(wall_time_s=float("nan")),
        lambda r: r["config"].update(grid=[1, 1, 1]),
    ],
)
def test_out_of_bounds_values_are_rejected(real_result: dict[str, Any], change: Any) -> None:
    assert check_result(real_result, "digits")["metrics"] == real_result["metrics"]
    with pytest.raises(ResultRejected):
        check_result(_tampered(real_result, change), "digits")


def test_accuracies_are_recomputed_and_strings_capped(real_result: dict[str, Any]) -> None:
    def change(r: dict[str, Any]) -> None:
        r["metrics"]["grid"]["accuracy"] = 1.0
        r["cost"]["device"] = "x" * 100_000
        r["landscape"]["accuracy"] = [[[1.0] * 5] * 5] * 31

    checked = check_result(_tampered(real_result, change), "digits")
    grid = real_result["metrics"]["grid"]
    assert checked["metrics"]["grid"]["accuracy"] == grid["correct"] / grid["total"]
    assert len(checked["cost"]["device"]) == 200
    assert checked["landscape"]["accuracy"] == real_result["landscape"]["accuracy"]
