"""The tables and lines that commands print for people: the results of eval, bench, prepare, data, info and
presets, on stdout (`out`), and the end-of-training summary table (TrainProgress logs it on stderr).

Each function takes the plain result the command's own function returned (a dict, a BenchResult, a list of
rows): the same result that `--json` prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex

from rich.table import Table
from rich.text import Text

from nanogpt_cli.info import CPU_FLAGS
from nanogpt_cli.limits import size_text
from nanogpt_cli.progress import console, is_verbose, out

# ---------------------------------------------------------------- training


def config_line(config: dict, verbose: bool = False) -> str:
    """The run's config on one line: what differs from its preset (or from the defaults), every key with verbose."""
    from nanogpt_cli.config import TrainConfig, build
    from nanogpt_cli.errors import UsageError

    preset = config.get("preset")
    try:
        baseline = dataclasses.asdict(build(TrainConfig, preset) if preset else TrainConfig())
    except UsageError:  # the preset is gone or changed since the run began: compare with the defaults
        baseline = dataclasses.asdict(TrainConfig())
    shown = {key: value for key, value in config.items() if key != "preset" and (verbose or baseline[key] != value)}
    pairs = "  ".join(f"{key}={'auto' if value is None else value}" for key, value in shown.items())
    origin = f"preset {preset}" if preset else "defaults"
    if verbose:
        return f"[bold]config[/bold] ({origin})  {pairs}"
    return f"[bold]config[/bold] {origin}" + (f" with {pairs}" if pairs else "") + "  (every key: --verbose)"


def print_training_start(config: dict, runtime, params: int, tokens_per_iter: int, warnings: list[str]) -> None:
    """The resolved config, the runtime's choices and the model's size, on stderr, once a run's setup has worked
    (a refused run prints only its error line)."""
    console.print(config_line(config, verbose=is_verbose()), style="dim")
    for warning in warnings:
        console.print(warning)
    console.print(runtime.describe())
    peak, peak_why = runtime.peak
    console.print(f"[bold]model[/bold] {count_text(params)} parameters  [bold]tokens/iter[/bold] {tokens_per_iter:,}"
                  f"  [bold]peak[/bold] {f'{peak / 1e12:.2f} TFLOP/s' if peak else 'unknown'} ({peak_why})")


def count_text(n: int) -> str:
    """A count in the unit that keeps its digits: 850, 23.4K, 0.80M-999.99M (nanoGPT's unit), 1.56B."""
    if n < 1000:
        return str(n)
    if n < 100_000:
        return f"{n / 1e3:.1f}K"
    if n < 1e9:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e9:.2f}B"


# ---------------------------------------------------------------- presets


def print_presets(descriptions: dict[str, str]) -> None:
    for name, description in descriptions.items():
        out.print(f"[bold]{name:<22}[/bold] {description}")


# ---------------------------------------------------------------- eval


def print_eval(report: dict) -> None:
    """The loss table (when a dataset was evaluated) and the zero-shot table (when benchmarks were run)."""
    if "dataset" in report:
        table = Table(title=f"{report['model']} on {report['dataset']}")
        bpb = "val_bpb" in report
        for column in ("split", "loss", "perplexity", *(["bits/byte"] if bpb else [])):
            table.add_column(column)
        for split in ("train", "val"):
            table.add_row(split, f"{report[f'{split}_loss']:.4f}", f"{report[f'{split}_perplexity']:.2f}",
                          *([f"{report[f'{split}_bpb']:.4f}"] if bpb else []))
        out.print(table)
    tasks = {name: result for name, result in report.items() if isinstance(result, dict)}
    if tasks:
        table = Table(title=f"{report['model']}, zero-shot (block_size {report['block_size']})")
        for column in ("task", "examples", "accuracy", "acc_norm", "perplexity"):
            table.add_column(column)
        for name, result in tasks.items():
            norm = f"{result['accuracy_norm']:.4f}" if "accuracy_norm" in result else "-"
            perplexity = f"{result['perplexity']:.2f}" if "perplexity" in result else "-"
            table.add_row(name, str(result["examples"]), f"{result['accuracy']:.4f}", norm, perplexity)
        out.print(table)


# ---------------------------------------------------------------- bench


def _mfu_text(mfu: float | None) -> str:
    return f"{mfu * 100:.2f}%" if mfu is not None else "unknown"


