"""The native kernels (nanogpt_cli/kernels/int8_linear.c: int8 weights, and float32 products of a few rows):
built with the machine's compiler, equal to the formula on every instruction path and shape, reused from the
cache, and replaced by torch's kernel where it cannot be built."""

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


@pytest.fixture(params=PATHS, ids=[p for _, p in PATHS])
def kernel(request, tmp_path):
    """The kernel built for each instruction path this CPU has, checked to have taken it."""
    extra, path = request.param
    kernel = native.build(extra, folder=tmp_path)
    assert kernel.path == path
    return kernel


def reference(x, weight, scales, bias):
    y = x.double() @ (weight.double() * scales.double()[:, None]).T
    return y if bias is None else y + bias.double()


@needs_cc
def test_the_kernel_equals_the_formula_on_every_path_and_shape(kernel):
    torch.manual_seed(0)
    for rows, out_features, in_features in [(1, 1, 1), (1, 3, 15), (2, 67, 16), (1, 5, 17), (3, 4, 63), (1, 9, 64),
                                            (5, 2, 65), (1, 33, 100), (2, 130, 768), (1, 8, 3072 + 40)]:
        for has_bias in (False, True):
            weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
            scales = torch.rand(out_features) + 0.01
            bias = torch.randn(out_features) if has_bias else None
            x = torch.randn(rows, in_features)
            out = torch.full((rows, out_features), float("nan"))
            kernel(x, weight, scales, bias, out, rows, threads=2)
            expected = reference(x, weight, scales, bias)
            scale = expected.abs().max().item() + 1.0
            assert (out.double() - expected).abs().max().item() <= 1e-5 * scale, (rows, out_features, in_features)
            residual, summed = torch.randn(rows, out_features), torch.full((rows, out_features), float("nan"))
            kernel(x, weight, scales, bias, summed, rows, threads=2, residual=residual)
            assert torch.equal(summed, residual + out)  # the sum rounded as the add after the product would be


@needs_cc
def test_the_float32_kernel_equals_the_product_on_every_path_and_shape(kernel):
    torch.manual_seed(0)
    # every tile shape (3 channels by 4 rows and their remainders) and every tail of a vector's length
    for rows, out_features, in_features in [(1, 1, 1), (2, 3, 15), (4, 67, 16), (3, 5, 17), (5, 4, 63), (8, 9, 64),
                                            (7, 2, 65), (16, 33, 100), (6, 130, 768), (2, 8, 3072 + 40)]:
        for has_bias in (False, True):
            weight = torch.randn(out_features, in_features)
            bias = torch.randn(out_features) if has_bias else None
            x = torch.randn(rows, in_features)
            out = torch.full((rows, out_features), float("nan"))
            kernel.float_linear(x, weight, bias, out, rows, threads=2)
            expected = x.double() @ weight.double().T + (0 if bias is None else bias.double())
            scale = expected.abs().max().item() + 1.0
            assert (out.double() - expected).abs().max().item() <= 1e-5 * scale, (rows, out_features, in_features)


@needs_cc
@pytest.mark.parametrize("cls, path", [("OneDNNLinear", "avx2"), ("RowsLinear", "avx512")])
def test_a_batch_of_a_few_float32_rows_takes_the_native_kernel_and_nothing_else(monkeypatch, cls, path):
    kernel = native.int8_kernel()
    assert kernel is not None, native.int8_kernel_status()
    calls = []

    class Counting:
        def float_linear(self, *args):
            calls.append(args[4])  # rows
            kernel.float_linear(*args)

    # the build whose few rows take it on the Linear's route (`precision.float_rows_native`): oneDNN's with AVX2,
    # MKL's with AVX512; the kernel itself runs on any path
    Counting.path = path
    monkeypatch.setattr(native, "int8_kernel", lambda: Counting())
    torch.manual_seed(0)
    linear = precision.retype_linears(torch.nn.Linear(96, 40), getattr(precision, cls))
    with torch.inference_mode():
        for shape in [(2, 1, 96), (precision.NATIVE_MAX_ROWS, 96), (3, 2, 96)]:  # decoding steps of 2-16 rows
            x = torch.randn(shape)
            got, bound = linear(x), linear.bound_forward()(x)
            torch.testing.assert_close(got, torch.nn.functional.linear(x, linear.weight, linear.bias))
            assert torch.equal(bound, got) and got.shape == (*shape[:-1], 40)
        assert calls == [2, 2, 16, 16, 6, 6]
        # one row (the route's own matrix-vector product, measured at the bandwidth) and a prefill (its GEMM)
        for x in [torch.randn(1, 1, 96), torch.randn(precision.NATIVE_MAX_ROWS + 1, 96)]:
            torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(torch.randn(4, 96)).dtype is torch.bfloat16  # autocast: torch's, which casts
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            assert linear(torch.randn(4, 96)).shape == (4, 40)  # being compiled: torch's (no graph break)
        halved = precision.retype_linears(torch.nn.Linear(96, 40, bias=False), getattr(precision, cls))
        halved.to(torch.bfloat16)
        with pytest.raises(RuntimeError):  # float32 rows against bf16 weights: torch's own error, not the kernel
            halved(torch.randn(4, 96))
    x = torch.randn(4, 96, requires_grad=True)
    y = linear(x)
    assert y.requires_grad  # autograd recording: F.linear, which has a backward
    y.sum().backward()
    assert x.grad is not None
    precision.transposed_storage(linear)
    with torch.inference_mode():
        linear(torch.randn(4, 96))  # weights stored (in, out): the route's own product
    assert calls == [2, 2, 16, 16, 6, 6]


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


