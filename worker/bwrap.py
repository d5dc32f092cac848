"""The bubblewrap profile of the sandboxed processes: what they see and who they run as.

`bwrap_command` builds the command line that runs ``worker.<role>_process`` under bubblewrap:
new PID, network, IPC, UTS and mount namespaces and a user namespace; a root of its own with
the interpreter, its site-packages and the project's ``evaluator`` and ``worker`` packages
read-only at their own paths; a private size-capped tmpfs for ``/tmp`` (its ``HOME``); no
view of the state directory, database, broker, storage, other jobs or secrets;
``--die-with-parent``. When the worker runs as root the process runs as the unprivileged
sandbox user: bubblewrap mounts as root, then ``setpriv`` drops to that user (no
capabilities, no new privileges) before ``unshare --user`` and the interpreter start.
`child_environment` is the processes' whole environment. Starting and watching them is
`worker.sandbox`'s; this module only says how. It imports neither torch nor the evaluator.
"""

from __future__ import annotations

import os
import pwd
import shutil
import site
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

__all__ = [
    "PROJECT_ROOT",
    "SANDBOX_JOB",
    "SANDBOX_TMP",
    "SETUP_ERROR_PREFIXES",
    "Identity",
    "Role",
    "SandboxSetupError",
    "bwrap_command",
    "child_environment",
    "interpreter_paths",
    "sandbox_identity",
    "sandbox_prefix",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Variables passed through from the worker's environment: device selection and library paths
# of the CUDA images. Nothing else crosses.
PASSTHROUGH_ENV = ("CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "NVIDIA_VISIBLE_DEVICES", "TZ")
# Where the sandboxes see their job's files.
SANDBOX_JOB = Path("/job")
SANDBOX_TMP = Path("/tmp")
# Host files the dynamic linker and the C library read; the rest of /etc stays out of view.
_SYSTEM_RO = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
_ETC_RO = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
_GPU_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia0",
                "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia3", "/dev/nvidia4", "/dev/nvidia5",
                "/dev/nvidia6", "/dev/nvidia7")  # fmt: skip
# What the sandbox's own tools print when they cannot set it up.
SETUP_ERROR_PREFIXES = ("bwrap:", "setpriv:", "unshare:")


class Role(StrEnum):
    MODEL = "model"
    EVALUATOR = "evaluator"


class SandboxSetupError(Exception):
    """The sandbox cannot be built on this worker: the operator has to fix it. ``message`` is
    for the user, ``detail`` for the operator."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


def child_environment(threads: int | None) -> dict[str, str]:
    """The sandboxed processes' whole environment."""
    n = str(threads or os.cpu_count() or 1)
    env = {
        "PYTHONPATH": str(PROJECT_ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "HOME": str(SANDBOX_TMP),
        "TMPDIR": str(SANDBOX_TMP),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
    }
    for name in PASSTHROUGH_ENV:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


@dataclass(frozen=True)
class Identity:
    """Who the sandboxed processes run as. ``drop``: the worker is root, so the sandbox
    switches to ``uid``/``gid`` itself."""

    uid: int
    gid: int
    drop: bool


def sandbox_identity(user: str | None) -> Identity:
    if os.geteuid() != 0:
        return Identity(os.getuid(), os.getgid(), drop=False)
    name = user or "nobody"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SandboxSetupError(
            "The worker is misconfigured: its sandbox user does not exist.",
            f"no user {name!r}; set SPATIALBENCH_SANDBOX_USER",
        ) from None
    if entry.pw_uid == 0:
        raise SandboxSetupError(
            "The worker is misconfigured: its sandbox user is root.",
            f"user {name!r} has uid 0; set SPATIALBENCH_SANDBOX_USER to an unprivileged one",
        )
    return Identity(entry.pw_uid, entry.pw_gid, drop=True)


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", os.defpath) + ":/usr/bin:/bin")
    if path is None:
        raise SandboxSetupError(
            "The worker cannot start its sandbox; the operator has to fix this.",
            f"{name} is not installed (install the Debian package bubblewrap: scripts/bwrap.sh)",
        )
    return path


def interpreter_paths() -> list[Path]:
    """What the sandboxed interpreter needs, read-only at its own path: the interpreter's
    prefix, the virtualenv and its site-packages, and the project's two packages the
    sandboxes import (not the project root, where the embedded mode keeps its state)."""
    paths = {Path(sys.base_prefix), Path(sys.prefix), Path(sys.executable).parent}
    paths.update(Path(p) for p in site.getsitepackages())
    paths.update(PROJECT_ROOT / name for name in ("evaluator", "worker"))
    resolved = {p.resolve() for p in paths if p.exists()} | {p for p in paths if p.exists()}
    return sorted(resolved, key=lambda p: (len(p.parts), str(p)))


def bwrap_command(
    role: Role,
    argv: list[str],
    identity: Identity,
    *,
    binds: list[tuple[str, Path, Path]],
    tmpfs_bytes: int,
    gpu: bool = False,
) -> list[str]:
    """The command that runs the role's module (``worker.<role>_process``) with ``argv``
    sandboxed. ``binds`` are (bwrap option, host path, sandbox path) for the role's files."""
    prefix = sandbox_prefix(role, identity, binds=binds, tmpfs_bytes=tmpfs_bytes, gpu=gpu)
    return [*prefix, sys.executable, "-s", "-B", "-m", f"worker.{role.value}_process", *argv]


def sandbox_prefix(
    role: Role,
    identity: Identity,
    *,
    binds: list[tuple[str, Path, Path]],
    tmpfs_bytes: int,
    gpu: bool = False,
) -> list[str]:
    """The sandbox profile: the command line that runs what follows it sandboxed."""
    cmd = [_tool("bwrap"), "--die-with-parent", "--new-session"]
    if identity.drop:
        # Root mounts without a user namespace (so it can read an interpreter under a home
        # closed to others), then the process drops to the sandbox user below.
        cmd += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
                "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]  # fmt: skip
    else:
        cmd += ["--unshare-all", "--unshare-user"]
    cmd += ["--hostname", f"sandbox-{role.value}", "--proc", "/proc", "--dev", "/dev"]
    # Writable by the sandbox user only through its sticky /tmp.
    cmd += ["--perms", "1777", "--size", str(tmpfs_bytes), "--tmpfs", str(SANDBOX_TMP)]
    for system in (*_SYSTEM_RO, *_ETC_RO):
        cmd += ["--ro-bind-try", system, system]
    paths = interpreter_paths()
    targets = [*paths, *(target for _option, _source, target in binds)]
    # The folders above the mounts are made by bubblewrap; they must be traversable by the
    # sandbox user (a home closed to others on the host is an empty, open folder here).
    for folder in _ancestors(targets):
        cmd += ["--perms", "0755", "--dir", str(folder)]
    for path in paths:
        cmd += ["--ro-bind", str(path), str(path)]
    if gpu:
        for device in _GPU_DEVICES:
            cmd += ["--dev-bind-try", device, device]
        cmd += ["--ro-bind-try", "/sys", "/sys"]
    for option, source, target in binds:
        cmd += [option, str(source), str(target)]
    cmd += ["--chdir", str(SANDBOX_TMP), "--"]
    if identity.drop:
        cmd += [_tool("setpriv"), f"--reuid={identity.uid}", f"--regid={identity.gid}",
                "--clear-groups", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all",
                "--"]  # fmt: skip
        cmd += [_tool("unshare"), "--user", "--"]
    return cmd


def _ancestors(paths: list[Path]) -> list[Path]:
    found = {parent for path in paths for parent in path.parents if parent != Path("/")}
    return sorted(found, key=lambda p: (len(p.parts), str(p)))
