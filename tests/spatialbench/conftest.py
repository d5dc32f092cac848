"""Fixtures the product's commands share with the worker tests (a trained small CNN)."""

from tests.worker.conftest import trained_model  # noqa: F401  (fixture)