def torch_quantize_rows(weight, monkeypatch):
    """precision.quantize_rows by torch's ops alone (no native kernel)."""
    with monkeypatch.context() as m:
        m.setenv("NGPT_NATIVE", "0")
        native._int8_kernel.cache_clear()
        try:
            return precision.quantize_rows(weight)
        finally:
            native._int8_kernel.cache_clear()


@needs_cc
def test_the_native_quantization_is_the_formula_bit_for_bit(monkeypatch, kernel):
    torch.manual_seed(0)
    weight = torch.randn(50, 77) * torch.logspace(-30, 3, 50)[:, None]  # tiny rows to large ones
    weight[3] = 0  # an all-zero row: scale 1
    weight[7, :] = torch.arange(77) - 38.5  # halves of a scale: ties, rounded to even
    weight[7, 0] = 127.0  # its largest |w|: scale 1 exactly
    weight[9, :] = 1e-42  # subnormal
    weight[11, 5] = -0.0
    weight[13, 2] = float("inf")  # a scale of inf: inf / inf is NaN, cast to 0
    weight[15, 40] = float("nan")  # a NaN scale and zeros, as torch's ops give
    weight[17, :] = float("nan")
    quantized, scales = torch.empty(50, 77, dtype=torch.int8), torch.empty(50)
    kernel.quantize(weight, quantized, scales, threads=2)
    expected, expected_scales = torch_quantize_rows(weight, monkeypatch)
    assert torch.equal(scales.to(torch.bfloat16).view(torch.int16), expected_scales.view(torch.int16))  # NaN too
    assert torch.equal(quantized, expected)


@needs_cc
def test_quantize_rows_takes_the_kernel_for_contiguous_float32_and_gives_the_same_bytes(monkeypatch):
    assert native.int8_kernel() is not None, native.int8_kernel_status()
    torch.manual_seed(0)
    weight = torch.randn(300, 96)
    native_result = precision.quantize_rows(weight)
    torch_result = torch_quantize_rows(weight, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(native_result, torch_result, strict=True))


@needs_cc
def test_inputs_the_kernel_cannot_take_go_to_torchs_kernel_and_its_errors():
    torch.manual_seed(0)
    linear = Int8Linear.from_linear(torch.nn.Linear(96, 40))
    for forward in (linear, linear.bound_forward()):
        for x in (torch.randn(1, 32), torch.randn(2, 200), torch.randn(3, 50)):  # rows that do not fit its inputs
            with pytest.raises(RuntimeError):
                forward(x)
        x = torch.randn(4, 96)[:, ::2].repeat(1, 2)  # strided rows are made contiguous first
        assert torch.allclose(forward(x), reference(x, linear.weight, linear.scales.float(), linear.bias).float(),
                              atol=1e-5)


