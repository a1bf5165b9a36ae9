"""The environment report behind `ngpt info`: what to paste into a bug report.

environment_report() returns a plain dict (JSON-serialisable): versions, the device `auto`
resolves to and its peak FLOP/s, whether torch.compile can work here, the CPU's features
and threads, and the precision and compile choice ngpt would make, with the reasons.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from importlib import metadata

OPTIONAL_PACKAGES = ("numpy", "tiktoken", "typer", "rich", "transformers", "datasets", "safetensors", "wandb",
                     "matplotlib", "triton")
CPU_FLAGS = {"avx2": "avx2", "avx512": "avx512f", "avx512_bf16": "avx512_bf16", "amx": "amx_bf16"}


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_features() -> dict:
    """AVX2, AVX512, AVX512-BF16 and AMX from /proc/cpuinfo (Linux), and the ISA torch's kernels use."""
    import torch

    flags: set[str] | None = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    features = {name: (flag in flags if flags is not None else None) for name, flag in CPU_FLAGS.items()}
    try:
        features["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        features["torch_capability"] = None
    from nanogpt_cli import native
    from nanogpt_cli.cpu_tuning import cpu_has_fast_bf16, cpu_model
    from nanogpt_cli.precision import cpu_linear_kernel, float_rows_native

    features["fast_bf16"] = cpu_has_fast_bf16()
    features["model"] = cpu_model()
    features["inference_matmuls"] = cpu_linear_kernel()  # what runs the Linear products of sample, serve and eval here
    features["int8_matmuls"] = native.int8_kernel_status()  # what runs --quantize int8's products (built if need be)
    features["float32_batch_matmuls"] = ("ngpt's native kernel" if float_rows_native(features["inference_matmuls"])
                                         else "as the inference matmuls")  # 2-16 float32 rows a decoding step
    return features


def compile_support() -> dict:
    """Can torch.compile work here? It needs torch >= 2.0, the inductor backend and a C compiler
    (plus triton for CUDA kernels)."""
    import torch

    report: dict = {"torch_compile": hasattr(torch, "compile")}
    try:
        import torch._inductor  # noqa: F401

        report["inductor"] = True
    except Exception:
        report["inductor"] = False
    names = [os.environ["CXX"]] if os.environ.get("CXX") else []
    names += ["c++", "g++", "clang++", "cc", "gcc", "clang"]
    compiler = next((path for name in names if (path := shutil.which(name))), None)
    report["c_compiler"] = compiler
    report["triton"] = package_version("triton") or package_version("pytorch-triton")
    problems = []
    if not report["torch_compile"]:
        problems.append("torch < 2.0")
    if not report["inductor"]:
        problems.append("the inductor backend does not import")
    if not compiler:
        problems.append("no C/C++ compiler on PATH (install gcc or clang)")
    report["usable"] = not problems
    report["why"] = "; ".join(problems) if problems else "inductor and a C compiler are present"
    if torch.cuda.is_available() and not report["triton"]:
        report["usable_on_cuda"] = False
        report["why"] += "; triton is missing, so CUDA kernels cannot be compiled"
    return report


def device_report(measure: bool = True) -> dict:
    """The device `auto` picks, its peak FLOP/s (measured on CPU), and ngpt's dtype/compile choice there."""
    import torch

    from nanogpt_cli.cpu_tuning import cpu_has_fast_bf16, cpu_model
    from nanogpt_cli.runtime import choose_compile, choose_dtype, peak_flops, resolve_device

    device = resolve_device("auto")
    # training and inference may differ: on cpu, train/finetune use bf16 autocast where measured to pay,
    # sample and eval stay float32
    train_dtype, train_dtype_why = choose_dtype(device, "auto", training=True)
    dtype, dtype_why = choose_dtype(device, "auto")
    use_compile, compile_why = choose_compile(device, None)
    report = {"device": str(device), "dtype": train_dtype, "dtype_why": train_dtype_why,
              "dtype_inference": dtype, "dtype_inference_why": dtype_why, "compile": use_compile,
              "compile_why": compile_why}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report["name"] = props.name
        report["memory_gb"] = round(props.total_memory / 2**30, 1)
        report["capability"] = f"{props.major}.{props.minor}"
        report["count"] = torch.cuda.device_count()
    elif device.type == "cpu":
        report["name"] = cpu_model()
    if measure or device.type != "cpu":
        flops, why = peak_flops(device, dtype)
        report["peak_flops"], report["peak_flops_source"] = flops, why
        if device.type == "cpu" and cpu_has_fast_bf16():  # what --dtype=bfloat16 could reach
            report["peak_flops_bf16"], _ = peak_flops(device, "bfloat16")
    else:
        report["peak_flops"], report["peak_flops_source"] = None, "not measured"
    return report


def environment_report(measure: bool = True) -> dict:
    """Everything `ngpt info` shows, as a JSON-serialisable dict. measure=False skips the CPU matmul timing."""
    import torch

    from nanogpt_cli import __version__

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "ngpt": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": cudnn,
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "device": device_report(measure),
        "compile": compile_support(),
        "cpu": cpu_features(),
        "threads": {"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                    "cpu_count": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "packages": {name: package_version(name) for name in OPTIONAL_PACKAGES},
    }
