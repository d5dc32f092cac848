"""The benchmarks this server runs (built-in plus the operator's file) and the architectures
that safetensors submissions can name."""

from __future__ import annotations

import functools
from pathlib import Path

from api.schemas import ArchitecturePublic, BenchmarkPublic
from api.urls import api_path
from config.settings import Settings
from evaluator.benchmarks import BenchmarkSpec, load_benchmark_file
from evaluator.benchmarks import get_benchmark as _get_benchmark
from evaluator.benchmarks import list_benchmarks as _list_benchmarks
from evaluator.models.registry import ARCHITECTURES, ArchitectureSpec

__all__ = [
    "architecture_public",
    "benchmark_public",
    "extra_benchmarks",
    "fits",
    "get_benchmark",
    "list_architectures",
    "list_benchmarks",
]


@functools.lru_cache(maxsize=8)
def _benchmarks_from_file(path: Path) -> dict[str, BenchmarkSpec]:
    return load_benchmark_file(path)


def extra_benchmarks(settings: Settings) -> dict[str, BenchmarkSpec]:
    """The operator's benchmarks (``settings.benchmarks_file``), each file read once per
    process."""
    if settings.benchmarks_file is None:
        return {}
    return _benchmarks_from_file(settings.benchmarks_file.resolve())


def list_benchmarks(settings: Settings) -> list[BenchmarkSpec]:
    return _list_benchmarks(extra_benchmarks(settings))


def get_benchmark(name: str, settings: Settings) -> BenchmarkSpec:
    """The benchmark called ``name``; the evaluator's ``UnknownBenchmarkError`` lists the rest."""
    return _get_benchmark(name, extra_benchmarks(settings))


def list_architectures() -> list[ArchitectureSpec]:
    return list(ARCHITECTURES.values())


def fits(arch: ArchitectureSpec, benchmark: BenchmarkSpec) -> bool:
    """Whether the benchmark's images have the architecture's input shape."""
    return (arch.in_channels, *arch.input_size) == (benchmark.channels, *benchmark.image_size)


def benchmark_public(spec: BenchmarkSpec, base_url: str = "") -> BenchmarkPublic:
    return BenchmarkPublic(
        **spec.to_dict(),
        architectures=[a.name for a in list_architectures() if fits(a, spec)],
        leaderboard_url=base_url + api_path(f"/leaderboard/{spec.name}"),
    )


def architecture_public(
    spec: ArchitectureSpec, benchmarks: list[BenchmarkSpec]
) -> ArchitecturePublic:
    return ArchitecturePublic(
        name=spec.name,
        description=spec.description,
        input_size=list(spec.input_size),
        in_channels=spec.in_channels,
        default_num_classes=spec.default_num_classes,
        benchmarks=[b.name for b in benchmarks if fits(spec, b)],
    )