@needs_cc
def test_a_bound_forward_follows_the_modules_tensors():
    torch.manual_seed(0)
    linear = Int8Linear.from_linear(torch.nn.Linear(64, 16))
    bound, x = linear.bound_forward(), torch.randn(1, 64)
    before = bound(x) - linear.bias
    with torch.no_grad():
        linear.scales.mul_(2)  # in place, as load_state_dict copies
    assert torch.allclose(bound(x) - linear.bias, 2 * before, atol=1e-5)
    assert torch.allclose(linear(x) - linear.bias, 2 * before, atol=1e-5)
    linear.weight.data = -linear.weight.data.clone()  # other storage: the old one may be freed
    linear.bias.data = torch.zeros(16)
    assert torch.allclose(bound(x), -2 * before, atol=1e-5)
    with torch.inference_mode():  # scales made under inference mode have no version: made again at every call
        quantized = Int8Linear.from_linear(torch.nn.Linear(64, 16))
        value = quantized(x)
        quantized.scales.mul_(4)  # exact in bf16
        assert torch.allclose(quantized(x) - quantized.bias, 4 * (value - quantized.bias), atol=1e-5)


@needs_cc
def test_a_bound_forward_checks_the_weights_once_and_adds_the_residual_in_the_kernel(monkeypatch):
    torch.manual_seed(0)
    linear = Int8Linear.from_linear(torch.nn.Linear(64, 16))
    bound, x, residual = linear.bound_forward(), torch.randn(3, 1, 64), torch.randn(3, 1, 16)
    with torch.inference_mode():
        product = linear(x)
        monkeypatch.setattr(precision, "int8_linear", lambda *a: pytest.fail("the checked path was not taken"))
        assert torch.equal(bound(x), product)
        assert torch.equal(bound(x, residual), residual + product)  # as the block's add would round it
        assert torch.equal(linear.bound_residual_forward()(x, residual), residual + product)
        monkeypatch.undo()
        # what the kernel does not take goes through int8_linear: a residual of another shape (broadcast), a prefill
        assert torch.equal(bound(x, residual.view(1, 3, 16)), residual.view(1, 3, 16) + product)
        prefill = torch.randn(precision.NATIVE_MAX_ROWS + 1, 64)
        assert torch.equal(bound(prefill), linear(prefill))
    with torch.no_grad():
        linear.scales.mul_(2)  # a new version: the scales made again
        assert torch.allclose(bound(x) - linear.bias, 2 * (product - linear.bias), atol=1e-5)
        linear.weight.data = -linear.weight.data.clone()  # other storage: the checked path is left
        assert torch.allclose(bound(x) - linear.bias, -2 * (product - linear.bias), atol=1e-5)


@needs_cc
def test_anything_but_this_users_own_library_at_its_name_is_built_again(tmp_path):
    library = native.library_path(folder=tmp_path)
    tmp_path.mkdir(exist_ok=True)
    elsewhere = tmp_path / "elsewhere.so"
    elsewhere.write_bytes(b"not a library")
    library.symlink_to(elsewhere)  # a planted link: replaced, its target left alone
    kernel = native.build(folder=tmp_path)
    assert not library.is_symlink() and elsewhere.read_bytes() == b"not a library" and kernel.path
    broken = native.library_path(folder=tmp_path / "broken")
    broken.parent.mkdir()
    broken.write_bytes(b"truncated")  # a broken library (never loaded): built again
    assert native.build(folder=broken.parent).path == kernel.path and broken.stat().st_size > 1000
    library.chmod(0o777)  # writable by others: built again
    native.build(folder=tmp_path)
    assert library.stat().st_mode & 0o022 == 0


def attention_reference(q, k, v, counts):
    mask = None if counts is None else (torch.arange(k.size(2))[None, :] < counts[:, None])[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)


@needs_cc
def test_the_attention_kernel_equals_torchs_on_every_path_and_shape(kernel):
    torch.manual_seed(0)
    # every tail of a vector's length in the head size and the keys, one key, and past the stack's 4096 scores
    for rows, heads, keys, hs in [(1, 1, 1, 1), (2, 3, 5, 7), (1, 12, 17, 64), (3, 2, 33, 16), (2, 4, 100, 65),
                                  (1, 2, 4100, 24), (4, 1, 9, 128)]:
        positions = keys + 3  # the cache holds more positions than are read
        qkv = torch.randn(rows, 3, heads, hs) * 2  # q as the step has it: a view into c_attn's output
        q = qkv[:, 0, :, None]
        cache = torch.randn(2, rows, heads, positions, hs)
        k, v = cache[0, :, :, :keys], cache[1, :, :, :keys]
        for counts in (None, torch.randint(1, keys + 1, (rows,))):
            out = torch.full((rows, heads, 1, hs), float("nan"))
            kernel.attention(q, k, v, out, counts, threads=2)
            error = (out.double() - attention_reference(q, k, v, counts)).abs().max().item()
            assert error <= 2e-6, (rows, heads, keys, hs, counts)
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 3, 8)
    k[0, 1, 2, 0] = float("nan")  # a NaN score reaches its head's output, as in torch's
    out = torch.empty(1, 2, 1, 8)
    kernel.attention(q, k, k, out, None, threads=2)
    assert out[0, 0].isfinite().all() and out[0, 1].isnan().all()
    kernel.attention(q, k, k, out, torch.tensor([0]), threads=2)  # no key to see: NaN, as torch's softmax
    assert out.isnan().all()


