"""The runtime's choices: device, dtype, compile and attention (with their reasons), the GPU peak table."""

from __future__ import annotations

import contextlib

import pytest
import torch
from rich.text import Text

from nanogpt_cli import cpu_tuning
from nanogpt_cli.errors import UsageError
from nanogpt_cli.runtime import (
    Runtime,
    choose_compile,
    choose_dtype,
    gpu_peak_flops,
    peak_flops,
    plan,
    training_attention,
)

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")


# ---------------------------------------------------------------- dtype

def test_an_explicit_dtype_is_used_as_asked():
    for dtype in ("float32", "bfloat16", "float16"):
        assert choose_dtype(CPU, dtype) == (dtype, "asked for")
    with pytest.raises(UsageError, match="unknown dtype"):
        choose_dtype(CPU, "float8")


def test_cpu_auto_dtype_follows_the_instructions_and_the_measured_speedup(monkeypatch):
    monkeypatch.setattr(cpu_tuning, "cpu_has_fast_bf16", lambda: False)
    dtype, why = choose_dtype(CPU, training=True)
    assert dtype == "float32" and "AVX512-BF16" in why
    monkeypatch.setattr(cpu_tuning, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(cpu_tuning, "cpu_bf16_speedup", lambda: 2.6)
    dtype, why = choose_dtype(CPU, training=True)
    assert dtype == "bfloat16" and "2.6x" in why
    assert choose_dtype(CPU)[0] == "float32"  # sampling and evaluation stay exact
    monkeypatch.setattr(cpu_tuning, "cpu_bf16_speedup", lambda: 1.1)  # flags, but no real gain (e.g. a VM)
    dtype, why = choose_dtype(CPU, training=True)
    assert dtype == "float32" and "1.1x" in why


def test_gpu_and_mps_auto_dtypes(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **k: asked.append(k) or True)
    assert choose_dtype(CUDA)[0] == "bfloat16"
    # emulated bf16 (T4, V100) counts as none: it is slow there and inductor will not compile it
    assert asked == [{"including_emulation": False}]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **k: False)
    dtype, why = choose_dtype(CUDA)
    assert dtype == "float16" and "GradScaler" in why
    with pytest.raises(UsageError, match="no bfloat16 tensor cores"):
        choose_dtype(CUDA, "bfloat16")
    assert choose_dtype(MPS)[0] == "float32"
    # float16 on mps has no GradScaler: refused for training, fine for sampling and evaluation
    with pytest.raises(UsageError, match="without loss scaling on mps"):
        choose_dtype(MPS, "float16", training=True)
    assert choose_dtype(MPS, "float16") == ("float16", "asked for")


# ---------------------------------------------------------------- compile

def test_compile_auto_choices(monkeypatch):
    assert choose_compile(CPU, True) == (True, "asked for") and choose_compile(CPU, False) == (False, "asked for")
    assert choose_compile(CUDA, None)[0] is True
    assert choose_compile(MPS, None)[0] is False
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)
    use, why = choose_compile(CPU, None)
    assert use is False and "minutes" in why  # no estimate: off, with the rule
    use, why = choose_compile(CPU, None, est_run_seconds=120)
    assert use is False and "too short" in why
    use, why = choose_compile(CPU, None, est_run_seconds=3 * 3600)
    assert use is True and "about 3 hours" in why
    assert "about 93 days" in choose_compile(CPU, None, est_run_seconds=93 * 86400)[1]
    assert "about 40 minutes" in choose_compile(CPU, None, est_run_seconds=40 * 60)[1]
    monkeypatch.setattr("shutil.which", lambda name: None)
    use, why = choose_compile(CPU, None, est_run_seconds=3 * 3600)
    assert use is False and "C++ compiler" in why


def test_a_long_cpu_run_compiles_by_default_and_a_short_one_does_not(tiny_cfg, monkeypatch):
    from nanogpt_cli.train import build_trainer

    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)
    short = build_trainer(tiny_cfg("--compile=auto")).runtime
    assert short.compile is False and "a minute or two" in short.compile_why
    monkeypatch.setattr(cpu_tuning, "measured_cpu_peak_flops", lambda dtype, threads: 1e6)  # a very slow CPU
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # the choice, not the compilation
    long = build_trainer(tiny_cfg("--compile=auto", "--max_iters=100000")).runtime
    assert long.compile is True and "pays back" in long.compile_why

# ---------------------------------------------------------------- attention, peaks

def test_cpu_bf16_training_uses_explicit_attention():
    assert training_attention(CPU, "float32") == "sdpa"
    assert training_attention(CUDA, "bfloat16") == "sdpa"
    assert training_attention(CPU, "bfloat16") == "explicit"


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A10G", 70e12), ("NVIDIA A10", 125e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("Tesla T4", 65e12), ("NVIDIA RTX A6000", 155e12),
])
def test_gpu_peak_table(name, flops):
    assert gpu_peak_flops(name) == flops


def test_unknown_gpus_have_no_peak_and_fp32_uses_the_tf32_rate(monkeypatch):
    assert gpu_peak_flops("Imaginary Accelerator 9000") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert peak_flops(CUDA, "bfloat16") == (312e12, "NVIDIA A100-SXM4-80GB data sheet")
    assert peak_flops(CUDA, "float32")[0] == 156e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Imaginary Accelerator 9000")
    flops, why = peak_flops(CUDA, "bfloat16")
    assert flops is None and "unknown GPU" in why


