"""CPU tuning: the thread choice and its tuner, the kept host memory, the matmul measurements."""

from __future__ import annotations

import json
import platform

import pytest
import torch

from nanogpt_cli import cpu_tuning as tuning
from nanogpt_cli.cpu_tuning import choose_threads
from nanogpt_cli.errors import UsageError

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


# ---------------------------------------------------------------- threads

@pytest.fixture
def fresh_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("NGPT_THREADS", raising=False)
    measured = tuning._measured_threads  # tests may replace it; its cache is cleared either side
    measured.cache_clear()
    threads = torch.get_num_threads()
    yield
    measured.cache_clear()
    torch.set_num_threads(threads)


def test_fewer_threads_only_when_clearly_faster(monkeypatch, fresh_threads):
    def race(speeds):
        return lambda entries, size, rounds=4, seconds=0.02: [[speeds[t]] * rounds for _, t in entries]

    monkeypatch.setattr(tuning, "_matmul_race", race({8: 10.0, 4: 30.0, 2: 20.0, 1: 12.0}))  # busy cores
    assert tuning._measured_threads(8)[0] == 4
    tuning._measured_threads.cache_clear()
    monkeypatch.setattr(tuning, "_matmul_race", race({8: 10.0, 4: 11.0, 2: 6.0, 1: 3.0}))  # within noise: keep all
    n, why = tuning._measured_threads(8)
    assert n == 8 and "one per core" in why
    assert tuning._measured_threads(1)[0] == 1


def test_threads_are_torchs_fixed_default_unless_asked(monkeypatch, fresh_threads):
    monkeypatch.setattr(tuning, "_measured_threads", lambda default: pytest.fail("measured without NGPT_THREADS=auto"))
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
    monkeypatch.setattr(tuning, "_measured_threads", lambda default: seen.append(default) or (1, "measured"))
    monkeypatch.setattr(tuning, "_applied_threads", (0, 0))
    torch.set_num_threads(2)
    n, _ = choose_threads(CPU)
    tuning.apply_threads(n)
    assert torch.get_num_threads() == 1
    choose_threads(CPU)  # a second Trainer in the same process (bench --compare) measures from 2 again
    assert seen == [2, 2]


def run_tuner(monkeypatch, tuner, step_seconds, steps):
    """Tick the tuner through `steps` steps whose duration depends on torch's thread count at the time."""
    clock = [0.0]
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock[0])
    counts = []
    for _ in range(steps):
        tuner.tick()
        counts.append(torch.get_num_threads())
        clock[0] += step_seconds(torch.get_num_threads())
    return counts


def test_the_thread_tuner_follows_the_load(monkeypatch, fresh_threads):
    torch.set_num_threads(2)
    tuner = tuning.ThreadTuner(default=2, current=2)
    busy = {2: 0.10, 1: 0.04}  # another job took a core: 2 threads wait on each other
    counts = run_tuner(monkeypatch, tuner, busy.get, 40)
    assert counts[:29] == [2] * 29 and counts[-1] == 1 and tuner.current == 1
    idle = {2: 0.02, 1: 0.035}  # the job ended
    counts = run_tuner(monkeypatch, tuner, idle.get, 200)
    assert counts[-1] == 2 and tuner.current == 2


def test_a_plainly_slower_trial_is_short_and_trials_back_off(monkeypatch, fresh_threads):
    torch.set_num_threads(2)
    tuner = tuning.ThreadTuner(default=2, current=2)
    counts = run_tuner(monkeypatch, tuner, {2: 0.02, 1: 0.2}.get, 400)
    assert tuner.current == 2 and counts[-1] == 2
    assert counts.count(1) <= 2 * 5  # trials at 30, 90, 210: two steps each
    assert tuner.interval == 240


