"""The native int8 kernel (nanogpt_cli/kernels/int8_linear.c): built with the machine's compiler, equal to the
formula on every instruction path and shape, reused from the cache, and replaced by torch's kernel where it
cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from nanogpt_cli import native, precision
from nanogpt_cli.precision import Int8Linear

HAVE_CC = shutil.which(os.environ.get("CC") or "cc") is not None
needs_cc = pytest.mark.skipif(not HAVE_CC and not os.environ.get("CI"), reason="no C compiler")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


FLAGS = cpu_flags()
# (extra compiler flags, the path that build must take): -march=native's own, then the paths below it on x86
PATHS = [((), "avx512" if "avx512f" in FLAGS else "avx2" if {"avx2", "fma"} <= FLAGS else "generic")]
if "avx512f" in FLAGS and {"avx2", "fma"} <= FLAGS:
    PATHS.append((("-mno-avx512f",), "avx2"))
if "avx2" in FLAGS:
    PATHS.append((("-mno-avx512f", "-mno-avx2", "-mno-fma"), "generic"))


def reference(x, weight, scales, bias):
    y = x.double() @ (weight.double() * scales.double()[:, None]).T
    return y if bias is None else y + bias.double()


@needs_cc
@pytest.mark.parametrize("extra, path", PATHS, ids=[p for _, p in PATHS])
def test_the_kernel_equals_the_formula_on_every_path_and_shape(tmp_path, extra, path):
    kernel = native.build(extra, folder=tmp_path)
    assert kernel.path == path
    torch.manual_seed(0)
    for rows, out_features, in_features in [(1, 1, 1), (1, 3, 15), (2, 67, 16), (1, 5, 17), (3, 4, 63), (1, 9, 64),
                                            (5, 2, 65), (1, 33, 100), (2, 130, 768), (1, 8, 3072 + 40)]:
        for has_bias in (False, True):
            weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
            scales = torch.rand(out_features) + 0.01
            bias = torch.randn(out_features) if has_bias else None
            x = torch.randn(rows, in_features)
            out = torch.full((rows, out_features), float("nan"))
            kernel(x, weight, scales, bias, out, threads=2)
            expected = reference(x, weight, scales, bias)
            scale = expected.abs().max().item() + 1.0
            assert (out.double() - expected).abs().max().item() <= 1e-5 * scale, (rows, out_features, in_features)


@needs_cc
def test_a_built_library_is_reused_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    first = native.build(folder=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.library.name]

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.build(folder=tmp_path).library == first.library
    monkeypatch.undo()
    other = tmp_path / "other"
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    with pytest.raises(subprocess.CalledProcessError):
        native.build(folder=other)
    assert list(other.iterdir()) == []  # no library, no temporary folder
    assert native.library_path(("-mno-fma",), tmp_path) != first.library  # other flags: another library


@pytest.mark.parametrize("setting, why", [({"CC": "/nonexistent/cc"}, "no C compiler"),
                                          ({"CC": "false"}, "the C compiler failed"),
                                          ({"NGPT_NATIVE": "0"}, "NGPT_NATIVE=0")])
def test_without_the_kernel_int8_runs_through_torchs(tmp_path, monkeypatch, setting, why):
    monkeypatch.setenv("NGPT_CACHE_DIR", str(tmp_path))
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    native._int8_kernel.cache_clear()
    try:
        assert native.int8_kernel() is None
        assert native.int8_kernel_status().startswith(f"torch's _weight_int8pack_mm ({why}")
        torch.manual_seed(0)
        linear = Int8Linear.from_linear(torch.nn.Linear(64, 32))
        x = torch.randn(1, 1, 64)
        torchs = torch.ops.aten._weight_int8pack_mm(x.reshape(1, 64).bfloat16(), linear.weight, linear.scales)
        expected = torchs.float().view(1, 1, 32) + linear.bias
        assert torch.equal(linear(x), expected) and torch.equal(linear.bound_forward()(x), expected)
    finally:
        native._int8_kernel.cache_clear()


@needs_cc
def test_int8_linear_takes_the_kernel_for_float32_rows_and_torchs_for_the_rest(monkeypatch):
    kernel = native.int8_kernel()
    assert kernel is not None, native.int8_kernel_status()
    calls = []
    monkeypatch.setattr(native, "int8_kernel", lambda: (calls.append(1), kernel)[1])
    torch.manual_seed(0)
    linear = Int8Linear.from_linear(torch.nn.Linear(96, 40))
    bound = linear.bound_forward()
    for rows in (1, 3, precision.NATIVE_MAX_ROWS):
        x = torch.randn(rows, 1, 96)
        expected = reference(x.view(rows, 96), linear.weight, linear.scales.float(), linear.bias).view(rows, 1, 40)
        for forward in (linear, bound):
            got = forward(x)
            assert got.dtype == torch.float32 and got.shape == (rows, 1, 40)
            assert (got.double() - expected).abs().max().item() < 1e-5  # float32 products, not bf16's 1e-2
    assert calls  # the module's forward asked for the kernel
    x = torch.randn(precision.NATIVE_MAX_ROWS + 1, 96)  # a prefill: torch's kernel, bf16 activations
    torchs = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), linear.weight, linear.scales).float() + linear.bias
    assert torch.equal(linear(x), torchs) and torch.equal(bound(x), torchs)
    unbiased = Int8Linear.from_linear(torch.nn.Linear(96, 40, bias=False))
    assert unbiased(x[:1].bfloat16()).dtype == torch.bfloat16  # other dtypes: torch's kernel, cast back
    x = torch.randn(2, 96, requires_grad=True)
    assert linear(x).requires_grad  # recorded by autograd: torch's kernel, which it can differentiate through


@needs_cc
def test_the_scales_follow_a_load_into_the_module(monkeypatch):
    torch.manual_seed(0)
    linear = Int8Linear.from_linear(torch.nn.Linear(64, 16))
    x = torch.randn(1, 64)
    before = linear(x)
    with torch.no_grad():
        linear.scales.mul_(2)  # in place, as load_state_dict copies
    assert torch.allclose(linear(x) - linear.bias, 2 * (before - linear.bias), atol=1e-5)


def quantize_formula(weight):
    """precision.quantize_rows' formula on the whole matrix at once, in torch's ops."""
    scales = weight.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


@needs_cc
@pytest.mark.parametrize("extra, path", PATHS, ids=[p for _, p in PATHS])
def test_the_native_quantization_is_the_formula_bit_for_bit(tmp_path, extra, path):
    kernel = native.build(extra, folder=tmp_path)
    torch.manual_seed(0)
    weight = torch.randn(50, 77) * torch.logspace(-30, 3, 50)[:, None]  # tiny rows to large ones
    weight[3] = 0  # an all-zero row: scale 1
    weight[7, :] = torch.arange(77) - 38.5  # halves of a scale: ties, rounded to even
    weight[7, 0] = 127.0  # its largest |w|: scale 1 exactly
    weight[9, :] = 1e-42  # subnormal
    quantized, scales = torch.empty(50, 77, dtype=torch.int8), torch.empty(50)
    kernel.quantize(weight, quantized, scales, threads=2)
    expected, expected_scales = quantize_formula(weight)
    assert torch.equal(scales, expected_scales) and torch.equal(quantized, expected)


@needs_cc
def test_quantize_rows_takes_the_kernel_for_contiguous_float32_and_gives_the_same_bytes(monkeypatch):
    assert native.int8_kernel() is not None, native.int8_kernel_status()
    torch.manual_seed(0)
    weight = torch.randn(300, 96)
    native_result = precision.quantize_rows(weight)
    monkeypatch.setenv("NGPT_NATIVE", "0")
    native._int8_kernel.cache_clear()
    try:
        torch_result = precision.quantize_rows(weight)
    finally:
        monkeypatch.undo()
        native._int8_kernel.cache_clear()
    assert all(torch.equal(a, b) for a, b in zip(native_result, torch_result, strict=True))