def _print_bench_choices(result) -> None:
    out.print(f"[bold]{result.params_millions:.2f}M[/bold] parameters, {result.tokens_per_iter:,} tokens/iter on "
              f"[bold]{result.device}[/bold]; {result.iters} timed iterations after "
              f"{result.warmup_seconds:.1f} s of warm-up")
    out.print(f"  dtype {result.dtype}: {result.dtype_why}", style="dim")
    out.print(f"  compile {result.compile}: {result.compile_why}", style="dim")
    if result.threads is not None:
        out.print(f"  threads {result.threads}: {result.threads_why}", style="dim")
    peak = f"{result.peak_flops / 1e12:.2f} TFLOP/s" if result.peak_flops else "unknown"
    out.print(f"  peak {peak} ({result.peak_flops_source}); memory: {result.memory_kind}", style="dim")


def print_bench(result) -> None:
    """One bench.BenchResult: what was measured on what, with ngpt's choices and their reasons."""
    _print_bench_choices(result)
    out.print(f"[bold]{result.ms_per_iter:.1f} ms/iter[/bold], [bold]{result.tokens_per_second:,.0f} tokens/s"
              f"[/bold], MFU {_mfu_text(result.mfu)}, peak memory {result.peak_memory_mb:,.0f} MB")
    if result.per_rank_tokens_per_second:
        out.print(f"{result.world_size} processes: " + ", ".join(
            f"rank {rank} {tokens:,.0f}" for rank, tokens in enumerate(result.per_rank_tokens_per_second))
            + f" tokens/s; total {result.tokens_per_second:,.0f} tokens/s (MFU is per process)")


def print_bench_generate(result) -> None:
    """One bench_generate.GenerateBenchResult: start-up, prefill, decoding and its share of the memory bandwidth."""
    precision = result.dtype + (", int8 weights" if result.quantize == "int8" else "")
    out.print(f"[bold]{result.params_millions:.2f}M[/bold] parameters on [bold]{result.device}[/bold] ({precision}, "
              f"{result.threads} threads): {result.prompt_tokens}-token prompt, {result.new_tokens} new tokens x "
              f"{result.num_samples}")
    out.print(f"  load {result.load_seconds:.2f} s, time to first token {result.time_to_first_token * 1000:.0f} ms "
              f"(prefill {result.prefill_tokens_per_second:,.0f} tokens/s)")
    out.print(f"[bold]decode {result.decode_tokens_per_second:,.1f} tokens/s[/bold] ({result.ms_per_token:.1f} "
              f"ms/token); weights {result.weight_bytes_per_token / 1e6:,.1f} MB/token = "
              f"{result.weight_read_gb_per_s:.1f} GB/s, {result.bandwidth_fraction:.0%} of a memory copy's "
              f"{result.copy_gb_per_s:.1f} GB/s")
    out.print(f"  its matrix products alone {result.matmul_ms_per_token:.1f} ms/token: the step takes "
              f"{result.step_over_matmuls:.2f}x that")
    out.print(f"  peak memory {result.peak_memory_mb:,.0f} MB ({result.memory_kind})", style="dim")


def print_top_operators(label: str | None, result) -> None:
    """The profiler's costliest operators of a bench run with --profile (nothing without a trace)."""
    if not result.trace:
        return
    table = Table(title=f"top operators{f' ({label})' if label else ''}, by self "
                        f"{result.top_ops[0]['time'] if result.top_ops else 'cpu'} time", title_justify="left")
    for column in ("operator", "ms/iter", "%", "calls/iter"):
        table.add_column(column, justify="left" if column == "operator" else "right")
    for op in result.top_ops:
        table.add_row(op["name"][:70], f"{op['self_ms_per_iter']:.2f}", f"{op['percent']:.1f}",
                      f"{op['calls_per_iter']:g}")
    out.print(table)
    out.print(f"trace: {result.trace} (open in https://ui.perfetto.dev or chrome://tracing)")


