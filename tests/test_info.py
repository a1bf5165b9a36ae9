"""`ngpt info`: the environment report for bug reports, as text and as JSON."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from nanogpt_cli import __version__
from nanogpt_cli.cli import app
from nanogpt_cli.info import compile_support, cpu_features, environment_report
from nanogpt_cli.report import environment_rows
from nanogpt_cli.runtime import choose_compile, choose_dtype, resolve_device

runner = CliRunner()


def test_report_is_a_plain_json_serialisable_dict():
    report = environment_report(measure=False)
    assert json.loads(json.dumps(report)) == report
    assert report["ngpt"] == __version__ and report["torch"] == torch.__version__
    assert {"python", "platform", "cuda", "cudnn", "device", "compile", "cpu", "threads", "packages"} <= set(report)
    device = resolve_device("auto")
    assert report["device"]["device"] == str(device)
    # the precision `ngpt train` uses (on cpu it may be bf16, measured), and the one sample and eval use
    assert (report["device"]["dtype"], report["device"]["dtype_why"]) == choose_dtype(device, "auto", training=True)
    assert (report["device"]["dtype_inference"], report["device"]["dtype_inference_why"]) == choose_dtype(device,
                                                                                                          "auto")
    assert (report["device"]["compile"], report["device"]["compile_why"]) == choose_compile(device, None)
    assert report["threads"]["torch"] == torch.get_num_threads()
    labels = [label for label, _ in environment_rows(report)]
    assert "peak FLOP/s" in labels and "torch.compile usable" in labels and "CPU features" in labels


def test_cpu_features_and_compile_support():
    features = cpu_features()
    assert {"avx2", "avx512", "avx512_bf16", "amx", "torch_capability", "fast_bf16"} <= set(features)
    assert all(features[k] in (True, False, None) for k in ("avx2", "avx512", "avx512_bf16", "amx"))
    assert features["inference_matmuls"] in ("mkl", "onednn")
    assert features["int8_matmuls"].startswith(("ngpt's native kernel (", "torch's _weight_int8pack_mm ("))
    assert features["float32_batch_matmuls"] in ("ngpt's native kernel", "as the inference matmuls")
    support = compile_support()
    assert support["usable"] == (support["torch_compile"] and support["inductor"] and bool(support["c_compiler"]))
    assert support["why"]


def test_compile_is_not_usable_without_a_c_compiler(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    support = compile_support()
    assert support["usable"] is False and "compiler" in support["why"]


def test_info_json_on_stdout_with_measured_cpu_peak():
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ngpt"] == __version__ and report["torch"] == torch.__version__
    if report["device"]["device"] == "cpu":
        assert report["device"]["peak_flops"] > 1e8 and "measured" in report["device"]["peak_flops_source"]


def test_info_text():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.stderr
    for text in ("ngpt:", "torch:", "CUDA:", "cuDNN:", "python:", "platform:", "device (auto):", "peak FLOP/s:",
                 "dtype ngpt picks:", "compile ngpt picks:", "torch.compile usable:", "AVX2", "AVX512-BF16", "AMX",
                 "threads:"):
        assert text in result.stdout, text
    assert "\x1b[" not in result.stdout
