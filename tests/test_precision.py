"""Weight precision for inference: bf16 weights, weight-only int8 (close to fp32), refused combinations."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from nanogpt_cli.checkpoint import load_model
from nanogpt_cli.cli import app
from nanogpt_cli.errors import UsageError
from nanogpt_cli.model import GPT, GPTConfig
from nanogpt_cli.precision import (
    Int8Linear,
    OneDNNLinear,
    VectorLinear,
    check_precision,
    for_inference,
    weight_bytes_per_token,
)
from nanogpt_cli.train import train

runner = CliRunner()
CPU = torch.device("cpu")


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=64, dropout=0.0)).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from nanogpt_cli.config import TrainConfig, build
    from tests.conftest import TINY, write_char_dataset

    root = tmp_path_factory.mktemp("precision")
    write_char_dataset(root / "data")
    train(build(TrainConfig, None, [*TINY, f"--data_dir={root / 'data'}", f"--out_dir={root / 'out'}",
                                    "--max_iters=40", "--lr_decay_iters=40", "--learning_rate=1e-2"]))
    return root / "out"


def test_int8_logits_are_close_to_float32():
    model = tiny_model()
    idx = torch.randint(96, (2, 20))
    with torch.inference_mode():
        exact = model(idx, all_logits=True)[0]
        quantized = for_inference(tiny_model(), CPU, "float32", "int8")
        approx = quantized(idx, all_logits=True)[0]
    assert all(not isinstance(m, torch.nn.Linear) for m in quantized.modules())
    assert isinstance(quantized.lm_head, Int8Linear) and quantized.lm_head.weight.dtype == torch.int8
    assert approx.dtype == torch.float32
    error = (approx - exact).norm() / exact.norm()
    assert error < 0.02, error  # int8 steps of max|w|/127 and bf16 activations: about 1% of the logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_quantization_a_few_rows_at_a_time_equals_the_whole_matrix_formula(monkeypatch, dtype):
    import nanogpt_cli.precision as precision

    monkeypatch.setattr(precision, "QUANTIZE_CHUNK", 3 * 64)  # 3 rows of 64 a chunk: 7 chunks, the last short
    torch.manual_seed(0)
    weight = torch.randn(20, 64).to(dtype)
    weight[4] = 0  # an all-zero row keeps scale 1
    weight = weight.t().contiguous().t()  # any layout: a transposed-storage weight too

    exact = weight.float()
    scales = exact.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    expected = torch.round(exact / scales[:, None]).clamp(-127, 127).to(torch.int8)

    quantized, got_scales = precision.quantize_rows(weight)
    assert quantized.dtype == torch.int8 and quantized.is_contiguous() and got_scales.dtype == torch.bfloat16
    assert torch.equal(quantized, expected) and torch.equal(got_scales, scales.to(torch.bfloat16))
    assert got_scales[4] == 1 and not quantized[4].any()
    assert quantized.abs().amax(dim=1)[[0, 1, 19]].tolist() == [127, 127, 127]


def test_bfloat16_casts_the_weights_themselves_and_int8_quarters_the_matrices():
    fp32 = tiny_model()
    bf16 = for_inference(tiny_model(), CPU, "bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    fp32_bytes, bf16_bytes = weight_bytes_per_token(fp32), weight_bytes_per_token(bf16)
    assert bf16_bytes * 2 == fp32_bytes
    int8_bytes = weight_bytes_per_token(for_inference(tiny_model(), CPU, "float32", "int8"))
    assert fp32_bytes / 4 < int8_bytes < fp32_bytes / 3  # the norms, biases and scales are not quantized
    # GPT-2's tied lm_head is read whole each token; the position table a row at a time
    matrices = sum(m.weight.numel() for m in fp32.modules() if isinstance(m, torch.nn.Linear))
    assert fp32_bytes == 4 * (matrices + fp32.transformer.wpe.weight.size(1) + sum(
        p.numel() for n, p in fp32.named_parameters() if p.dim() == 1))


def test_bfloat16_one_row_products_run_as_matrix_vector_products(monkeypatch):
    import nanogpt_cli.precision as precision

    monkeypatch.setattr(precision, "cpu_linear_kernel", lambda: "mkl")  # an Intel CPU (the oneDNN path below)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)  # unmeasured CPUs keep torch's Linear
    assert all(type(m) is torch.nn.Linear for m in for_inference(tiny_model(), CPU, "bfloat16").modules()
               if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    bf16 = for_inference(tiny_model(), CPU, "bfloat16")
    linears = [m for m in bf16.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is VectorLinear for m in linears)
    assert set(bf16.state_dict()) == set(tiny_model().state_dict())  # the same module, the same keys
    assert all(type(m) is torch.nn.Linear for m in for_inference(tiny_model(), CPU, "float32").modules()
               if isinstance(m, torch.nn.Linear))  # float32 keeps torch's Linear: both kernels stream alike
    layer = bf16.transformer.h[0].mlp.c_fc
    for shape in ((1, 1, 64), (64,), (3, 1, 64), (2, 5, 64)):  # one row: addmv; more rows: F.linear
        x = torch.randn(shape, dtype=torch.bfloat16)
        expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        y = layer(x)
        assert y.shape == expected.shape and y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
    idx = torch.randint(96, (1, 20))
    calls = []
    real_addmv, real_mv = torch.addmv, torch.mv
    monkeypatch.setattr(torch, "addmv", lambda *args: calls.append("addmv") or real_addmv(*args))
    monkeypatch.setattr(torch, "mv", lambda *args: calls.append("mv") or real_mv(*args))  # the head has no bias
    with torch.inference_mode():  # a decoding step (one row) goes through addmv and agrees with float32
        exact = tiny_model()(idx[:, -1:])[0]
        torch.testing.assert_close(bf16(idx[:, -1:])[0].float(), exact, atol=0.1, rtol=0.05)
    assert len(calls) == len(linears) and calls.count("mv") == 1  # every matrix of the step once, the head too


@pytest.mark.parametrize("kernel", ["mkl", "onednn"])
def test_float32_weights_decoding_several_rows_are_stored_transposed(monkeypatch, kernel):
    import nanogpt_cli.precision as precision

    monkeypatch.setattr(precision, "cpu_linear_kernel", lambda: kernel)
    monkeypatch.setattr(precision.native, "int8_kernel", lambda: None)  # oneDNN's route without ngpt's kernel
    TRANSPOSED_FROM_ROWS = precision.TRANSPOSED_FROM_ROWS[kernel]
    one = for_inference(tiny_model(), CPU, "float32", rows=1)
    few = for_inference(tiny_model(), CPU, "float32", rows=TRANSPOSED_FROM_ROWS - 1)
    many = for_inference(tiny_model(), CPU, "float32", rows=TRANSPOSED_FROM_ROWS)
    for model in (one, few):  # loaded as they are: no copy at start-up
        assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear))
    linears = [m for m in many.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    assert many.lm_head.weight is many.transformer.wte.weight  # still tied: one Parameter, one copy
    reference = tiny_model().state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in many.state_dict().items())
    idx = torch.randint(96, (TRANSPOSED_FROM_ROWS, 12))
    with torch.inference_mode():
        torch.testing.assert_close(many(idx, all_logits=True)[0], one(idx, all_logits=True)[0])
    # a model whose copy would take half the memory available keeps its layout
    import nanogpt_cli.limits as limits

    assert 0 < limits.available_memory_bytes() <= limits.host_memory_bytes()
    monkeypatch.setattr(limits, "available_memory_bytes", lambda: sum(p.numel() * 4 for p in tiny_model().parameters()))
    kept = for_inference(tiny_model(), CPU, "float32", rows=TRANSPOSED_FROM_ROWS)
    assert all(m.weight.is_contiguous() for m in kept.modules() if isinstance(m, torch.nn.Linear))
    # bf16 and int8 weights are left as they are
    assert all(m.weight.is_contiguous() for m in for_inference(tiny_model(), CPU, "bfloat16", rows=8).modules()
               if isinstance(m, torch.nn.Linear))
    assert all(m.weight.is_contiguous() for m in for_inference(tiny_model(), CPU, "float32", "int8", rows=8).modules()
               if isinstance(m, Int8Linear))


@pytest.mark.parametrize("kernel, path, cls", [("onednn", "avx2", "OneDNNLinear"), ("mkl", "avx512", "RowsLinear")])
def test_float32_weights_keep_their_layout_where_the_native_kernel_takes_the_few_rows(monkeypatch, kernel, path,
                                                                                      cls):
    import nanogpt_cli.precision as precision

    monkeypatch.setattr(precision, "cpu_linear_kernel", lambda: kernel)
    from types import SimpleNamespace

    real_kernel = precision.native.int8_kernel
    # the routes measured: oneDNN's with AVX2 (Zen 3), MKL's with AVX512 on a CPU without bf16 instructions (Ice
    # Lake); a Xeon with AMX (bf16 instructions) keeps MKL's, measured there
    for bf16 in (False, True):
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda bf16=bf16: bf16)
        for route in ("onednn", "mkl"):
            for built in ("avx2", "avx512", "generic"):
                monkeypatch.setattr(precision.native, "int8_kernel", lambda built=built: SimpleNamespace(path=built))
                measured = {("onednn", "avx2")} if bf16 else {("onednn", "avx2"), ("mkl", "avx512")}
                assert precision.float_rows_native(route) == ((route, built) in measured), (bf16, route, built)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(precision.native, "int8_kernel", lambda: None)
    assert not precision.float_rows_native("onednn") and not precision.float_rows_native("mkl")
    monkeypatch.setattr(precision.native, "int8_kernel", lambda: SimpleNamespace(path=path))
    many = for_inference(tiny_model(), CPU, "float32", rows=8)  # as loaded: no copy at start-up
    linears = [m for m in many.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m).__name__ == cls and m.weight.is_contiguous() for m in linears)
    one = for_inference(tiny_model(), CPU, "float32", rows=1)  # one row a step: the route's own Linear
    assert all(type(m) is (torch.nn.Linear if kernel == "mkl" else precision.OneDNNLinear)
               for m in one.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(precision.native, "int8_kernel", real_kernel)  # int8 quantizes through the real one
    monkeypatch.setattr(precision, "float_rows_native", lambda route: True)
    for dtype, quantize in [("bfloat16", "none"), ("float32", "int8")]:  # only float32 weights take it
        assert not any(type(m) is precision.RowsLinear
                       for m in for_inference(tiny_model(), CPU, dtype, quantize, rows=8).modules())


def test_cpu_linear_kernel_is_onednn_on_x86_cpus_other_than_intels(monkeypatch):
    import nanogpt_cli.precision as precision

    for machine, vendor, kernel in [("x86_64", "AuthenticAMD", "onednn"), ("x86_64", "HygonGenuine", "onednn"),
                                    ("AMD64", "AuthenticAMD", "onednn"), ("x86_64", "GenuineIntel", "mkl"),
                                    ("x86_64", "", "mkl"), ("aarch64", "", "mkl"), ("arm64", "Apple", "mkl")]:
        monkeypatch.setattr(precision.platform, "machine", lambda machine=machine: machine)
        monkeypatch.setattr(precision, "cpu_vendor", lambda vendor=vendor: vendor)
        assert precision.cpu_linear_kernel() == kernel, (machine, vendor)
    import nanogpt_cli.cpu_tuning as cpu_tuning

    monkeypatch.setattr(cpu_tuning, "_cpuinfo_field", lambda name: None)  # no /proc/cpuinfo: the processor string
    for processor, vendor in [("AMD64 Family 25 Model 33 Stepping 2, AuthenticAMD", "AuthenticAMD"),
                              ("Intel64 Family 6 Model 85 Stepping 7, GenuineIntel", "GenuineIntel"), ("", "")]:
        monkeypatch.setattr(cpu_tuning.platform, "processor", lambda processor=processor: processor)
        assert cpu_tuning.cpu_vendor.__wrapped__() == vendor


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_onednn_linears_run_onednn_and_agree_with_torch(monkeypatch, dtype):
    import nanogpt_cli.precision as precision

    monkeypatch.setattr(precision, "cpu_linear_kernel", lambda: "onednn")
    model = for_inference(tiny_model(), CPU, dtype)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    assert set(model.state_dict()) == set(tiny_model().state_dict())  # the same module, the same keys
    assert model.lm_head.weight is model.transformer.wte.weight
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *args: calls.append(1) or real(*args))
    reference = tiny_model().to(precision.DTYPES[dtype])
    idx = torch.randint(96, (3, 12))
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == "float32" else {"atol": 0.1, "rtol": 0.05}
    with torch.inference_mode():
        torch.testing.assert_close(model(idx, all_logits=True)[0].float(), reference(idx, all_logits=True)[0].float(),
                                   **tolerance)
        # every matrix once, the bias-free head too; bf16 only where oneDNN has bf16 kernels (not on AVX2)
        assert len(calls) == (len(linears) if precision.DTYPES[dtype] in precision.ONEDNN_DTYPES else 0)
        layer = model.transformer.h[0].mlp.c_proj
        for x in (torch.randn(1, 256), torch.randn(2, 5, 256), torch.randn(5, 2, 256).transpose(0, 1)):
            x = x.to(layer.weight.dtype)
            expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
            torch.testing.assert_close(layer(x).float(), expected.float(), **tolerance)
    calls.clear()
    x = torch.randn(2, 256, dtype=layer.weight.dtype, requires_grad=True)  # autograd recording: torch's Linear
    layer(x).sum().backward()
    assert not calls and x.grad is not None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for torch's Linear
        assert layer(torch.randn(2, 256, dtype=layer.weight.dtype)).dtype == torch.bfloat16 and not calls
    evaluated = precision.cpu_linears(tiny_model(), CPU)  # what ngpt eval evaluates (float32 weights)
    assert all(type(m) is OneDNNLinear for m in evaluated.modules() if isinstance(m, torch.nn.Linear))
    int8 = for_inference(tiny_model(), CPU, "float32", "int8")  # int8 matrices keep their own kernel
    assert not any(type(m) is OneDNNLinear for m in int8.modules())


def greedy(model, idx, steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and, at each step, the margin of the best logit over the second."""
    tokens, margins = [], []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(idx)[0][0, -1]
            top = logits.topk(2).values
            token = int(logits.argmax())
            tokens.append(token)
            margins.append(float(top[0] - top[1]))
            idx = torch.cat((idx, torch.tensor([[token]])), dim=1)[:, -model.config.block_size:]
    return tokens, margins