def print_bench_compare(key: str, rows: list[dict]) -> None:
    """bench.compare's rows as one table, a row per value of `key`, with the ratios to the first."""
    first = rows[0]
    out.print(f"[bold]{first['params_millions']:.2f}M[/bold] parameters on [bold]{first['device']}[/bold], "
              f"{first['iters']} timed iterations each; ratio: tokens/s over {first['label']}")
    table = Table()
    columns = [(key, lambda row: row["label"].partition("=")[2]),
               ("ms/iter", lambda row: f"{row['ms_per_iter']:.1f}"),
               ("tokens/s", lambda row: f"{row['tokens_per_second']:,.0f}"),
               ("MFU", lambda row: _mfu_text(row["mfu"])),
               ("peak MB", lambda row: f"{row['peak_memory_mb']:,.0f}")]
    for name in ("dtype", "compile", "threads"):  # the choices, where they differ between the runs
        if name != key and len({str(row[name]) for row in rows}) > 1:
            columns.append((name, lambda row, name=name: str(row[name])))
    columns += [("warm-up s", lambda row: f"{row['warmup_seconds']:.1f}"),
                ("ratio", lambda row: f"{row['ratio']:.2f}x")]
    for name, _ in columns:
        table.add_column(name, justify="left" if name == key else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(cell(row) for _, cell in columns))
    out.print(table)
    for name, why in (("dtype", "dtype_why"), ("compile", "compile_why")):
        chosen = [row for row in rows if row[why] != "asked for"]
        if chosen and len({(row[name], row[why]) for row in chosen}) == 1:
            out.print(f"  {name} {chosen[0][name]}: {chosen[0][why]}", style="dim")
        else:
            for row in chosen:
                out.print(f"  {row['label']}: {name} {row[name]}: {row[why]}", style="dim")


# ---------------------------------------------------------------- prepare and data


def print_prepared(summary: dict) -> None:
    """A prepare recipe's summary as a table, or one line when nothing needed doing."""
    if summary["status"] == "up to date":
        out.print(f"{summary['name']}: up to date ({summary['path']}); use --force to rebuild", markup=False)
        return
    table = Table(title=f"prepared {summary['name']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [("documents", f"{summary['documents']:,}"),
            ("tokens", f"{summary['train_tokens'] + summary['val_tokens']:,}"),
            ("train", f"{summary['train_tokens']:,}"), ("val", f"{summary['val_tokens']:,}"),
            ("tokenizer", f"{summary['tokenizer']} (vocab {summary['vocab_size']:,})"),
            ("dtype", summary["dtype"]), ("files", "\n".join(summary["files"])),
            ("time", f"{summary['seconds']:.1f} s")]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def print_datasets(rows: list[dict], root) -> None:
    """prepare.list_datasets' rows: name, tokenizer, tokens per split, size, source."""
    if not rows:
        out.print(f"no datasets in {root}; make one with `ngpt prepare shakespeare-char`", markup=False)
        return
    table = Table(title=f"datasets in {root}", title_justify="left")
    for column in ("name", "tokenizer", "train", "val", "size", "source"):
        # every column but the source keeps its width; a long source wraps
        table.add_column(column, justify="right" if column in ("train", "val", "size") else "left",
                         no_wrap=column != "source", overflow="fold")
    for row in rows:
        if "error" in row:
            table.add_row(row["name"], "-", "-", "-", "-", row["error"])
            continue
        tokens = row["tokens"]
        table.add_row(row["name"], row["tokenizer"], f"{tokens.get('train', 0):,}", f"{tokens.get('val', 0):,}",
                      size_text(row["bytes"]), str(row["source"]))
    out.print(table)


