"""The one native library: weight-only int8 products on a CPU at the speed of memory (`kernels/int8_linear.c`),
and in the same file the float32 product of a batched decoding step's few rows, which oneDNN and MKL compute
far from the bandwidth on an AVX2 EPYC and MKL on an Ice Lake Xeon (`precision.native_rows_linear`), and a
decoding step's attention of one query per row and MLP activation, which torch's kernels spend longer setting up
than computing (`ops`).

torch has no weight-only int8 product that streams at the bandwidth on a CPU: `_weight_int8pack_mm` is
compute-bound (on a 2-core Xeon with AMX it reads GPT-2 124M's int8 matrices at 11-12 GB/s where a read runs at
19-27), fbgemm's dynamic linear quantizes the activations too (and is deprecated), and inductor's code for the
same product measured 2 GB/s. So `ngpt` carries one small C file, built on first use with the machine's C compiler
(`$CC`, else `cc`; `-O3 -march=native -fopenmp`, 0.2 s) into ngpt's cache, one library per CPU and source, and
called through ctypes (which releases the GIL). Where there is no compiler, no OpenMP, or `NGPT_NATIVE=0`,
`int8_kernel()` is None and `precision.int8_linear` uses torch's kernel: the same weights, bf16 activations.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
from pathlib import Path

from nanogpt_cli.atomic import temp_folder
from nanogpt_cli.config import cache_dir
from nanogpt_cli.cpu_tuning import _cpuinfo_field, cpu_model

SOURCE = Path(__file__).with_name("kernels") / "int8_linear.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
BUILD_SECONDS = 120  # a compiler that hangs must not hang ngpt
ACTIVATIONS = {"gelu_new": 1, "relu2": 2}  # the MLP activations the kernels compute, by their `act` number
NORMS = {"layer_norm": 1, "rms_norm": 2}  # the norms the kernels compute, by their `norm` number


class Int8Kernel:
    """ngpt_int8_linear of one built library, and the instruction set it was built for ("avx512", "avx2",
    "generic")."""

    NORMS = NORMS

    def __init__(self, library: Path):
        self.library = library
        self._lib = ctypes.CDLL(str(library))
        if not self._lib.ngpt_int8_supported():
            raise OSError(f"{library.name} was built for instructions this CPU does not have")
        self._lib.ngpt_int8_path.restype = ctypes.c_char_p
        self.path = self._lib.ngpt_int8_path().decode()
        self._fn = self._lib.ngpt_int8_linear
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
                             + [ctypes.c_void_p] * 2 + [ctypes.c_int, ctypes.c_float])
        self._float = self._lib.ngpt_f32_linear
        self._float.restype = None
        self._float.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        self._quantize = self._lib.ngpt_int8_quantize
        self._quantize.restype = None
        self._quantize.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int]
        self._attention = self._lib.ngpt_attention_step
        self._attention.restype = None
        self._attention.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 10 + [ctypes.c_int]
        self._activation = self._lib.ngpt_activation
        self._activation.restype = None
        self._activation.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_int]
        self._norm = self._lib.ngpt_norm
        self._norm.restype = None
        self._norm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int, ctypes.c_float]
        self._sample = self._lib.ngpt_sample
        self._sample.restype = ctypes.c_int
        self._sample.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 2

    def __call__(self, x, weight, scales, bias, out, rows: int, threads: int, residual=None, activation=None,
                 norm=None) -> None:
        """out = x @ (weight * scales[:, None]).T + bias (+ residual, where given) for `rows` rows: contiguous
        float32 x (rows, in), out and residual (rows, out) in any shape of that size, float32 scales and bias (or
        None) of out values, contiguous int8 weight (out, in), all on the CPU (the caller checks:
        `precision.int8_linear`). The sum is rounded as residual + (the product) would be. With an activation
        (a name of ACTIVATIONS; then no residual), out = the activation of the product, bit for bit
        `activation`'s. With a norm (kind, gain, bias, eps: a name of NORMS, float32 tensors of in values or None),
        x's rows are normalised first, in the same call, bit for bit `norm` and then the product."""
        kind, gain, shift, eps = norm or (None, None, None, 0.0)
        check(self._fn(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), None if bias is None else bias.data_ptr(),
                       None if residual is None else residual.data_ptr(), out.data_ptr(), rows, weight.size(0),
                       weight.size(1), threads, ACTIVATIONS[activation] if activation else 0,
                       None if gain is None else gain.data_ptr(), None if shift is None else shift.data_ptr(),
                       NORMS[kind] if kind else 0, eps))

    def float_linear(self, x, weight, bias, out, rows: int, threads: int) -> None:
        """out = x @ weight.T + bias for `rows` rows, all float32 on the CPU: contiguous x (rows, in) and out
        (rows, out) in any shape of that size, contiguous weight (out, in), bias (or None) of out values (the
        caller checks: `precision.native_rows_linear`). The product of a batched decoding step's few rows."""
        self._float(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
                    rows, weight.size(0), weight.size(1), threads)

    def attention(self, q, k, v, out, counts, threads: int) -> None:
        """out = F.scaled_dot_product_attention(q, k, v) for one query per row: float32 q (B, nh, 1, hs) and k, v
        (B, nh, L, hs) on the CPU with a contiguous last dimension and k's strides v's, contiguous out of q's shape;
        row b sees its first counts[b] keys (a contiguous int64 tensor of B values on the CPU; None: all L). The
        caller checks (`ops.one_query_attention`)."""
        B, nh, L, hs = k.shape
        self._attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                        None if counts is None else counts.data_ptr(), None, None, -1, B, nh, L, hs, q.stride(0),
                        q.stride(1), k.stride(0), k.stride(1), k.stride(2), threads)

    def activation(self, name: str, x, out) -> None:
        """out = the MLP's activation `name` (a name of ACTIVATIONS: "gelu_new", GELU's tanh form, or "relu2", ReLU
        squared) of x, both contiguous float32 on the CPU with as many values (the caller checks:
        `ops.activation`); one thread."""
        self._activation(x.data_ptr(), out.data_ptr(), x.numel(), ACTIVATIONS[name])

    def norm(self, kind: str, x, gain, bias, out, eps: float) -> None:
        """out = the norm `kind` (a name of NORMS: "layer_norm", "rms_norm") of x's rows over its last dimension,
        with gain and bias (float32 tensors of as many values, or None); x and out contiguous float32 on the CPU
        with as many values (the caller checks: `ops.norm`); one thread."""
        self._norm(x.data_ptr(), None if gain is None else gain.data_ptr(), None if bias is None else bias.data_ptr(),
                   out.data_ptr(), x.numel() // x.size(-1), x.size(-1), NORMS[kind], eps)

    def sample(self, logits, top_k: int, temperature: float, uniforms, out) -> bool:
        """out (rows, 1) int64 = the next token of each row of float32 logits (rows, n) on the CPU with a contiguous
        last dimension: greedy at temperature 0, else drawn at uniforms[row] (float64, one per row, in [0, 1)) from
        the softmax at temperature of the top_k largest values and those tied with the k-th (0: all), as
        `generate.sample_next` draws (the caller checks: `ops.sample`); one thread. False where a row holds a NaN,
        a +inf or nothing finite to sample: out is then not to be read."""
        status = self._sample(logits.data_ptr(), logits.size(0), logits.size(1), logits.stride(0), top_k,
                              temperature, None if uniforms is None else uniforms.data_ptr(), out.data_ptr())
        check(min(status, 0))
        return status == 0

    def quantize(self, weight, quantized, scales, threads: int) -> None:
        """quantized (out, in) int8 and scales (out,) float32 of a contiguous float32 weight (out, in) on the CPU:
        `precision.quantize_rows`' formula, bit for bit."""
        self._quantize(weight.data_ptr(), quantized.data_ptr(), scales.data_ptr(), weight.size(0), weight.size(1),
                       threads)


def check(status: int) -> None:
    """A kernel's status: -1 is memory it could not allocate."""
    if status:
        raise MemoryError("ngpt's native kernel could not allocate its working memory")


def _cpu_key() -> str:
    """What `-march=native` builds for: the CPU's model and feature flags (a cache shared between machines
    must not hand one CPU another's instructions)."""
    flags = _cpuinfo_field("flags") or _cpuinfo_field("Features") or ""  # x86, ARM
    return f"{platform.machine()} {cpu_model()} {flags}"


def library_path(extra_flags: tuple[str, ...] = (), folder: Path | None = None) -> Path:
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, *extra_flags, _cpu_key()]).encode())
    return (folder or cache_dir() / "kernels") / f"int8_linear-{digest.hexdigest()[:16]}.so"


