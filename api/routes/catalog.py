"""``/api/v1/benchmarks``, ``/api/v1/architectures`` and ``/api/v1/me``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import CurrentUser, SessionDep, SettingsDep, base_url
from api.schemas import ArchitecturePublic, BenchmarkPublic, MePublic
from api.services.benchmarks import (
    architecture_public,
    benchmark_public,
    list_architectures,
    list_benchmarks,
)
from api.services.caps import limits, usage

router = APIRouter()


@router.get("/benchmarks", response_model=list[BenchmarkPublic], tags=["benchmarks"])
def benchmarks(request: Request, settings: SettingsDep) -> list[BenchmarkPublic]:
    """The benchmarks this server evaluates on, with the architectures that fit each."""
    url = base_url(request)
    return [benchmark_public(spec, url) for spec in list_benchmarks(settings)]


@router.get("/architectures", response_model=list[ArchitecturePublic], tags=["benchmarks"])
def architectures(settings: SettingsDep) -> list[ArchitecturePublic]:
    """The registry architectures a safetensors submission can name."""
    specs = list_benchmarks(settings)
    return [architecture_public(arch, specs) for arch in list_architectures()]


@router.get("/me", response_model=MePublic, tags=["users"])
def me(user: CurrentUser, session: SessionDep, settings: SettingsDep) -> MePublic:
    """Who the token belongs to, its limits and current usage."""
    daily, concurrent = limits(settings, user)
    used = usage(session, user)
    return MePublic(
        name=user.name,
        is_admin=user.is_admin,
        daily_limit=None if user.is_admin else daily,
        concurrent_limit=None if user.is_admin else concurrent,
        submissions_last_24h=used.last_24h,
        active_submissions=used.active,
    )