def print_dataset_info(meta: dict) -> None:
    """prepare.dataset_info's meta.json, a row per key."""
    table = Table(title=meta["path"], show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in meta.items():
        if key == "itos":  # the whole vocabulary is in --json; here, a preview
            value = "".join(value).encode("unicode_escape").decode()
            value = value[:60] + ("..." if len(value) > 60 else "")
        elif key == "splits":
            value = "\n".join(f"{split}: {info['tokens']:,} tokens ({info['file']})" for split, info in value.items())
        elif key == "bytes":
            value = size_text(value)
        elif isinstance(value, dict):
            value = json.dumps(value)
        table.add_row(key, str(value))
    out.print(table)


# ---------------------------------------------------------------- info


def _yes_no(value) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def _flops_text(value: float | None) -> str:
    if not value:
        return "unknown"
    return f"{value / 1e12:.1f} TFLOP/s" if value >= 1e12 else f"{value / 1e9:.1f} GFLOP/s"


MATMUL_KERNELS = {"onednn": "oneDNN (MKL is slow on this CPU)", "mkl": "torch's (MKL)"}


def environment_rows(report: dict) -> list[tuple[str, str]]:
    """info.environment_report() as (label, value) rows."""
    device, support, cpu, threads = report["device"], report["compile"], report["cpu"], report["threads"]
    peak = device.get("peak_flops")
    rows = [
        ("ngpt", report["ngpt"]),
        ("python", report["python"]),
        ("platform", report["platform"]),
        ("torch", report["torch"]),
        ("CUDA", f"{report['cuda'] or 'none (CPU build)'}"
                 f"{'' if report['cuda_available'] or not report['cuda'] else ' (no GPU visible)'}"),
        ("cuDNN", str(report["cudnn"] or "none")),
        ("MPS", _yes_no(report["mps_available"])),
        ("device (auto)", f"{device['device']}" + (f": {device['name']}" if device.get("name") else "")
         + (f", {device['memory_gb']} GiB, sm {device['capability']}, {device['count']} GPU(s)"
            if "memory_gb" in device else "")),
        ("peak FLOP/s", f"{_flops_text(peak)} ({device['peak_flops_source']})"
         + (f"; bfloat16 {_flops_text(device['peak_flops_bf16'])}" if device.get("peak_flops_bf16") else "")),
        ("dtype ngpt picks", f"train/finetune {device['dtype']} ({device['dtype_why']}); sample/eval "
                             f"{device['dtype_inference']}" + ("" if device["dtype_inference"] == device["dtype"]
                                                               else f" ({device['dtype_inference_why']})")),
        ("compile ngpt picks", f"{device['compile']} ({device['compile_why']})"),
        ("torch.compile usable", f"{_yes_no(support['usable'])}: {support['why']}"
                                 + (f" (compiler {support['c_compiler']})" if support["c_compiler"] else "")),
        ("CPU", f"{cpu['model']}"),
        ("CPU features", ", ".join(f"{name.upper().replace('_', '-')} {_yes_no(cpu[name])}" for name in CPU_FLAGS)
         + f"; torch kernels: {cpu['torch_capability'] or 'unknown'}; inference matmuls: "
         + MATMUL_KERNELS.get(cpu.get("inference_matmuls"), "-") + "; float32 batches of 2-16 rows: "
         + cpu.get("float32_batch_matmuls", "-") + "; int8 matmuls: " + cpu.get("int8_matmuls", "-")),
        ("threads", f"torch {threads['torch']} (interop {threads['interop']}), {threads['cpu_count']} CPUs"
                    + (f", OMP_NUM_THREADS={threads['OMP_NUM_THREADS']}" if threads["OMP_NUM_THREADS"] else "")),
        ("packages", ", ".join(f"{name} {version}" for name, version in report["packages"].items() if version)
         or "-"),
        ("not installed", ", ".join(name for name, version in report["packages"].items() if not version) or "-"),
    ]
    return rows


def print_environment(report: dict) -> None:
    for label, value in environment_rows(report):  # plain lines: easy to paste into an issue
        out.print(Text.assemble((f"{label + ':':<22}", "bold"), value))


# ---------------------------------------------------------------- training


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """A one-line picture of a curve: the loss at a glance in the end-of-run summary."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return ""
    if len(values) > width:  # average into `width` buckets
        step = len(values) / width
        values = [sum(chunk) / len(chunk) for i in range(width)
                  if (chunk := values[int(i * step):max(int(i * step) + 1, int((i + 1) * step))])]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - lo) / span * (len(SPARKS) - 1) + 0.5))] for v in values)


def training_summary(result, history: list[dict], out_dir, iters_run: int) -> Table:
    """The end of a training run: iterations, best and last losses, speed, loss sparklines, where it all is."""
    losses = [record["loss"] for record in history if "loss" in record]
    table = Table(title="training summary", show_header=False)
    table.add_row("iterations", f"{result.iter_num} ({iters_run} this run)")
    table.add_row("best val loss", f"{result.best_val_loss:.4f}" if result.best_val_loss < float("inf") else "-")
    if result.last_eval:
        table.add_row("last eval", f"train {result.last_eval['train']:.4f}, val {result.last_eval['val']:.4f}")
    table.add_row("wall time", f"{result.seconds:.1f} s")
    if result.tokens_per_second:
        table.add_row("tokens/s (last)", f"{result.tokens_per_second:,.0f}")
    if losses:
        table.add_row("train loss", f"{sparkline(losses)} {losses[0]:.3f} → {losses[-1]:.3f}")
    val_losses = [record["val_loss"] for record in history if "val_loss" in record]
    if len(val_losses) > 1:
        table.add_row("val loss", f"{sparkline(val_losses)} {val_losses[0]:.3f} → {val_losses[-1]:.3f}")
    table.add_row("out_dir", Text(f"{out_dir} (metrics.jsonl, config.toml)"))
    table.add_row("loss plot", Text(f"ngpt plot {shlex.quote(str(out_dir))}"))
    return table
