"""A sandbox session evaluates shard after shard: the two processes start once, each shard is
an evaluation of its own (its deadline too), and the shards' records concatenate to one run's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import worker.sandbox as sandbox
from evaluator.examples import merge_examples
from tests.worker.helpers import export_file, small_cnn_file
from tests.worker.test_sandbox import LIMITS, _alive, _job, _sandboxed_pythons
from worker.sandbox import (
    SandboxFailure,
    SandboxLimits,
    SandboxStopped,
    ShardOutput,
    run_sandboxed,
    run_sandboxed_shards,
)

FAST = {"metrics": ["natural", "grid"]}
EXAMPLES = 3


class _Caller:
    """A ``next_shard`` that hands out ``ranges`` in turn, keeps each output in ``seen`` and
    reads its PNGs into ``pngs`` (by image index) before the driver removes them;
    ``between(n)`` runs when the n-th shard (from 1) is done."""

    def __init__(self, ranges: list[range], between: Callable[[int], None] | None = None):
        self.ranges = ranges
        self.between = between
        self.seen: list[ShardOutput] = []
        self.pngs: dict[int, list[bytes]] = {}

    def __call__(self, output: ShardOutput | None) -> range | None:
        if output is not None:
            assert output.shard == self.ranges[len(self.seen)]
            for e in output.examples:
                assert output.examples_dir is not None
                self.pngs[e["index"]] = _read(output.examples_dir, e)
            self.seen.append(output)
            if self.between is not None:
                self.between(len(self.seen))
        done = len(self.seen)
        return self.ranges[done] if done < len(self.ranges) else None


def _read(folder: Path, example: dict[str, Any]) -> list[bytes]:
    return [(folder / example[kind]).read_bytes() for kind in ("original", "transformed")]


class _Starts:
    """Counts the sandboxed processes started, by role."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.roles: list[str] = []
        real = sandbox._Process

        def counting(role: sandbox.Role, *args: Any) -> sandbox._Process:
            self.roles.append(role.value)
            return real(role, *args)

        monkeypatch.setattr(sandbox, "_Process", counting)


def test_three_shards_start_the_model_once_and_equal_one_run(
    trained_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = run_sandboxed(_job(trained_model, limit=12, options=FAST, examples=EXAMPLES), LIMITS)
    starts = _Starts(monkeypatch)
    progress: list[int] = []
    ranges = [range(0, 2), range(2, 3), range(3, 12)]
    caller = _Caller(ranges)
    seen = caller.seen
    run_sandboxed_shards(
        _job(trained_model, limit=12, options=FAST, examples=EXAMPLES),
        LIMITS,
        caller,
        on_progress=lambda _: progress.append(len(seen)),
    )
    # One model process and one evaluator for the three shards, one hello (the same pid).
    assert sorted(starts.roles) == ["evaluator", "model"]
    assert len({output.hello["pid"] for output in seen}) == 1
    assert [output.shard for output in seen] == ranges
    assert set(progress) == {0, 1, 2}  # each shard reported its own progress
    merged = {
        key: [v for output in seen for v in output.result["per_image"][key]]
        for key in whole.result["per_image"]
    }
    assert merged == whole.result["per_image"]
    assert merged["position"] == list(range(12))
    # The examples chosen shard by shard are the single run's, image for image and pixel for
    # pixel (the names restart at 00 in each shard).
    chosen = merge_examples([output.examples for output in seen], EXAMPLES)

    def described(e: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in e.items() if k not in ("original", "transformed")}

    assert [described(e) for e in chosen] == [described(e) for e in whole.examples]
    # Three fooled images chosen, from more than one shard: the merge had work to do.
    assert sum(e["fooled"] for e in chosen) == EXAMPLES
    assert sum(any(e in chosen for e in output.examples) for output in seen) >= 2
    assert whole.examples_dir is not None
    for e in whole.examples:
        assert caller.pngs[e["index"]] == _read(whole.examples_dir, e)
    assert _sandboxed_pythons() == {}


def test_each_shard_has_a_deadline_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = SandboxLimits(deadline_s=600, threads=1, memory_bytes=8 * 2**30)
    clock = _Clock()
    monkeypatch.setattr(sandbox._Driver, "clock", staticmethod(clock))

    def between(done: int) -> None:
        if done == 1:  # the caller took longer than a deadline between two shards: fine
            clock.offset += limits.deadline_s + 1
        if done == 2:  # the third shard runs past its deadline
            clock.jump_after_next = limits.deadline_s + 1

    caller = _Caller([range(0, 2)] * 3, between)
    model = small_cnn_file(tmp_path / "m.safetensors")
    with pytest.raises(SandboxFailure) as info:
        run_sandboxed_shards(_job(model, options=FAST), limits, caller)
    assert len(caller.seen) == 2
    assert info.value.kind == "deadline"
    assert "time limit of 10 min" in info.value.message
    assert _sandboxed_pythons() == {}


class _Clock:
    """time.monotonic moved by ``offset``; ``jump_after_next`` moves it after its next
    reading (the one a shard's deadline is computed from)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.jump_after_next = 0.0

    def __call__(self) -> float:
        now = time.monotonic() + self.offset
        self.offset += self.jump_after_next
        self.jump_after_next = 0.0
        return now


def test_a_stop_during_a_later_shard_kills_both(tmp_path: Path) -> None:
    model = small_cnn_file(tmp_path / "m.safetensors")
    # The first shard is one image; the second, every metric on 499, runs for minutes: the
    # stop comes during it.
    caller = _Caller([range(0, 1), range(1, 500)])
    ticks: list[int] = []
    running: dict[int, bytes] = {}

    def tick() -> bool:
        ticks.append(len(caller.seen))
        if not caller.seen:
            return False
        running.update(_sandboxed_pythons())
        return True

    with pytest.raises(SandboxStopped):
        run_sandboxed_shards(
            _job(model, limit=500), LIMITS, caller, tick=tick, tick_interval_s=0.05
        )
    assert len(caller.seen) == 1 and ticks[-1] == 1
    assert len(running) == 2
    assert _sandboxed_pythons() == {}
    assert not any(_alive(pid, cmdline) for pid, cmdline in running.items())


def test_a_failing_shard_raises_and_ends_the_session(tmp_path: Path) -> None:
    caller = _Caller([range(0, 2)])
    with pytest.raises(SandboxFailure) as info:
        run_sandboxed_shards(_job(export_file(tmp_path / "nan.pt2", "nan")), LIMITS, caller)
    assert info.value.kind == "model"
    assert "NaN or infinite logits" in info.value.message
    assert caller.seen == []
    assert _sandboxed_pythons() == {}


def test_a_callback_that_raises_kills_both_and_is_raised_again(trained_model: Path) -> None:
    folders: list[Path] = []

    def next_shard(output: ShardOutput | None) -> range | None:
        if output is None:
            return range(0, 4)
        assert output.examples_dir is not None
        folders.append(output.examples_dir)
        raise RuntimeError("the database went away")

    with pytest.raises(RuntimeError, match="the database went away"):
        run_sandboxed_shards(_job(trained_model, options=FAST, examples=2), LIMITS, next_shard)
    assert _sandboxed_pythons() == {}
    assert folders and not folders[0].exists()


def test_a_session_refuses_a_shard_in_the_options(tmp_path: Path) -> None:
    model = small_cnn_file(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="next_shard"):
        run_sandboxed_shards(_job(model, options={"shard": [0, 2]}), LIMITS, lambda _: None)
