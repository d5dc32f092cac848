"""Fixtures shared by every test package."""

import pytest
import torch


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=_devices())
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every torch test runs on the CPU, and on the GPU too when one is present."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)