def test_int8_greedy_text_equals_float32_where_the_margins_allow(trained):
    from nanogpt_cli.tokenizer import from_meta

    fp32, meta, _ = load_model("resume", str(trained))
    int8 = for_inference(load_model("resume", str(trained))[0], CPU, "float32", "int8")
    idx = torch.tensor([from_meta(meta).encode("JULIET: the quick brown fox ")])
    exact, margins = greedy(fp32.eval(), idx, 30)
    approx, _ = greedy(int8, idx, 30)
    clear = next((i for i, margin in enumerate(margins) if margin < 0.1), len(margins))  # a near tie may flip
    assert clear >= 10, margins
    assert approx[:clear] == exact[:clear]


def test_sample_with_int8_and_bfloat16_weights(trained):
    texts = {}
    for extra in ([], ["--dtype=bfloat16"], ["--quantize=int8"]):
        result = runner.invoke(app, ["sample", f"--out_dir={trained}", "--device=cpu", "--num_samples=1",
                                     "--max_new_tokens=12", "--temperature=0", "--prompt=ROMEO:", "--json", *extra])
        assert result.exit_code == 0, result.output
        texts[" ".join(extra)] = result.stdout
    assert all(text.strip() for text in texts.values())


@pytest.mark.parametrize("args, message", [
    (["--quantize=int8", "--dtype=float16"], "--quantize int8 computes in bfloat16"),
    (["--quantize=int4"], "--quantize must be one of none, int8"),
])
def test_bad_precision_combinations_are_one_error_line(trained, args, message):
    result = runner.invoke(app, ["sample", f"--out_dir={trained}", "--device=cpu", "--max_new_tokens=2", *args])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr


