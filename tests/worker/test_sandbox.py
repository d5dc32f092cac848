"""The sandbox: what the child can see, how long it may run, and what its failures say."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from evaluator.attacks import Classifier
from evaluator.benchmarks import get_benchmark
from evaluator.data import load_dataset, resolve_benchmark
from evaluator.evaluate import EvalOptions, evaluate
from evaluator.models.loading import load_model
from tests.worker.helpers import ROOT, export_file, small_cnn_file
from worker.sandbox import (
    SandboxFailure,
    SandboxJob,
    SandboxLimits,
    SandboxStopped,
    _collect_examples,
    remove_abandoned_job_dirs,
    run_sandboxed,
)

LIMITS = SandboxLimits(deadline_s=120, threads=1, user=None, memory_bytes=8 * 2**30)


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


def _children() -> list[int]:
    """Live processes whose parent is this test process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.append(int(entry))
    return found


def _sandbox_children() -> list[int]:
    return [
        pid
        for pid in _children()
        if b"worker.sandbox_child" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _failure(job: SandboxJob, limits: SandboxLimits = LIMITS) -> SandboxFailure:
    with pytest.raises(SandboxFailure) as info:
        run_sandboxed(job, limits)
    return info.value


def test_the_result_equals_the_evaluator_run_directly(trained_model: Path) -> None:
    model = trained_model
    out = run_sandboxed(_job(model, limit=8), LIMITS)

    torch.set_num_threads(1)
    spec = get_benchmark("digits")
    dataset = load_dataset(spec)
    spec = resolve_benchmark(spec, dataset)
    classifier = Classifier(load_model(model, arch="small_cnn"), 10, batch_size=256)
    direct = evaluate(classifier, dataset, spec, EvalOptions(limit=8)).to_dict()
    assert out.result["metrics"] == direct["metrics"]
    assert out.result["per_image"] == direct["per_image"]
    assert out.result["landscape"] == direct["landscape"]
    assert out.hello["device"] == "cpu"
    assert _sandbox_children() == []


def test_the_child_sees_none_of_the_parents_environment_and_stops_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPATIALBENCH_DATABASE_URL", "postgresql://u:hunter2@db/x")
    monkeypatch.setenv("SPATIALBENCH_SECRET_KEY", "hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    environments: list[bytes] = []
    seen: list[int] = []

    def peek_then_stop() -> bool:
        for pid in _sandbox_children():
            seen.append(pid)
            try:
                environments.append(Path(f"/proc/{pid}/environ").read_bytes())
            except OSError:
                pass
        return bool(environments)

    model = export_file(tmp_path / "slow.pt2", "slow")
    with pytest.raises(SandboxStopped):
        run_sandboxed(_job(model, limit=500), LIMITS, tick=peek_then_stop, tick_interval_s=0.1)
    names = {item.split(b"=", 1)[0].decode() for item in environments[-1].split(b"\0") if item}
    assert b"hunter2" not in environments[-1]
    assert not any(name.startswith("SPATIALBENCH") for name in names)
    assert "PATH" not in names
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
    }
    # Stopped: the child is gone (not even a zombie is left to us).
    assert _sandbox_children() == []
    assert all(not Path(f"/proc/{pid}").exists() for pid in seen)


def test_the_deadline_kills_the_child(tmp_path: Path) -> None:
    model = export_file(tmp_path / "slow.pt2", "slow")
    limits = SandboxLimits(deadline_s=4, threads=1, user=None)
    failure = _failure(_job(model, limit=500), limits)
    assert failure.kind == "deadline"
    assert "time limit of 4 s" in failure.message
    assert _sandbox_children() == []


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
    limits = SandboxLimits(deadline_s=120, threads=1, user=None, memory_bytes=6 * 2**30)
    failure = _failure(_job(model), limits)
    assert failure.kind == "out_of_memory"
    assert "ran out of memory (the limit is 6.0 GiB" in failure.message
    assert "Reduce" in failure.message


def test_a_missing_dataset_says_so(tmp_path: Path) -> None:
    model = small_cnn_file(tmp_path / "m.safetensors")
    failure = _failure(_job(model, benchmark="cifar10", data_dir=tmp_path / "empty"))
    assert failure.kind == "dataset"
    assert "cifar-10-batches-py" in failure.message


def test_example_files_that_are_links_are_dropped(tmp_path: Path) -> None:
    source = tmp_path / "out"
    source.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    (source / "00_original.png").symlink_to(secret)
    (source / "00_transformed.png").write_bytes(b"\x89PNG\r\n\x1a\nfine")
    (source / "01_original.png").write_bytes(b"\x89PNG\r\n\x1a\nfine")
    (source / "01_transformed.png").write_bytes(b"GIF89a")
    examples = [
        {"original": f"{n:02d}_original.png", "transformed": f"{n:02d}_transformed.png"}
        for n in range(2)
    ] + [{"original": "../../etc/passwd", "transformed": "00_transformed.png"}]
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


def _nobody_can_run_python() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return False
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import torch"],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            cwd="/",
            env={"PYTHONPATH": str(ROOT)},
            capture_output=True,
            timeout=60,
        )
    except (PermissionError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.skipif(
    not _nobody_can_run_python(),
    reason="needs root, and an interpreter the user 'nobody' can run",
)
def test_as_root_the_child_runs_as_nobody(tmp_path: Path) -> None:
    uids: list[str] = []

    def peek() -> bool:
        for pid in _sandbox_children():
            status = Path(f"/proc/{pid}/status").read_text()
            uids.extend(line for line in status.splitlines() if line.startswith("Uid:"))
        return False

    model = small_cnn_file(tmp_path / "m.safetensors")
    limits = SandboxLimits(deadline_s=120, threads=1, user="nobody")
    out = run_sandboxed(_job(model), limits, tick=peek, tick_interval_s=0.2)
    assert out.result["metrics"]["natural"]["total"] == 4
    nobody = pwd.getpwnam("nobody").pw_uid
    assert uids and all(line.split()[1] == str(nobody) for line in uids)


def test_the_worker_process_never_imports_torch() -> None:
    code = (
        "import sys, worker.tasks, worker.runner, worker.sandbox, worker.reaper, worker.cli;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
