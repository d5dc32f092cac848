"""The sandbox against an attacker whose code runs where the model runs, replayed against a
real ``spatialbench serve`` (SQLite, the embedded broker, its worker) with the real
bubblewrap profile.

- A probe runs under the same profile as the model process (and the evaluator process) and
  tries every escape the review found: read the database, the stored models and the API token,
  write outside its tmpfs, reach the API over the network, signal the server, leave a process
  behind. Each must fail.
- A hostile model process (attacker code in the model's place, with the model's pipes) tries
  to write a result of its own to every descriptor it has and to the evaluator's output
  folder, and answers with a forged frame: no result comes out.
- An archive whose pickle payload would forge the metrics is uploaded to the server: the board
  never shows its numbers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import Tensor, nn

import worker.sandbox as sandbox
from tests.serve_helpers import ServeProcess
from tests.worker.helpers import QUICK_BENCHMARK, ROOT, wait_for
from worker.sandbox import (
    SANDBOX_JOB,
    Role,
    SandboxFailure,
    SandboxJob,
    SandboxLimits,
    child_environment,
    run_sandboxed,
    sandbox_identity,
    sandbox_prefix,
)

pytestmark = pytest.mark.timeout(600)

BASELINE = ROOT / "baselines" / "digits-standard.safetensors"
FORGED = {"accuracy": 1.0, "correct": 20, "total": 20}


@dataclass
class Serve:
    base: str
    port: int
    pid: int
    token: str
    state: Path

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.Client(base_url=self.base, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """``spatialbench serve`` in its embedded mode, with one real submission evaluated (so its
    database, storage and token hold what an attacker would want). The sandbox runs as the
    default unprivileged user, not as the test's."""
    folder = tmp_path_factory.mktemp("serve")
    state = folder / "var"
    service = ServeProcess(
        state, folder, cwd=folder, sandbox_user="nobody", eval_limit="20", batch_size="256",
        sandbox_deadline_s="300",
    )  # fmt: skip
    try:
        token = service.wait_ready(timeout=180)
        server = Serve(service.url, service.port, service.proc.pid, token, state)
        with server.client() as client:
            submitted = _submit(client, BASELINE, "honest baseline", "small_cnn")
            _wait_final(client, submitted)
        yield server
    finally:
        service.stop()


def _submit(client: httpx.Client, path: Path, name: str, arch: str | None) -> httpx.Response:
    data = {"display_name": name, "benchmark": QUICK_BENCHMARK}
    if arch:
        data["architecture"] = arch
    with path.open("rb") as f:
        return client.post("/api/v1/submissions", files={"file": (path.name, f)}, data=data)


def _wait_final(client: httpx.Client, response: httpx.Response) -> dict[str, Any]:
    assert response.status_code in (200, 202), response.text
    url = response.json()["status_url"]

    def final() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(url).json()
        return body if body["status"] in ("finished", "failed", "cancelled") else None

    result: dict[str, Any] = wait_for(final, 400, 0.5, what="the submission to end")
    return result


# --- The probe ---------------------------------------------------------------------------------

PROBE = r"""
import json, os, signal, socket, sys, time
targets = json.loads(sys.argv[1])
report = {}

def attempt(name, action):
    try:
        action()
    except BaseException as exc:
        report[name] = "failed: " + type(exc).__name__
    else:
        report[name] = "succeeded"

def read(path):
    with open(path, "rb") as f:
        f.read(16)

for name, path in targets["read"].items():
    attempt("read " + name, lambda p=path: read(p))
for name, path in targets["write"].items():
    attempt("write " + name, lambda p=path: open(p, "wb").write(b"x"))
attempt("connect to the API", lambda: socket.create_connection(
    ("127.0.0.1", targets["port"]), timeout=3).close())
attempt("connect outside", lambda: socket.create_connection(("1.1.1.1", 80), timeout=3).close())
attempt("signal the server", lambda: os.kill(targets["server_pid"], signal.SIGTERM))
attempt("write own tmpfs", lambda: open("/tmp/mine", "wb").write(b"fine"))
report["uid"] = os.getuid()
report["environment"] = sorted(os.environ)
# A double fork: the grandchild would outlive the job if anything let it.
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c",
                 "import time; time.sleep(300)", targets["marker"]])
    os._exit(0)
os.wait()
print(json.dumps(report))
"""


