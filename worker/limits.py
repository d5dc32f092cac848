"""Resource limits a sandboxed process sets on itself before it reads anything it was sent.

Used by both sandboxed processes (`worker.model_process`, `worker.evaluator_process`) as
their first act; bubblewrap has no options for rlimits.
"""

from __future__ import annotations

import resource


def _set_limit(which: int, value: int) -> None:
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def apply_limits(*, open_files: int, file_bytes: int) -> None:
    """No core dumps, capped open files and file sizes."""
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_NOFILE, open_files)
    _set_limit(resource.RLIMIT_FSIZE, file_bytes)


def limit_memory(memory_bytes: int | None, device_type: str) -> None:
    """Cap the address space on the CPU. CUDA reserves terabytes of virtual address space for
    unified addressing, so on the GPU the device's memory and the container's limit are the
    bounds instead."""
    if memory_bytes and device_type == "cpu":
        _set_limit(resource.RLIMIT_AS, memory_bytes)
