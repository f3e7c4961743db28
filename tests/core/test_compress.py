"""Pruning and quantization: what they remove, what they keep, and where they refuse."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core.distill.compress import Float16Model, dequantize, prune, quantize, weight_sparsity
from core.distill.evaluate import latency_metrics, size_metrics
from core.errors import CompressionFailed, InvalidSpec


def mlp(width: int = 256, depth: int = 2, n_in: int = 64) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten()]
    features = n_in
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    model = nn.Sequential(*layers, nn.Linear(features, 10)).eval()
    model.distill_arch = {"name": "test_mlp", "config": {"width": width}}
    return model


class ResidualCNN(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width))
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(self.block(h) + h))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unstructured_pruning_leaves_the_requested_sparsity() -> None:
    model = mlp()
    original = copy.deepcopy(model)
    x = torch.randn(8, 1, 8, 8)
    pruned = prune(model, amount=0.7, structured=False, example_input=x)
    assert weight_sparsity(pruned) == pytest.approx(0.7, abs=1e-3)
    assert pruned.distill_compression["prune"]["sparsity"] == pytest.approx(0.7, abs=1e-3)
    # permanent: plain weights with real zeros, no masks or hooks left behind
    assert pruned.state_dict().keys() == model.state_dict().keys()
    assert not any(m._forward_pre_hooks for m in pruned.modules())
    assert pruned(x).shape == (8, 10)
    assert _same_weights(model, original)  # the input is untouched
    assert weight_sparsity(model) == 0.0
    assert pruned.distill_arch == model.distill_arch


def test_unstructured_pruning_is_global_magnitude() -> None:
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        model[1].weight.copy_(torch.tensor([[0.1, 0.2], [5.0, 6.0]]))
    pruned = prune(model, amount=0.25, structured=False, example_input=torch.zeros(1, 2))
    # the 2 smallest of all 8 weights, both in the second layer
    assert pruned[0].weight.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert pruned[1].weight.tolist() == [[0.0, 0.0], [5.0, 6.0]]


@pytest.mark.slow
def test_structured_pruning_removes_units_and_is_faster() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # timing on a shared machine: one thread each, same conditions
    try:
        model = mlp(width=1536, depth=3)
        x = torch.randn(64, 1, 8, 8)
        pruned = prune(model, amount=0.5, structured=True, example_input=x)
        linears = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
        assert [m.out_features for m in linears] == [768, 768, 768, 10]  # the head keeps 10
        before, after = size_metrics(model)["parameters"], size_metrics(pruned)["parameters"]
        assert after < 0.3 * before
        assert pruned.distill_compression["prune"]["parameters_after"] == after
        assert pruned(x).shape == model(x).shape == (64, 10)
        slow = latency_metrics(model, x, iters=300, max_seconds=1.5)["latency_ms_p50"]
        fast = latency_metrics(pruned, x, iters=300, max_seconds=1.5)["latency_ms_p50"]
        assert fast < 0.8 * slow, (fast, slow)
        assert linears[0].in_features == 64 and len(model[1].weight) == 1536  # input untouched
    finally:
        torch.set_num_threads(threads)


def test_structured_pruning_follows_residual_connections() -> None:
    model = ResidualCNN(width=32).eval()
    x = torch.randn(4, 1, 8, 8)
    pruned = prune(model, amount=0.5, structured=True, example_input=x)
    assert pruned.stem[0].out_channels == pruned.block[0].out_channels == 16  # coupled by the add
    assert pruned.stem[1].num_features == 16 and pruned.head[2].in_features == 16
    assert pruned(x).shape == (4, 10)
    assert size_metrics(pruned)["parameters"] < size_metrics(model)["parameters"] / 2


def test_pruning_refuses_bad_amounts_and_torchscript() -> None:
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(InvalidSpec, match="between 0 and 1"):
        prune(mlp(), amount=1.0, structured=False, example_input=x)
    with pytest.raises(CompressionFailed, match="TorchScript"):
        prune(torch.jit.script(mlp()), amount=0.5, structured=False, example_input=x)


def test_dynamic_int8_shrinks_an_mlp_about_four_times() -> None:
    model = mlp(width=512)
    original = copy.deepcopy(model)
    x = torch.randn(32, 1, 8, 8)
    q = quantize(model, "dynamic_int8")
    ratio = size_metrics(model)["size_bytes"] / size_metrics(q)["size_bytes"]
    assert 3.0 < ratio < 4.2
    assert size_metrics(q)["parameters"] == size_metrics(model)["parameters"]
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.9
    assert q.distill_compression == {"quantize": "dynamic_int8"}
    assert _same_weights(model, original)


def test_dynamic_int8_keeps_transformer_layers_running() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 32)
            layer = nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(x)).mean(1))

    model = Encoder().eval()
    x = torch.randn(4, 5, 6)
    q = quantize(model, "dynamic_int8", calibration=x)
    with torch.no_grad():
        assert (q(x) - model(x)).abs().max() < 0.1
    assert type(q.head).__module__.startswith("torch.ao.nn.quantized")


def test_fp16_halves_the_size_and_keeps_float32_io() -> None:
    model = mlp(width=512)
    x = torch.randn(16, 1, 8, 8)
    half = quantize(model, "fp16", calibration=x)
    assert isinstance(half, Float16Model)
    ratio = size_metrics(half)["size_bytes"] / size_metrics(model)["size_bytes"]
    assert 0.45 < ratio < 0.55
    with torch.no_grad():
        out = half(x)
        assert out.dtype == torch.float32
        assert (out - model(x)).abs().max() < 1e-2
    assert next(model.parameters()).dtype == torch.float32  # the input is untouched


@pytest.mark.slow  # the first FX quantization in a process takes a few seconds
def test_static_int8_with_calibration() -> None:
    model = ResidualCNN(width=64).eval()
    calibration = torch.randn(256, 1, 8, 8)
    q = quantize(model, "static_int8", calibration=calibration)
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert size_metrics(q)["size_bytes"] < size_metrics(model)["size_bytes"] / 3
    assert q.distill_compression == {"quantize": "static_int8"}


def test_static_int8_refuses_clearly() -> None:
    with pytest.raises(CompressionFailed, match="calibration"):
        quantize(mlp(), "static_int8")

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: FX cannot trace it
                return self.linear(x)
            return -self.linear(x)

    with pytest.raises(CompressionFailed, match="dynamic_int8"):
        quantize(Branchy(), "static_int8", calibration=torch.randn(8, 4))


def test_unknown_mode_and_none() -> None:
    with pytest.raises(InvalidSpec, match="dynamic_int8"):
        quantize(mlp(), "int4")
    model = mlp()
    same = quantize(model, "none")
    assert same is not model and _same_weights(same, model)


def test_dequantize_gives_the_int8_weights_back_as_float() -> None:
    model = mlp(width=128)
    q = quantize(model, "dynamic_int8")
    d = dequantize(q)
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.Flatten) for m in d.children())
    assert torch.equal(d[1].weight, q[1].weight().dequantize())
    assert (d[1].weight - model[1].weight).abs().max() < 0.01
    assert d.distill_arch == model.distill_arch and "quantize" not in d.distill_compression