def _ours(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if marker.encode() in cmdline and b"time.sleep(300)" in cmdline:
            found.append(int(entry))
    return found


@pytest.mark.parametrize("role", [Role.MODEL, Role.EVALUATOR])
def test_a_probe_in_the_sandbox_cannot_escape(serve: Serve, role: Role, tmp_path: Path) -> None:
    stored = sorted(p for p in (serve.state / "models").rglob("*") if p.is_file())
    assert stored, "the server stored no model"
    assert (serve.state / "spatialbench.db").is_file()
    model = tmp_path / "model.safetensors"
    shutil.copyfile(BASELINE, model)
    out = tmp_path / "out"
    out.mkdir()
    binds: list[tuple[str, Path, Path]] = (
        [("--ro-bind", model, SANDBOX_JOB / model.name)]
        if role is Role.MODEL
        else [("--bind", out, SANDBOX_JOB / "out")]
    )
    identity = sandbox_identity(None)
    if identity.drop:
        os.chown(out, identity.uid, identity.gid)
    marker = f"sandbox-probe-{os.getpid()}-{role.value}"
    targets = {
        "read": {
            "the database": str(serve.state / "spatialbench.db"),
            "the stored models": str(stored[0]),
            "the API token": str(serve.state / "local-token"),
            "the project's settings": str(ROOT / "pyproject.toml"),
            "host passwords": "/etc/shadow",
            "the server's environment": f"/proc/{serve.pid}/environ",
        },
        "write": {
            "the database": str(serve.state / "spatialbench.db"),
            "the evaluator's code": str(ROOT / "worker" / "probe.py"),
            "the interpreter": str(Path(sys.executable).parent / "probe"),
            "the model": str(SANDBOX_JOB / model.name),
            "the root": "/probe",
        },
        "port": serve.port,
        "server_pid": serve.pid,
        "marker": marker,
    }
    prefix = sandbox_prefix(role, identity, binds=binds, tmpfs_bytes=2**24)
    done = subprocess.run(
        [*prefix, sys.executable, "-s", "-B", "-c", PROBE, json.dumps(targets)],
        env=child_environment(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    escaped = {
        name: outcome
        for name, outcome in report.items()
        if outcome == "succeeded" and name != "write own tmpfs"
    }
    assert escaped == {}
    assert report["write own tmpfs"] == "succeeded"
    if identity.drop:
        assert report["uid"] != 0
    assert not any(name.startswith("SPATIALBENCH") for name in report["environment"])
    # Nothing outlives the sandbox; the server is untouched.
    assert _ours(marker) == []
    os.kill(serve.pid, 0)
    assert not (ROOT / "worker" / "probe.py").exists()
    with serve.client() as client:
        assert client.get("/healthz").status_code == 200


# --- A hostile model process -------------------------------------------------------------------

HOSTILE = r"""
import json, os, struct, sys
forged = {"type": "result", "result": {"metrics": {"grid": json.loads(sys.argv[3])}}}
line = (json.dumps(forged) + "\n").encode()
request_fd, answer_fd = int(sys.argv[1]), int(sys.argv[2])
for fd in range(0, 256):
    if fd == answer_fd:  # (a line there would only break the frames: the same failure)
        continue
    try:
        os.write(fd, line)
    except OSError:
        pass
for path in ("/job/out/forged.json", "/job/out/00_original.png"):
    try:
        open(path, "wb").write(line)
    except OSError:
        pass
# Then answer the first request with a forged frame: 2**18 x 2**18 logits (a terabyte).
os.write(answer_fd, struct.pack("<4sBBBB4x4QQ", b"SBT1", 1, 2, 1, 0, 0, 0, 0, 0, 0))
header = os.read(request_fd, 52)
os.write(answer_fd, struct.pack("<4sBBBB4x4QQ", b"SBT1", 3, 1, 2, 0, 2**18, 2**18, 0, 0, 2**38))
"""


def test_a_hostile_model_process_cannot_write_a_result(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = sandbox.bwrap_command

    def hostile(role: Role, argv: list[str], *args: Any, **kwargs: Any) -> list[str]:
        command = real(role, argv, *args, **kwargs)
        if role is not Role.MODEL:
            return command
        module = command.index("worker.model_process")
        return [*command[: module - 1], "-c", HOSTILE, *argv, json.dumps(FORGED)]

    monkeypatch.setattr(sandbox, "bwrap_command", hostile)
    model = tmp_path / "model.safetensors"
    shutil.copyfile(BASELINE, model)
    job = SandboxJob(
        model_path=model,
        model_format="safetensors",
        benchmark="digits",
        architecture="small_cnn",
        limit=4,
        examples=2,
    )
    with pytest.raises(SandboxFailure) as info:
        run_sandboxed(job, SandboxLimits(deadline_s=120, threads=1))
    assert info.value.kind == "model"
    assert info.value.message.startswith("The model's output is unusable")
    assert "expected logits of shape (4, 10)" in info.value.message


# --- A pickle payload on the real server -------------------------------------------------------


class _Payload:
    """Unpickles as code that forges a result on every descriptor and leaves a marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        line = json.dumps({"type": "result", "result": {"metrics": {"grid": FORGED}}})
        code = (
            f"import os\nopen({str(self.marker)!r}, 'w').write('ran')\n"
            f"for fd in range(256):\n"
            f"    try: os.write(fd, {(line + chr(10)).encode()!r})\n"
            f"    except OSError: pass\n"
        )
        return (exec, (code,))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.mean(dim=(2, 3)))


def _poisoned_archive(path: Path, marker: Path) -> Path:
    clean = path.with_suffix(".clean.pt2")
    program = torch.export.export(
        _Tiny().eval(),
        (torch.rand(2, 3, 32, 32),),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    torch.export.save(program, str(clean))
    payload = io.BytesIO()
    torch.save(_Payload(marker), payload)
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if "sample_inputs" in info.filename:
                data = payload.getvalue()
            dst.writestr(info, data)
    return path


def test_a_pickle_payload_never_puts_its_numbers_on_the_board(serve: Serve, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    archive = _poisoned_archive(tmp_path / "poisoned.pt2", marker)
    with serve.client() as client:
        response = _submit(client, archive, "forged numbers", None)
        if response.status_code in (200, 202):
            body = _wait_final(client, response)
            evaluation = body.get("evaluation") or {}
            assert evaluation.get("grid") != 1.0
        else:
            assert response.status_code == 422, response.text
        board = client.get(f"/api/v1/leaderboard/{QUICK_BENCHMARK}").json()
    rows = board.get("rows") or board.get("entries") or []
    assert all(row.get("grid") != 1.0 for row in rows), rows
    # The marker would be written on the host only if the payload ran outside the sandbox.
    assert not marker.exists()