@needs_cc
def test_the_activations_equal_torchs_and_run_bit_for_bit_in_the_products_pass(kernel):
    torch.manual_seed(0)
    for n in (1, 7, 8, 17, 40, 3072, 3072 + 5):
        x = torch.randn(n) * 4
        gelu, relu2 = torch.empty(n), torch.empty(n)
        kernel.activation("gelu_new", x, gelu)
        kernel.activation("relu2", x, relu2)
        exact = torch.nn.functional.gelu(x.double(), approximate="tanh")
        assert ((gelu.double() - exact).abs() <= 1e-6 * exact.abs().clamp(min=1)).all(), n
        assert torch.equal(relu2, torch.relu(x).square())
        for shift in range(1, min(n, 16)):  # each value's result whether it falls in a vector or in the tail
            shifted = torch.empty(n - shift)
            kernel.activation("gelu_new", x[shift:].contiguous(), shifted)
            assert torch.equal(shifted, gelu[shift:]), (n, shift)
    special = torch.tensor([float("nan"), float("inf"), 0.0, -0.0, 100.0, -100.0, 1e-30, -1e-30, 9.0, -9.0,
                            -float("inf"), -1e30, -3e38, -60.0] * 2)  # -inf's GELU NaN, the others' -0, as torch's
    for name, torchs in (("gelu_new", torch.nn.functional.gelu(special, approximate="tanh")),
                         ("relu2", torch.relu(special).square())):
        out = torch.empty_like(special)
        kernel.activation(name, special, out)
        torch.testing.assert_close(out, torchs, equal_nan=True, atol=1e-7, rtol=1e-6)
        assert torch.equal(out[10:14].isnan(), torchs[10:14].isnan()) and (out[11:14].abs() < 1e-30).all()
    for rows, out_features, in_features in [(1, 3, 15), (2, 67, 16), (1, 200, 64), (3, 3072 + 3, 24)]:
        weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
        scales, bias, x = torch.rand(out_features) + 0.01, torch.randn(out_features), torch.randn(rows, in_features)
        for name in native.ACTIVATIONS:
            product, fused, separate = (torch.empty(rows, out_features) for _ in range(3))
            kernel(x, weight, scales, bias, product, rows, threads=2)
            kernel.activation(name, product, separate)
            kernel(x, weight, scales, bias, fused, rows, threads=2, activation=name)
            assert torch.equal(fused, separate), (name, rows, out_features)  # wherever a value falls in a vector


