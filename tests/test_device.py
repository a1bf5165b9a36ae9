"""The device choices: dtype, compile and threads (with their reasons), the GPU peak table, CPU peaks."""

from __future__ import annotations

import contextlib

import pytest
import torch

from nanogpt_cli import device as dev
from nanogpt_cli.device import (
    choose_compile,
    choose_dtype,
    choose_threads,
    gpu_peak_flops,
    peak_flops,
    training_attention,
)
from nanogpt_cli.errors import UsageError

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")


# ---------------------------------------------------------------- dtype

def test_an_explicit_dtype_is_used_as_asked():
    for dtype in ("float32", "bfloat16", "float16"):
        assert choose_dtype(CPU, dtype) == (dtype, "asked for")
    with pytest.raises(UsageError, match="unknown dtype"):
        choose_dtype(CPU, "float8")


def test_cpu_auto_dtype_follows_the_instructions_and_the_measured_speedup(monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: False)
    dtype, why = choose_dtype(CPU, training=True)
    assert dtype == "float32" and "AVX512-BF16" in why
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(dev, "cpu_bf16_speedup", lambda: 2.6)
    dtype, why = choose_dtype(CPU, training=True)
    assert dtype == "bfloat16" and "2.6x" in why
    assert choose_dtype(CPU)[0] == "float32"  # sampling and evaluation stay exact
    monkeypatch.setattr(dev, "cpu_bf16_speedup", lambda: 1.1)  # flags, but no real gain (e.g. a VM)
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


def test_the_measured_bf16_speedup_is_cached_and_sane():
    first = dev.cpu_bf16_speedup()
    assert first > 0 and dev.cpu_bf16_speedup() == first  # one measurement per thread count: stable reasons


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
    from nanogpt_cli.device import DistEnv
    from nanogpt_cli.train import Trainer

    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)
    short = Trainer(tiny_cfg("--compile=auto"), CPU, DistEnv())
    assert short.use_compile is False and short.estimated_run_seconds() < 60
    monkeypatch.setattr(dev, "peak_flops", lambda device, dtype: (1e6, "slow"))  # a very slow CPU
    monkeypatch.setattr("nanogpt_cli.train.peak_flops", lambda device, dtype: (1e6, "slow"))
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # the choice, not the compilation
    long = Trainer(tiny_cfg("--compile=auto", "--max_iters=100000"), CPU, DistEnv())
    assert long.use_compile is True and "pays back" in long.compile_why


# ---------------------------------------------------------------- threads

@pytest.fixture
def fresh_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("NGPT_THREADS", raising=False)
    measured = dev._measured_threads  # tests may replace it; its cache is cleared either side
    measured.cache_clear()
    threads = torch.get_num_threads()
    yield
    measured.cache_clear()
    torch.set_num_threads(threads)


def test_fewer_threads_only_when_clearly_faster(monkeypatch, fresh_threads):
    def race(speeds):
        return lambda entries, size, rounds=4, seconds=0.02: [[speeds[t]] * rounds for _, t in entries]

    monkeypatch.setattr(dev, "_matmul_race", race({8: 10.0, 4: 30.0, 2: 20.0, 1: 12.0}))  # busy cores
    assert dev._measured_threads(8)[0] == 4
    dev._measured_threads.cache_clear()
    monkeypatch.setattr(dev, "_matmul_race", race({8: 10.0, 4: 11.0, 2: 6.0, 1: 3.0}))  # within noise: keep all
    n, why = dev._measured_threads(8)
    assert n == 8 and "one per core" in why
    assert dev._measured_threads(1)[0] == 1


def test_threads_are_torchs_fixed_default_unless_asked(monkeypatch, fresh_threads):
    monkeypatch.setattr(dev, "_measured_threads", lambda default: pytest.fail("measured without NGPT_THREADS=auto"))
    n, why = choose_threads(CPU)
    assert n == torch.get_num_threads() and "exact reruns" in why and "NGPT_THREADS=auto" in why
    monkeypatch.setenv("NGPT_THREADS", "3")
    assert choose_threads(CPU) == (3, "NGPT_THREADS")
    monkeypatch.setenv("NGPT_THREADS", "many")
    with pytest.raises(UsageError, match="NGPT_THREADS"):
        choose_threads(CPU)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # obeyed above all
    assert choose_threads(CPU) == (torch.get_num_threads(), "OMP_NUM_THREADS=3")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert choose_threads(CUDA)[1] == "not a cpu run"


