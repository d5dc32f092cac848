"""Registry architectures: they build, give logits of the right shape, and have the sizes the
papers report."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluator.errors import UnknownArchitectureError
from evaluator.models import (
    ARCHITECTURES,
    get_architecture,
    list_architectures,
    small_cnn,
    wrn_28_k,
)

NATIVE = ["resnet32", "preact_resnet18", "wrn28_10", "small_cnn"]

_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _logits(
    model: nn.Module, size: tuple[int, int], device: torch.device, n: int = 2
) -> torch.Tensor:
    model = model.to(device).eval()
    with torch.no_grad():
        return model(torch.rand(n, 3, *size, device=device))


@pytest.mark.parametrize("name", ["resnet32", "preact_resnet18", "small_cnn"])
def test_native_architecture_gives_logits_on_its_input_size(
    name: str, device: torch.device
) -> None:
    spec = get_architecture(name)
    out = _logits(spec.build(), spec.input_size, device)
    assert out.shape == (2, spec.default_num_classes)


@pytest.mark.parametrize("name", NATIVE)
def test_native_architecture_honours_num_classes(name: str) -> None:
    with torch.device("meta"):  # shapes only; wrn28_10 would otherwise allocate 146 MB
        model = get_architecture(name).build(num_classes=7)
    out = model(torch.empty(2, 3, 32, 32, device="meta"))
    assert out.shape == (2, 7)


def test_thin_wide_resnet_gives_logits(device: torch.device) -> None:
    out = _logits(wrn_28_k(num_classes=5, widen_factor=1), (32, 32), device)
    assert out.shape == (2, 5)


def test_wrn28_10_has_the_papers_parameter_count() -> None:
    with torch.device("meta"):
        model = get_architecture("wrn28_10").build()
    assert _n_params(model) == 36_479_194


def test_resnet32_is_he_et_al_with_projection_shortcuts() -> None:
    # 464,154 with option-A shortcuts, plus two 1x1 conv + BN projections (576 + 2,176).
    assert _n_params(get_architecture("resnet32").build()) == 464_154 + 576 + 2_176


def test_resnet32_has_three_stages_of_five_blocks() -> None:
    model = get_architecture("resnet32").build()
    stages = [model.get_submodule(f"layer{i}") for i in (1, 2, 3)]
    assert [len(list(stage.children())) for stage in stages] == [5, 5, 5]


def test_small_cnn_is_small() -> None:
    assert _n_params(small_cnn()) <= 100_000


def test_torchvision_resnet18_gives_logits(device: torch.device) -> None:
    spec = get_architecture("torchvision/resnet18")
    out = _logits(spec.build(), (64, 64), device)
    assert out.shape == (2, 1000)


def test_torchvision_model_honours_num_classes() -> None:
    out = _logits(
        get_architecture("torchvision/resnet18").build(num_classes=3), (64, 64), torch.device("cpu")
    )
    assert out.shape == (2, 3)


def test_torchvision_googlenet_builds_without_auxiliary_heads() -> None:
    model = get_architecture("torchvision/googlenet").build()
    assert model.aux1 is None and model.aux2 is None


def test_torchvision_models_are_registered_by_name() -> None:
    spec = ARCHITECTURES["torchvision/resnet50"]
    assert (spec.input_size, spec.in_channels, spec.default_num_classes) == ((224, 224), 3, 1000)


def test_registry_holds_only_classifiers_from_torchvision() -> None:
    assert "torchvision/fasterrcnn_resnet50_fpn" not in ARCHITECTURES


def test_list_architectures_starts_with_the_native_ones() -> None:
    assert list_architectures()[: len(NATIVE)] == NATIVE


def test_unknown_architecture_lists_known_names() -> None:
    with pytest.raises(UnknownArchitectureError) as info:
        get_architecture("resnet-32")
    assert all(name in str(info.value) for name in NATIVE + ["torchvision/resnet50"])


def test_unknown_architecture_suggests_the_torchvision_name() -> None:
    with pytest.raises(UnknownArchitectureError, match="Did you mean 'torchvision/resnet50'"):
        get_architecture("resnet50")


@pytest.mark.parametrize("module", ["registry", "loading", "architectures", "pt2"])
def test_each_models_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """Modules import the module they need, not the package, so any of them can come first."""
    done = subprocess.run(
        [sys.executable, "-c", f"import evaluator.models.{module}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_the_public_names_stay_importable_from_the_package() -> None:
    import evaluator.models as models
    from evaluator.models import loading, registry

    assert all(hasattr(models, name) for name in models.__all__)
    assert models.get_architecture is registry.get_architecture
    assert models.load_model is loading.load_model


@pytest.fixture
def one_thread() -> Iterator[None]:
    # One intra-op thread: the result is then reproducible, and on a shared CPU two OpenMP
    # threads can spin-wait each other into a run ten times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_small_cnn_learns_digits_in_a_few_seconds(one_thread: None) -> None:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x))
    train, test = order[:1400], order[1400:]
    model = small_cnn()
    epochs, batch_size = 4, 64
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps = epochs * -(-len(train) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    for _ in range(epochs):
        shuffled = train[torch.randperm(len(train))]
        for batch in shuffled.split(batch_size):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert accuracy > 0.95