def test_int8_off_the_cpu_is_refused():
    with pytest.raises(UsageError, match="runs on cpu only"):
        check_precision(torch.device("cuda"), "bfloat16", "int8")
    check_precision(torch.device("cuda"), "bfloat16", "none")


def test_bench_decode_val_loss_evaluates_every_precision_on_the_same_batches(trained):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
    proc = subprocess.run([sys.executable, str(script), "--val-loss", str(trained), "--eval-iters", "3",
                           "--batch-size", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    losses = json.loads(proc.stdout.strip().splitlines()[-1])["val_loss"][str(trained)]
    from nanogpt_cli import native

    native_row = {"int8 native"} if native.int8_kernel() is not None else set()  # decoding's kernel, where built
    assert set(losses) == {"fp32", "bf16", "int8", "int8+bf16"} | native_row
    assert 0 < losses["fp32"] < 10
    for name in ("bf16", "int8", "int8+bf16", *native_row):  # a trained model's loss barely moves with its precision
        assert abs(losses[name] - losses["fp32"]) < 0.05, (name, losses)
    assert len(set(losses.values())) > 1  # each row really evaluated its own precision


def test_bench_decode_first_token_waits_for_the_byte_after_the_echoed_prompt(monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_decode

    script = (f"import sys, time; p = sys.stdout.buffer; p.write({bench_decode.PROMPT!r}.encode()); p.flush(); "
              "time.sleep(0.4); p.write(b' token'); p.flush(); time.sleep(0.4)")
    first, end = bench_decode.first_token([sys.executable, "-c", script])
    assert 0.4 <= first < end and end - first >= 0.3  # not the echoed prompt, not the exit
    with pytest.raises(SystemExit, match="failed"):  # a process that ends before its first token
        bench_decode.first_token([sys.executable, "-c", "import sys; print('The meaning'); sys.exit(3)"])