@needs_cc
def test_a_decoding_steps_attention_and_activation_take_the_kernel_and_the_rest_torchs(monkeypatch):
    from nanogpt_cli import ops

    kernel = native.int8_kernel()
    assert kernel is not None, native.int8_kernel_status()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    counts = torch.tensor([4, 9])
    mask = (torch.arange(9)[None, :] < counts[:, None])[:, None, None, :]
    x = torch.randn(2, 1, 96)
    with torch.no_grad():
        native_attention = ops.one_query_attention(q, k, v)
        torch.testing.assert_close(native_attention, sdpa(q, k, v), atol=2e-6, rtol=0)
        torch.testing.assert_close(ops.one_query_attention(q, k, v, mask, counts), sdpa(q, k, v, attn_mask=mask),
                                   atol=2e-6, rtol=0)
        caches = torch.stack([torch.stack([k, v])] * 2)  # (layers, 2, B, nh, positions, hs)
        assert torch.equal(ops.bound_attention(caches)(q[:, :, 0], caches[1], 9), native_attention)  # bit for bit
        qkv = torch.randn(2, 3, 3, 16)  # c_attn's output: the step's keys and values written by the kernel
        written, expected = caches.clone(), caches.clone()
        expected[1, :, :, :, 6] = qkv[:, 1:].transpose(0, 1)
        got = ops.bound_attention(written)(qkv, written[1], 7)
        assert torch.equal(written, expected)
        assert torch.equal(got, ops.one_query_attention(qkv[:, 0, :, None], expected[1, 0, :, :, :7],
                                                        expected[1, 1, :, :, :7]))
        native_gelu = ops.activation(x, "gelu_new")
        torch.testing.assert_close(native_gelu, torch.nn.functional.gelu(x, approximate="tanh"), atol=1e-6, rtol=0)
        torch.set_default_dtype(torch.float64)  # the kernels' outputs are float32 whatever the default
        try:
            assert torch.equal(ops.one_query_attention(q, k, v), native_attention)
            assert torch.equal(ops.bound_attention(caches)(q[:, :, 0], caches[1], 9), native_attention)
            assert torch.equal(ops.activation(x, "gelu_new"), native_gelu)
        finally:
            torch.set_default_dtype(torch.float32)
        monkeypatch.setattr(native.Int8Kernel, "attention", lambda *a: pytest.fail("the kernel was called"))
        monkeypatch.setattr(native.Int8Kernel, "activation", lambda *a: pytest.fail("the kernel was called"))
        # torch's: a mask with no counts, another dtype, several queries, a prefill's many values, the exact GELU
        assert torch.equal(ops.one_query_attention(q, k, v, mask), sdpa(q, k, v, attn_mask=mask))
        assert torch.equal(ops.one_query_attention(q.double(), k.double(), v.double()),
                           sdpa(q.double(), k.double(), v.double()))
        assert torch.equal(ops.one_query_attention(k, k, v), sdpa(k, k, v))
        big = torch.randn(ops.NATIVE_VALUES + 1)
        assert torch.equal(ops.activation(big, "gelu_new"), torch.nn.functional.gelu(big, approximate="tanh"))
        assert torch.equal(ops.activation(x, "gelu"), torch.nn.functional.gelu(x))
        assert torch.equal(ops.activation(x.bfloat16(), "relu2"), torch.relu(x.bfloat16()).square())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: torch's bf16 attention
        assert ops.one_query_attention(q, k, v).dtype is torch.bfloat16
        assert ops.bound_attention(caches)(q[:, :, 0], caches[1], 9).dtype is torch.bfloat16
    learning = x.clone().requires_grad_()  # autograd recording (training): torch's, with its backward
    ops.activation(learning, "gelu_new").sum().backward()
    assert learning.grad is not None
    q.requires_grad_()
    assert torch.equal(ops.one_query_attention(q, k, v), sdpa(q, k, v))
    monkeypatch.setattr(native, "int8_kernel", lambda: None)  # no compiler: torch's
    with torch.no_grad():
        assert torch.equal(ops.one_query_attention(q, k, v), sdpa(q, k, v))
        assert torch.equal(ops.activation(x, "gelu_new"), torch.nn.functional.gelu(x, approximate="tanh"))
        assert torch.equal(ops.bound_attention(caches)(q[:, :, 0], caches[1], 9), sdpa(q, k, v))
        written = caches.clone()
        assert torch.equal(ops.bound_attention(written)(qkv, written[1], 7),
                           sdpa(qkv[:, 0, :, None], expected[1, 0, :, :, :7], expected[1, 1, :, :, :7]))
        assert torch.equal(written, expected)


@needs_cc
def test_an_int8_c_fc_computes_its_activation_in_the_kernels_pass(monkeypatch):
    from nanogpt_cli import ops
    from nanogpt_cli.model import Activation, bound_fused

    torch.manual_seed(0)
    linear = Int8Linear.from_linear(torch.nn.Linear(64, 256))
    x = torch.randn(2, 1, 64)
    with torch.inference_mode():
        for name in ("gelu_new", "relu2", "gelu"):
            act = Activation(name)
            expected = act(linear(x))  # the forward's two calls
            fused = bound_fused(linear, None, act)
            if name in native.ACTIVATIONS:
                monkeypatch.setattr(ops, "activation", lambda *a: pytest.fail("activated outside the kernel"))
            assert torch.equal(fused(x), expected), name
            monkeypatch.undo()
        monkeypatch.setattr(ops, "NATIVE_VALUES", 300)  # more values than the standalone activation takes
        for rows in (1, 2):  # 256 values: in the kernel's pass; 512: ops.activation's torch kernel, as the forward's
            x = torch.randn(rows, 1, 64)
            assert torch.equal(bound_fused(linear, None, Activation("gelu_new"))(x), Activation("gelu_new")(linear(x)))
        monkeypatch.undo()
        prefill = torch.randn(precision.NATIVE_MAX_ROWS + 1, 64)  # rows the kernel does not take: the two calls
        assert torch.equal(bound_fused(linear, None, Activation("gelu_new"))(prefill),
                           Activation("gelu_new")(linear(prefill)))


