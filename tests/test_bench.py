"""`ngpt bench`: timing, --json, --profile (a Chrome trace), --compare (ratios), and benchmarks/bench_train.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nanogpt_cli.bench import PROFILER_LINE, bench, parse_compare, profiler_output_dropped
from nanogpt_cli.cli import app
from nanogpt_cli.errors import UsageError

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16",
        "--batch_size=2", "--gradient_accumulation_steps=1", "--vocab_size=128", "--max_iters=10"]


def ngpt(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def last_json(text: str):
    return json.loads(text.strip().splitlines()[-1])


def test_a_short_synthetic_bench(tiny_cfg):
    cfg = tiny_cfg("--dataset=synthetic", "--vocab_size=128", "--dtype=auto")
    result = bench(cfg, iters=3, warmup=1)
    assert result.iters == 3 and result.ms_per_iter > 0 and result.tokens_per_second > 0
    assert result.tokens_per_iter == 4 * 32 and result.params_millions > 0
    assert result.device == "cpu" and result.dtype in ("float32", "bfloat16") and result.dtype_why
    assert result.compile is False and result.compile_why == "asked for"
    assert result.threads >= 1 and result.threads_why
    assert result.peak_flops > 0 and "measured" in result.peak_flops_source and 0 < result.mfu < 1
    assert result.peak_memory_mb > 10 and result.memory_kind == "process peak RSS"
    assert result.trace is None and result.top_ops == []


def test_bench_times_training_steps_under_an_eval_preset_without_changing_its_config(tiny_cfg):
    cfg = tiny_cfg("--dataset=synthetic", "--vocab_size=128", "--eval_only=True")
    result = bench(cfg, iters=1, warmup=0)
    assert result.iters == 1 and result.final_loss > 0 and cfg.eval_only is True


def test_bench_json_and_text(tmp_path):
    data = ngpt("bench", *TINY, f"--out_dir={tmp_path}", "--iters", "2", "--warmup", "1", "--json")
    result = last_json(data.stdout)
    assert result["iters"] == 2 and result["tokens_per_second"] > 0 and result["dtype_why"]
    assert {"mfu", "peak_memory_mb", "compile_why", "threads", "peak_flops_source", "warmup_seconds"} <= set(result)
    text = ngpt("bench", *TINY, f"--out_dir={tmp_path}", "--iters", "2", "--warmup", "0").stdout
    assert "ms/iter" in text and "tokens/s" in text and "MFU" in text and "peak memory" in text
    assert "dtype " in text and "compile False: asked for" in text and "threads " in text


def test_bench_on_a_prepared_dataset(data_dir, tmp_path):
    result = last_json(ngpt("bench", "--data", "real", *TINY, "--vocab_size=auto", "--dataset=tiny_char",
                            f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--iters", "2", "--warmup", "0",
                            "--json").stdout)
    assert result["final_loss"] > 0


def test_profile_writes_a_chrome_trace_and_prints_the_top_operators(tmp_path):
    trace = tmp_path / "traces" / "step.json"
    text = ngpt("bench", *TINY, f"--out_dir={tmp_path}", "--iters", "2", "--warmup", "1", "--profile",
                "--trace", str(trace)).stdout
    assert trace.is_file() and trace.stat().st_size > 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::" in str(e.get("name", "")) for e in events)
    assert "top operators" in text and "aten::" in text and str(trace) in text
    # the default place is under out_dir; --json carries the trace path and the operators
    result = last_json(ngpt("bench", *TINY, f"--out_dir={tmp_path / 'out'}", "--iters", "1", "--warmup", "0",
                            "--profile", "--json").stdout)
    assert result["trace"] == str(tmp_path / "out" / "bench-trace.json")
    assert json.loads(Path(result["trace"]).read_text())["traceEvents"]
    ops = result["top_ops"]
    assert ops and all(op["self_ms_per_iter"] >= 0 and op["calls_per_iter"] > 0 for op in ops)
    assert sorted((op["percent"] for op in ops), reverse=True) == [op["percent"] for op in ops]


def test_profile_keeps_the_profilers_own_lines_off_stderr(tmp_path):
    """kineto writes its log lines (USDT:/STAGE: ... profiler_start) from C++, past Python's sys.stderr."""
    proc = subprocess.run([sys.executable, "-m", "nanogpt_cli", "bench", *TINY, f"--out_dir={tmp_path}", "--iters",
                           "1", "--warmup", "0", "--profile", "--json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout)["top_ops"]
    leaked = [line for line in proc.stderr.splitlines() if PROFILER_LINE.search(line) or "profiler" in line.lower()]
    assert not leaked, proc.stderr


def test_what_else_is_written_to_stderr_while_profiling_still_shows(capfd):
    with profiler_output_dropped():
        os.write(2, b"USDT:2026-01-01 10:00:00 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"STAGE:2026-01-01 10:00:00 1:1 ActivityProfilerController.cpp:312] Completed Stage: Warm Up\n")
        os.write(2, b"error: a real problem\n")
        sys.stderr.write("note: the cores are busy\n")
    assert sorted(capfd.readouterr().err.splitlines()) == ["error: a real problem", "note: the cores are busy"]


def test_compare_runs_each_value_and_prints_ratios(tmp_path):
    text = ngpt("bench", *TINY, f"--out_dir={tmp_path}", "--iters", "2", "--warmup", "1",
                "--compare", "dtype=float32,bfloat16").stdout
    assert "ratio" in text and "1.00x" in text and "float32" in text and "bfloat16" in text
    result = last_json(ngpt("bench", *TINY, f"--out_dir={tmp_path}", "--iters", "2", "--warmup", "0",
                            "--compare", "batch_size=2,4", "--json").stdout)
    assert result["compare"] == "batch_size"
    first, second = result["results"]
    assert first["label"] == "batch_size=2" and second["label"] == "batch_size=4"
    assert first["ratio"] == 1.0 and second["tokens_per_iter"] == 2 * first["tokens_per_iter"]
    assert second["ratio"] == pytest.approx(second["tokens_per_second"] / first["tokens_per_second"])


def test_compare_with_profile_writes_one_trace_per_configuration(tmp_path):
    ngpt("bench", *TINY, f"--out_dir={tmp_path}", "--iters", "1", "--warmup", "0", "--compare",
         "compile=False,False", "--profile", "--trace", str(tmp_path / "t.json"), "--json")
    assert (tmp_path / "t-compile_False.json").is_file()


def test_bad_compare_specs():
    keys = {"dtype", "compile"}
    assert parse_compare("dtype=float32,bfloat16", keys) == ("dtype", ["float32", "bfloat16"])
    assert parse_compare("--compile = False, True", keys) == ("compile", ["False", "True"])
    for spec in ("dtype", "dtype=float32", "=a,b", "colour=red,blue"):
        with pytest.raises(UsageError):
            parse_compare(spec, keys)
    result = runner.invoke(app, ["bench", *TINY, "--compare", "dtype=float32,float8"])
    assert result.exit_code == 2 and "dtype" in result.stderr  # every value is validated before any runs


@pytest.mark.slow
def test_bench_train_script_quick_mode_runs(tmp_path):
    """The benchmark script in --quick mode (tiny configs, a few iterations) so that it cannot rot."""
    env = {k: v for k, v in os.environ.items() if k != "NGPT_TEST_SHAKESPEARE"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--quick", "--json",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wall-time ratio baseline/ngpt " in proc.stdout and "tokens/s ratio ngpt/baseline" in proc.stdout
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["recipe"]["wall_ratio"] > 0 and results["gpt2"]["tokens_ratio"] > 0
    sides = [r["side"] for r in results["recipe"]["runs"]]
    assert sides == ["baseline", "ngpt", "ngpt+threads"]
    baseline, ours, adaptive = results["gpt2"]["runs"]
    assert baseline["dtype"] == "float32" and baseline["compile"] is False
    assert re.search(r"threads (\d+): OMP_NUM_THREADS=\1", baseline["choices"]) and "exact reruns" in ours["choices"]
    assert "measured" in adaptive["choices"] or "one core" in adaptive["choices"]


@pytest.mark.gpu
def test_a_cuda_bench_reports_the_data_sheet_peak_and_gpu_memory(tiny_cfg):
    import torch

    from nanogpt_cli.runtime import gpu_peak_flops

    cfg = tiny_cfg("--device=cuda", "--dataset=synthetic", "--vocab_size=128", "--dtype=auto", "--compile=False")
    result = bench(cfg, iters=5, warmup=2)
    name = torch.cuda.get_device_name()
    assert result.device.startswith("cuda") and result.tokens_per_second > 0
    assert result.dtype == ("bfloat16" if torch.cuda.get_device_capability() >= (8, 0) else "float16")
    assert result.peak_memory_mb > 0 and "cuda" in result.memory_kind.lower()
    if gpu_peak_flops(name) is None:
        assert result.mfu is None and "unknown GPU" in result.peak_flops_source
    else:
        assert result.peak_flops == gpu_peak_flops(name) and 0 < result.mfu < 1
        assert "data sheet" in result.peak_flops_source


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory) -> Path:
    from nanogpt_cli.config import TrainConfig, build
    from nanogpt_cli.train import train
    from tests.conftest import TINY as TRAIN_TINY
    from tests.conftest import write_char_dataset

    root = tmp_path_factory.mktemp("bench-generate")
    write_char_dataset(root / "data")
    train(build(TrainConfig, None, [*TRAIN_TINY, f"--data_dir={root / 'data'}", f"--out_dir={root / 'out'}",
                                    "--max_iters=3"]))
    return root / "out"


def test_bench_generate_times_prefill_and_decoding_against_the_memory_bandwidth(sampled_run):
    runs = {}
    for quantize in ("none", "int8"):
        data = ngpt("bench", "--generate", f"--out_dir={sampled_run}", "--device=cpu", "--max_new_tokens=6",
                    f"--quantize={quantize}", "--json")
        runs[quantize] = result = last_json(data.stdout)
        assert result["new_tokens"] == 6 and result["num_samples"] == 1 and result["quantize"] == quantize
        for key in ("load_seconds", "time_to_first_token", "prefill_tokens_per_second", "decode_tokens_per_second",
                    "ms_per_token", "matmul_ms_per_token", "weight_read_gb_per_s", "copy_gb_per_s", "peak_memory_mb"):
            assert result[key] > 0, key
        assert result["decode_tokens_per_second"] == pytest.approx(1000 / result["ms_per_token"])
        assert result["step_over_matmuls"] == pytest.approx(result["ms_per_token"] / result["matmul_ms_per_token"])
        assert result["bandwidth_fraction"] == pytest.approx(result["weight_read_gb_per_s"] / result["copy_gb_per_s"])
    assert runs["int8"]["params_millions"] == runs["none"]["params_millions"]
    assert runs["int8"]["weight_bytes_per_token"] < runs["none"]["weight_bytes_per_token"] / 2
    text = ngpt("bench", "--generate", f"--out_dir={sampled_run}", "--device=cpu", "--max_new_tokens=3").stdout
    assert "time to first token" in text and "tokens/s" in text and "of a memory copy" in text
    assert "its matrix products alone" in text


@pytest.mark.parametrize("max_passes, expected", [
    (256, ["step", "matmuls"] + ["step", "matmuls"] * 4),  # after every decoding step
    (2, ["step", "matmuls"] + ["step", "matmuls", "step"] * 2),  # 4 steps, at most 2 passes: after every 2nd
])
def test_bench_generate_times_the_products_alone_between_the_decoding_steps(sampled_run, monkeypatch, max_passes,
                                                                            expected):
    from nanogpt_cli import bench_generate as bg
    from nanogpt_cli.config import SampleConfig, build
    from nanogpt_cli.generate import BatchDecoder

    order = []
    step, matmuls = BatchDecoder.step, bg.MatmulPass.__call__
    monkeypatch.setattr(BatchDecoder, "step", lambda self: order.append("step") or step(self))
    monkeypatch.setattr(bg.MatmulPass, "__call__", lambda self: order.append("matmuls") or matmuls(self))
    monkeypatch.setattr(bg, "MAX_MATMUL_PASSES", max_passes)
    cfg = build(SampleConfig, None, [f"--out_dir={sampled_run}", "--device=cpu", "--max_new_tokens=5"])
    result = bg.bench_generate(cfg)
    assert order == expected  # the prefill, then a pass that picks the kernels, then the decoding
    assert result.new_tokens == 5 and result.matmul_ms_per_token > 0


def test_bench_generate_needs_a_decoding_step_to_time(sampled_run):
    result = ngpt("bench", "--generate", f"--out_dir={sampled_run}", "--max_new_tokens=1", code=2)
    assert "--max_new_tokens must be at least 2, got 1" in result.stderr


def test_bench_generate_refuses_training_options(sampled_run):
    result = ngpt("bench", "--generate", f"--out_dir={sampled_run}", "--compare", "dtype=float32,bfloat16", code=2)
    assert "--generate times decoding" in result.stderr