def _trusted(library: Path) -> bool:
    """A regular file (not a link), this user's, that nobody else can write: a library ngpt may load."""
    try:
        st = os.lstat(library)
    except OSError:
        return False
    mine = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    return stat.S_ISREG(st.st_mode) and mine and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def build(extra_flags: tuple[str, ...] = (), folder: Path | None = None) -> Int8Kernel:
    """The kernel, compiled first unless this CPU's library is in the cache already (as a file of this user's
    that loads: anything else at its name is replaced). Raises OSError or subprocess.SubprocessError where it
    cannot be built or loaded."""
    library = library_path(extra_flags, folder)
    if _trusted(library):
        try:
            return Int8Kernel(library)
        except (OSError, AttributeError):  # a truncated or foreign file: built again below
            pass
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (set CC)")
    library.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = temp_folder(library)
    try:
        built = work / library.name
        subprocess.run([compiler, *FLAGS, *extra_flags, str(SOURCE), "-o", str(built), *LIBS], check=True,
                       capture_output=True, timeout=BUILD_SECONDS, stdin=subprocess.DEVNULL)
        os.chmod(built, 0o755)
        os.replace(built, library)  # whole or not at all; a link planted at the name is replaced, not followed
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Int8Kernel(library)


def int8_kernel() -> Int8Kernel | None:
    """This machine's kernel, or None where it cannot be had (then torch's kernel is used)."""
    return _int8_kernel()[0]


def int8_kernel_status() -> str:
    """What runs int8 products here, in words: the kernel and its instruction set, or why torch's does."""
    kernel, why = _int8_kernel()
    return f"ngpt's native kernel ({kernel.path})" if kernel else f"torch's _weight_int8pack_mm ({why})"


@functools.cache
def _int8_kernel() -> tuple[Int8Kernel | None, str]:
    if os.environ.get("NGPT_NATIVE", "1") == "0":
        return None, "NGPT_NATIVE=0"
    try:
        return build(), ""
    except subprocess.CalledProcessError as e:
        first = (e.stderr or b"").decode(errors="replace").strip().splitlines()[:1]
        return None, "the C compiler failed" + (f": {first[0]}" if first else "")
    except subprocess.TimeoutExpired:
        return None, f"the C compiler ran past {BUILD_SECONDS} s"
    except (OSError, AttributeError, UnicodeDecodeError) as e:
        return None, str(e) or type(e).__name__