def norm_reference(x, kind, weight, bias, eps):
    x = x.double()
    centred = x - x.mean(-1, keepdim=True) if kind == "layer_norm" else x
    y = centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    y = y if weight is None else y * weight.double()
    return y if bias is None else y + bias.double()


@needs_cc
def test_the_norms_equal_torchs_and_run_bit_for_bit_before_the_product(kernel):
    torch.manual_seed(0)
    # every tail of the four vectors a pass sums, a row far from zero (the variance of its spread), many rows
    for rows, n, offset in [(1, 1, 0.0), (1, 7, 0.0), (2, 17, 0.0), (1, 64, 0.0), (3, 100, 0.0), (1, 768, 0.0),
                            (2, 768, 300.0), (9, 3072 + 5, 0.0)]:
        x = torch.randn(rows, n) * 3 + offset
        for kind, weight, bias, eps in (("layer_norm", torch.randn(n), torch.randn(n), 1e-5),
                                        ("layer_norm", torch.randn(n), None, 1e-5),
                                        ("rms_norm", torch.randn(n), None, 1e-6), ("rms_norm", None, None, 1e-6)):
            out = torch.full((rows, n), float("nan"))
            kernel.norm(kind, x, weight, bias, out, eps)
            expected = norm_reference(x, kind, weight, bias, eps)
            assert (out.double() - expected).abs().max().item() <= 2e-5 * (1 + expected.abs().max().item()), (
                kind, rows, n)
    for rows, out_features, in_features in [(1, 3, 15), (2, 67, 16), (1, 200, 768), (8, 5, 768)]:  # 8 x 768: malloc
        weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
        scales, bias, x = torch.rand(out_features) + 0.01, torch.randn(out_features), torch.randn(rows, in_features)
        gain, shift = torch.randn(in_features), torch.randn(in_features)
        for kind, norm_bias in (("layer_norm", shift), ("layer_norm", None), ("rms_norm", None)):
            for activation in (None, *native.ACTIVATIONS):
                normed, separate, fused = torch.empty(rows, in_features), *(torch.empty(rows, out_features)
                                                                             for _ in range(2))
                kernel.norm(kind, x, gain, norm_bias, normed, 1e-5)
                kernel(normed, weight, scales, bias, separate, rows, threads=2, activation=activation)
                kernel(x, weight, scales, bias, fused, rows, threads=2, activation=activation,
                       norm=(kind, gain, norm_bias, 1e-5))
                assert torch.equal(fused, separate), (kind, activation, rows, in_features)