def test_the_thread_tuner_runs_only_with_ngpt_threads_auto(monkeypatch, fresh_threads):
    torch.set_num_threads(2)
    assert not tuning.thread_tuner(CPU, 2, distributed=False).enabled
    monkeypatch.setenv("NGPT_THREADS", "auto")
    assert tuning.thread_tuner(CPU, 2, distributed=False).enabled
    assert not tuning.thread_tuner(CPU, 2, distributed=True).enabled
    assert not tuning.thread_tuner(CUDA, 2, distributed=False).enabled
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not tuning.thread_tuner(CPU, 2, distributed=False).enabled
    assert tuning.thread_candidates(8) == [8, 4, 2, 1] and tuning.thread_candidates(1) == [1]


# ---------------------------------------------------------------- busy cores

def watch(monkeypatch, waiting_share: float, steps: int, threads: int = 2) -> list[str]:
    """Tick a run's tuner (fixed threads) through steps of 0.5 s in which its threads waited for a core
    waiting_share of the time they were ready to run; returns what it logged."""
    clock, times = [0.0], [0, 0]
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(tuning, "scheduler_times", lambda: tuple(times))
    logged: list[str] = []
    torch.set_num_threads(threads)
    tuner = tuning.thread_tuner(CPU, threads, distributed=False, log=logged.append)
    for _ in range(steps):
        tuner.tick()
        clock[0] += 0.5
        times[0] += int(0.5e9 * (1 - waiting_share))
        times[1] += int(0.5e9 * waiting_share)
    return logged


def test_busy_cores_are_noted_once_with_what_ngpt_threads_can_do(monkeypatch, fresh_threads):
    logged = watch(monkeypatch, waiting_share=0.4, steps=100)
    assert len(logged) == 1, logged  # once per run, however long the load lasts
    assert "cores are busy" in logged[0] and "40%" in logged[0]
    assert "NGPT_THREADS=auto" in logged[0] and "NGPT_THREADS=1" in logged[0]
    assert "NGPT_THREADS" not in watch(monkeypatch, waiting_share=0.4, steps=100, threads=1)[0]  # nothing to cut


def test_idle_cores_and_passing_waits_say_nothing(monkeypatch, fresh_threads):
    assert watch(monkeypatch, waiting_share=0.02, steps=100) == []
    assert watch(monkeypatch, waiting_share=0.4, steps=4) == []  # the first steps (start-up) are not judged


def test_busy_cores_are_watched_only_where_the_advice_applies(monkeypatch, fresh_threads):
    def watched(device, distributed=False, log=print):
        return tuning.thread_tuner(device, 2, distributed, log).busy is not None

    assert watched(CPU) and not watched(CUDA) and not watched(CPU, distributed=True) and not watched(CPU, log=None)
    monkeypatch.setenv("NGPT_THREADS", "auto")  # the tuner itself follows the load
    assert not watched(CPU)


def test_scheduler_times_are_read_where_the_kernel_keeps_them():
    times = tuning.scheduler_times()
    if times is not None:  # Linux with schedstat
        assert times[0] > 0 and times[1] >= 0


# ---------------------------------------------------------------- measurements, remembered per machine