def test_the_thread_choice_is_measured_from_torchs_default_even_after_applying_it(monkeypatch, fresh_threads):
    seen = []
    monkeypatch.setenv("NGPT_THREADS", "auto")
    monkeypatch.setattr(dev, "_measured_threads", lambda default: seen.append(default) or (1, "measured"))
    monkeypatch.setattr(dev, "_applied_threads", (0, 0))
    torch.set_num_threads(2)
    n, _ = choose_threads(CPU)
    dev.apply_threads(n)
    assert torch.get_num_threads() == 1
    choose_threads(CPU)  # a second Trainer in the same process (bench --compare) measures from 2 again
    assert seen == [2, 2]


def run_tuner(monkeypatch, tuner, step_seconds, steps):
    """Tick the tuner through `steps` steps whose duration depends on torch's thread count at the time."""
    clock = [0.0]
    monkeypatch.setattr(dev.time, "perf_counter", lambda: clock[0])
    counts = []
    for _ in range(steps):
        tuner.tick()
        counts.append(torch.get_num_threads())
        clock[0] += step_seconds(torch.get_num_threads())
    return counts


def test_the_thread_tuner_follows_the_load(monkeypatch, fresh_threads):
    torch.set_num_threads(2)
    tuner = dev.ThreadTuner(default=2, current=2)
    busy = {2: 0.10, 1: 0.04}  # another job took a core: 2 threads wait on each other
    counts = run_tuner(monkeypatch, tuner, busy.get, 40)
    assert counts[:29] == [2] * 29 and counts[-1] == 1 and tuner.current == 1
    idle = {2: 0.02, 1: 0.035}  # the job ended
    counts = run_tuner(monkeypatch, tuner, idle.get, 200)
    assert counts[-1] == 2 and tuner.current == 2


def test_a_plainly_slower_trial_is_short_and_trials_back_off(monkeypatch, fresh_threads):
    torch.set_num_threads(2)
    tuner = dev.ThreadTuner(default=2, current=2)
    counts = run_tuner(monkeypatch, tuner, {2: 0.02, 1: 0.2}.get, 400)
    assert tuner.current == 2 and counts[-1] == 2
    assert counts.count(1) <= 2 * 5  # trials at 30, 90, 210: two steps each
    assert tuner.interval == 240


def test_the_thread_tuner_runs_only_with_ngpt_threads_auto(monkeypatch, fresh_threads):
    torch.set_num_threads(2)
    assert not dev.thread_tuner(CPU, 2, distributed=False).enabled
    monkeypatch.setenv("NGPT_THREADS", "auto")
    assert dev.thread_tuner(CPU, 2, distributed=False).enabled
    assert not dev.thread_tuner(CPU, 2, distributed=True).enabled
    assert not dev.thread_tuner(CUDA, 2, distributed=False).enabled
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not dev.thread_tuner(CPU, 2, distributed=False).enabled
    assert dev.thread_candidates(8) == [8, 4, 2, 1] and dev.thread_candidates(1) == [1]


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


def test_cpu_peak_is_measured():
    flops, why = peak_flops(CPU, "float32")
    assert flops > 1e8 and "measured float32 matmul" in why


# ---------------------------------------------------------------- host memory

FAULTS = """
import resource, torch
from nanogpt_cli.device import keep_freed_host_memory
from nanogpt_cli.model import GPT, GPTConfig
print(keep_freed_host_memory())
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=128, vocab_size=16384, n_layer=2, n_head=4, n_embd=128))
opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
idx = torch.randint(16384, (8, 129))
def step():  # its logits alone are 64 MB
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def transparent_huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not dev.platform.libc_ver()[0] == "glibc", reason="glibc's malloc only")
@pytest.mark.skipif(transparent_huge_pages_always(), reason="huge pages fault 2 MB at a time: counts not comparable")
def test_freed_host_memory_is_reused_instead_of_faulted_in_again():
    """With keep_freed_host_memory a training step's large tensors reuse the memory the previous step freed;
    without it (NGPT_MALLOPT=0, glibc as it comes) each step faults its tensors' pages in again (measured
    about 34,000 page faults a step here, against 0-3,300)."""
    import os
    import subprocess
    import sys

    def faults_per_step(mallopt: str) -> tuple[str, int]:
        env = dict(os.environ, NGPT_MALLOPT=mallopt)
        out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
        why, count = out.stdout.strip().splitlines()
        return why, int(count)

    why, kept = faults_per_step("1")
    assert why.startswith("freed blocks kept for reuse")
    why, default = faults_per_step("0")
    assert why == "glibc defaults (NGPT_MALLOPT=0)"
    assert default > 16384  # at least the logits' pages, every step
    assert kept * 4 < default