# ---------------------------------------------------------------- the plan

def test_inference_keeps_fp32_and_torchs_threads_on_cpu(monkeypatch):
    monkeypatch.setattr(cpu_tuning, "choose_threads", lambda device: pytest.fail("threads chosen for inference"))
    runtime = plan("cpu", "auto")
    assert (runtime.device, runtime.dtype, runtime.compile) == (CPU, "float32", False)
    assert runtime.threads == torch.get_num_threads() and runtime.host_memory
    assert "device[/bold] cpu (1 process)" in runtime.describe()


def test_training_plans_decide_dtype_attention_and_threads_once(monkeypatch):
    monkeypatch.setattr(cpu_tuning, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(cpu_tuning, "cpu_bf16_speedup", lambda: 2.5)
    monkeypatch.setattr(cpu_tuning, "choose_threads", lambda device: (1, "one, for the test"))
    threads = torch.get_num_threads()
    try:
        runtime = plan("cpu", "auto", False, training=True)
        assert (runtime.dtype, runtime.attention, runtime.threads) == ("bfloat16", "explicit", 1)
        assert "2.5x" in runtime.dtype_why and runtime.threads_why == "one, for the test"
        assert torch.get_num_threads() == 1
        measured = []
        monkeypatch.setattr(cpu_tuning, "measured_cpu_peak_flops",
                            lambda dtype, threads: measured.append(dtype) or 1e9)
        assert runtime.peak == runtime.peak and measured == ["bfloat16"]  # measured once, when asked for
    finally:
        torch.set_num_threads(threads)


def test_two_plans_choose_the_same_dtype_however_noisy_the_measurement(monkeypatch, tmp_path):
    """The bf16 speedup is measured once per machine and remembered: a later run on a busier (or idler)
    machine, whose measurement would say otherwise, decides the same."""
    monkeypatch.setenv("NGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_tuning, "_this_process", {})
    monkeypatch.setattr(cpu_tuning, "cpu_has_fast_bf16", lambda: True)
    noisy = iter([{"float32": 1e11, "bfloat16": 2.2e11}, {"float32": 1e11, "bfloat16": 1.1e11}])
    monkeypatch.setattr(cpu_tuning, "one_core_matmul_flops", lambda dtypes: next(noisy))
    threads = torch.get_num_threads()
    try:
        first = plan("cpu", "auto", False, training=True)
        monkeypatch.setattr(cpu_tuning, "_this_process", {})  # the next run: a new process
        second = plan("cpu", "auto", False, training=True)
    finally:
        torch.set_num_threads(threads)
    assert first.dtype == second.dtype == "bfloat16" and first.dtype_why == second.dtype_why
    assert next(noisy, None) is not None  # the second plan did not measure


def test_mfu_never_passes_one(monkeypatch, tmp_path):
    """A rate above the peak proves the peak too low: it is raised to that rate (and remembered on cpu)."""
    monkeypatch.setenv("NGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_tuning, "_this_process", {})
    monkeypatch.setattr(cpu_tuning, "one_core_matmul_flops", lambda dtypes: dict.fromkeys(dtypes, 1e10))
    runtime = plan("cpu", "float32")
    peak = runtime.peak[0]
    assert runtime.mfu(peak / 2) == pytest.approx(0.5)
    for rate in (peak * 1.65, peak * 1.2, peak * 3, peak):
        assert runtime.mfu(rate) <= 1
    assert runtime.peak[0] == peak * 3 and runtime.peak[1].endswith("raised to a rate training reached")
    assert runtime.peak[1].count("raised") == 1
    monkeypatch.setattr(cpu_tuning, "_this_process", {})
    assert cpu_tuning.measured_cpu_peak_flops("float32") == pytest.approx(peak * 3)  # the next run starts there
    gpu = Runtime(CUDA, "bfloat16", "asked for")
    gpu.peak = (312e12, "NVIDIA A100 data sheet")
    assert gpu.mfu(400e12) == 1 and gpu.mfu(200e12) == pytest.approx(0.5)
    unknown = Runtime(MPS, "float32", "asked for")
    unknown.peak = (None, "unknown for mps")
    assert unknown.mfu(1e12) is None


def test_the_device_line_is_short_and_verbose_gives_the_reasons(monkeypatch):
    from nanogpt_cli import progress

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("NGPT_THREADS", "3")
    threads = torch.get_num_threads()
    try:
        runtime = plan("cpu", "float32", False, training=True)
    finally:
        torch.set_num_threads(threads)
    short = runtime.describe()
    assert "threads[/bold] 3" in short and "asked for" not in short and "host memory" not in short
    assert len(Text.from_markup(short).plain) < 100 and "--verbose" in short
    monkeypatch.setattr(progress, "_verbose", True)
    full = runtime.describe()
    assert "threads[/bold] 3: NGPT_THREADS" in full and "dtype[/bold] float32: asked for" in full
    assert "host memory" in full


def test_unknown_devices_are_usage_errors():
    with pytest.raises(UsageError, match="unknown device"):
        plan("tpu:0")