@needs_cc
def test_a_decoding_steps_norms_take_the_kernel_and_the_rest_torchs(monkeypatch):
    from nanogpt_cli import ops
    from nanogpt_cli.model import LayerNorm, RMSNorm

    torch.manual_seed(0)
    layer, nobias, rms = LayerNorm(96, bias=True), LayerNorm(96, bias=False), RMSNorm(96)
    for module in (layer, nobias, rms):
        for p in module.parameters():
            p.data.normal_()
    x = torch.randn(2, 1, 96)
    with torch.no_grad():
        for module in (layer, nobias, rms):
            torchs = (torch.nn.functional.layer_norm(x, (96,), module.weight, module.bias, 1e-5)
                      if module.kind == "layer_norm" else ops.rms_norm(x, module.weight, 1e-6))
            native_norm = module(x)
            torch.testing.assert_close(native_norm, torchs, atol=2e-6, rtol=1e-6)
            assert torch.equal(module.bound_forward()(x), native_norm)  # bit for bit
        assert not torch.equal(layer(big := torch.randn(ops.NATIVE_VALUES // 96, 96)),  # the kernel's bits, not
                               torch.nn.functional.layer_norm(big, (96,), layer.weight, layer.bias, 1e-5))  # torch's
        monkeypatch.setattr(native.Int8Kernel, "norm", lambda *a: pytest.fail("the kernel was called"))
        bound = layer.bound_forward()
        expected = torch.nn.functional.layer_norm
        big = torch.randn(ops.NATIVE_VALUES // 96 + 1, 96)  # a prefill's many values, another dtype, a strided view
        for rows in (big, x.bfloat16(), torch.randn(96, 2).T):
            assert torch.equal(layer(rows), expected(rows, (96,), layer.weight, layer.bias, 1e-5))
        assert torch.equal(bound(big), expected(big, (96,), layer.weight, layer.bias, 1e-5))
        layer.to(torch.bfloat16)  # the bound tensors now hold other storage: torch's
        assert torch.equal(bound(x.bfloat16()), expected(x.bfloat16(), (96,), layer.weight, layer.bias, 1e-5))
        layer.float()
    learning = x.clone().requires_grad_()  # autograd recording (training): torch's, with its backward
    layer(learning).sum().backward()
    rms(learning).sum().backward()
    assert learning.grad is not None and layer.weight.grad is not None and rms.weight.grad is not None
    monkeypatch.setattr(native, "int8_kernel", lambda: None)  # no compiler: torch's
    with torch.no_grad():
        assert torch.equal(layer(x), expected(x, (96,), layer.weight, layer.bias, 1e-5))
        assert torch.equal(layer.bound_forward()(x), expected(x, (96,), layer.weight, layer.bias, 1e-5))


@needs_cc
def test_an_int8_product_computes_the_norm_before_it_in_its_own_call(monkeypatch):
    from nanogpt_cli import ops
    from nanogpt_cli.model import Activation, LayerNorm, RMSNorm, bound_fused

    torch.manual_seed(0)
    linear = Int8Linear.from_linear(torch.nn.Linear(64, 256))
    norms = [LayerNorm(64, bias=True), LayerNorm(64, bias=False), RMSNorm(64)]
    for norm in norms:
        for p in norm.parameters():
            p.data.normal_()
    with torch.inference_mode():
        for norm in norms:
            for act in (None, Activation("gelu_new"), Activation("gelu")):
                for rows in (1, 3):
                    x = torch.randn(rows, 1, 64)
                    expected = linear(norm(x)) if act is None else act(linear(norm(x)))  # the forward's calls
                    if act is None or act.name in native.ACTIVATIONS:  # the norm in the product's call alone
                        monkeypatch.setattr(precision, "model_norm", lambda n: lambda x: pytest.fail("a norm apart"))
                        monkeypatch.setattr(ops, "norm", lambda *a: pytest.fail("normalised outside the kernel"))
                    fused = bound_fused(linear, norm, act)
                    assert torch.equal(fused(x), expected), (norm.kind, act, rows)
                    monkeypatch.undo()
        norm = norms[0]
        monkeypatch.setattr(ops, "NATIVE_VALUES", 100)  # more values than the standalone norm takes: torch's norm
        x = torch.randn(2, 1, 64)
        assert torch.equal(bound_fused(linear, norm)(x), linear(norm(x)))
        monkeypatch.undo()
        prefill = torch.randn(precision.NATIVE_MAX_ROWS + 1, 64)  # rows the kernel does not take: the calls apart
        assert torch.equal(bound_fused(linear, norm)(prefill), linear(norm(prefill)))
        strided = torch.randn(64, 2).T  # a view the standalone norm leaves to torch's: so does the fused
        assert torch.equal(bound_fused(linear, norm)(strided), linear(norm(strided)))


def draw_interval(x, k, temperature, u):
    """The float64 inverse CDF of a row's top-k softmax (candidates: the values >= the k-th largest; k 0: all), in
    index order: (the mass before each index, the mass up to it) over the target u * the whole mass."""
    x = x.double()
    kth = -float("inf") if k == 0 else x.sort(descending=True).values[k - 1]
    weight = torch.where(x >= kth, torch.exp(x / temperature - x.max() / temperature), 0.0)
    weight = torch.where(x / temperature - x.max() / temperature >= -87, weight, 0.0)
    upto = weight.cumsum(0)
    return upto - weight, upto, u * upto[-1].item()


@needs_cc
def test_the_sampling_kernel_draws_the_top_k_softmax_on_every_path(kernel):
    torch.manual_seed(0)
    # every tail of a vector's length, GPT-2's padded vocabulary, ties (bf16-rounded values), -inf among the values,
    # k from 1 to all, and a heap past the stack's 4096
    for n, ks in [(1, (0, 1)), (7, (0, 1, 3, 6)), (17, (0, 2, 16)), (50257, (0, 1, 50, 200)), (9000, (5000,))]:
        for values in ("normal", "ties", "-inf"):
            x = torch.randn(3, n) * 3
            if values == "ties":
                x = x.bfloat16().float()
            elif values == "-inf" and n > 1:
                x[:, ::2] = -float("inf")
            wide = torch.full((3, n + 5), float("nan"))
            wide[:, :n] = x  # rows at a stride past their values
            rows = wide[:, :n]
            for k in ks:
                for temperature in (0.5, 1.0, 3.0):
                    u = torch.rand(3, dtype=torch.float64)
                    out = torch.full((3, 1), -1, dtype=torch.long)
                    assert kernel.sample(rows, k, temperature, u, out), (n, k, values)
                    for r in range(3):
                        before, upto, target = draw_interval(x[r], k, temperature, u[r].item())
                        pick = out[r, 0].item()
                        slack = 1e-5 * upto[-1].item()  # float32 exponentials against float64 ones
                        assert before[pick] - slack <= target < upto[pick] + slack, (n, k, values, temperature, r)
                        assert upto[pick] > before[pick]  # never a value that weighs nothing
                out = torch.full((3, 1), -1, dtype=torch.long)
                assert kernel.sample(rows, k, 0.0, None, out)  # greedy: torch's argmax, the first of tied largest
                assert torch.equal(out, x.argmax(-1, keepdim=True)), (n, k, values)
    x = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # u at the ends of [0, 1): the first and the last candidate
    out = torch.empty(1, 1, dtype=torch.long)
    for u, expected in ((0.0, 0), (1 - 2**-53, 2)):
        assert kernel.sample(x, 3, 1.0, torch.tensor([u], dtype=torch.float64), out) and out.item() == expected
    u = torch.full((1,), 0.5, dtype=torch.float64)
    for bad in (float("nan"), float("inf")):  # a NaN or +inf: False, for torch's ops to say what they say of it
        row = torch.randn(1, 50)
        row[0, 37] = bad
        assert not kernel.sample(row, 10, 1.0, u, out) and not kernel.sample(row, 0, 0.0, None, out)
    nothing = torch.full((1, 50), -float("inf"))  # nothing finite to draw from; greedy takes the first, as argmax
    assert not kernel.sample(nothing, 0, 1.0, u, out)
    assert kernel.sample(nothing, 0, 0.0, None, out) and out.item() == 0


@needs_cc
def test_sample_next_draws_in_the_kernel_without_top_p_and_in_torchs_ops_otherwise(monkeypatch):
    from nanogpt_cli import ops
    from nanogpt_cli.generate import sample_next

    calls = []
    draw = native.Int8Kernel.sample
    monkeypatch.setattr(native.Int8Kernel, "sample", lambda self, *a: calls.append(a[2]) or draw(self, *a))
    torch.manual_seed(0)
    logits = torch.randn(2, 300)
    g = torch.Generator().manual_seed(0)
    for temperature, top_k in ((0.8, 200), (1.0, None), (0.0, None), (1e-9, 5)):
        picked = sample_next(logits, temperature, top_k, None, g)
        assert picked.shape == (2, 1) and picked.dtype is torch.long
    assert calls == [0.8, 1.0, 0.0, 1e-6]  # below MIN_TEMPERATURE: MIN_TEMPERATURE, as torch's ops divide
    assert torch.equal(sample_next(logits, 1e-9, 5, None, g), logits.argmax(-1, keepdim=True))
    calls.clear()
    for rows, top_p in ((logits, 0.9), (logits.bfloat16(), None), (logits.T.contiguous().T, None)):
        sample_next(rows, 1.0, 50, top_p, g)  # top_p, another dtype, a strided last dimension: torch's ops
    with torch.enable_grad():
        sample_next(logits.clone().requires_grad_(), 1.0, 50, None, g)
    assert calls == []
    nan = logits.clone()
    nan[1, 3] = float("nan")
    with pytest.raises(RuntimeError):  # the kernel declines; torch's multinomial refuses the NaN, as before
        sample_next(nan, 1.0, None, None, g)
    assert len(calls) == 1
    monkeypatch.setattr(native, "int8_kernel", lambda: None)  # no compiler: torch's
    assert ops.sample(logits, 1.0, 50, g) is None