@pytest.fixture
def measurements(monkeypatch, tmp_path):
    """An empty measurements cache, and a process that has measured nothing yet."""
    monkeypatch.setenv("NGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "_this_process", {})
    return tmp_path / "cache" / tuning.MEASUREMENTS_FILE


def counted(monkeypatch, flops: dict[str, float]) -> list[list[str]]:
    calls: list[list[str]] = []
    monkeypatch.setattr(tuning, "one_core_matmul_flops",
                        lambda dtypes: calls.append(dtypes) or {dtype: flops[dtype] for dtype in dtypes})
    return calls


def test_the_cache_file_is_used_on_the_second_call(monkeypatch, measurements):
    calls = counted(monkeypatch, {"float32": 1e11, "bfloat16": 3e11})
    monkeypatch.setattr(tuning, "physical_cores", lambda: 2)
    assert tuning.measured_cpu_peak_flops("float32", threads=2) == 2e11
    monkeypatch.setattr(tuning, "_this_process", {})  # a new process on the same machine
    assert tuning.measured_cpu_peak_flops("float32", threads=4) == 2e11 and calls == [["float32"]]  # 2 cores
    assert tuning.cpu_bf16_speedup() == 3.0 and tuning.cpu_bf16_speedup() == 3.0
    assert calls == [["float32"], ["float32", "bfloat16"]]
    saved = json.loads(measurements.read_text())
    assert list(saved) == [tuning.machine_key()]
    assert saved[tuning.machine_key()] == {"bf16_speedup": 3.0, "core_flops": {"float32": 1e11, "bfloat16": 3e11}}
    key = tuning.machine_key()
    assert tuning.cpu_model() in key and f"{tuning.physical_cores()} cores" in key and torch.__version__ in key


def test_the_peak_is_a_maximum(monkeypatch, measurements, fresh_threads):
    counted(monkeypatch, {"float32": 1e11})
    monkeypatch.setattr(tuning, "physical_cores", lambda: 2)
    assert tuning.measured_cpu_peak_flops(threads=2) == 2e11
    assert tuning.raise_cpu_peak("float32", 3e11, threads=2) == 3e11  # a faster rate raises it
    assert tuning.raise_cpu_peak("float32", 1e11, threads=2) == 3e11  # a slower one leaves it
    assert tuning.raise_cpu_peak("float32", 1e11, threads=1) == 1.5e11  # below the 1.5e11 a core it has
    monkeypatch.setattr(tuning, "_this_process", {})
    assert tuning.measured_cpu_peak_flops(threads=2) == 3e11  # remembered for the next run
    torch.set_num_threads(1)  # a thread tuner's trial, say, while a step of a 2-thread run is logged
    assert tuning.raise_cpu_peak("float32", 3.2e11, threads=2) == 3.2e11  # counted against the run's 2 cores


def test_the_cache_is_written_atomically_and_never_through_a_link(monkeypatch, measurements):
    counted(monkeypatch, {"float32": 1e11})
    measurements.parent.mkdir(parents=True)
    elsewhere = measurements.parent.parent / "elsewhere.json"
    elsewhere.write_text(json.dumps({tuning.machine_key(): {"core_flops": {"float32": 9e15}}}))
    measurements.symlink_to(elsewhere)
    assert tuning.measured_cpu_peak_flops() < 9e15  # a link is not read
    assert not measurements.is_symlink() and json.loads(elsewhere.read_text())[tuning.machine_key()] == {
        "core_flops": {"float32": 9e15}}  # nor written through: the link itself was replaced
    assert [path.name for path in measurements.parent.iterdir()] == [measurements.name]  # no temporary left
    measurements.write_text("{not json")
    monkeypatch.setattr(tuning, "_this_process", {})
    assert tuning.measured_cpu_peak_flops() > 0 and json.loads(measurements.read_text())  # rewritten whole


def test_a_cache_that_cannot_be_written_still_measures_once_per_process(monkeypatch, measurements):
    calls = counted(monkeypatch, {"float32": 1e11})
    measurements.parent.parent.mkdir(parents=True, exist_ok=True)
    measurements.parent.write_text("a file where the folder should be")
    assert tuning.measured_cpu_peak_flops() == tuning.measured_cpu_peak_flops() and len(calls) == 1


def test_the_one_core_measurement_is_sane(measurements):
    flops = tuning.one_core_matmul_flops(["float32"])
    assert 1e8 < flops["float32"] < 1e14
    first = tuning.cpu_bf16_speedup()
    assert first > 0 and tuning.cpu_bf16_speedup() == first


def test_cpu_peak_is_measured(measurements):
    from nanogpt_cli.runtime import peak_flops

    flops, why = peak_flops(CPU, "float32")
    assert flops > 1e8 and "measured float32 matmul" in why


# ---------------------------------------------------------------- host memory

FAULTS = """
import resource, torch
from nanogpt_cli.cpu_tuning import keep_freed_host_memory
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


@pytest.mark.skipif(not platform.libc_ver()[0] == "glibc", reason="glibc's malloc only")
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
