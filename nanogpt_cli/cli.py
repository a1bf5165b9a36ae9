"""The `ngpt` command: one thin function per subcommand, no torch math here.

Each command builds one validated config (defaults < preset < command line), calls a plain
function (train, sample, evaluate, bench), and turns errors into one line and an exit code.
"""

from __future__ import annotations

import json
import shlex
import sys
from typing import Annotated

import typer

from nanogpt_cli import __version__
from nanogpt_cli.cli_data import data_app, prepare_app
from nanogpt_cli.config import (
    SampleConfig,
    ServeConfig,
    TrainConfig,
    build,
    help_epilog,
    list_presets,
    load_preset,
    preset_description,
    to_dict,
    to_toml,
)
from nanogpt_cli.errors import UsageError, report_errors
from nanogpt_cli.progress import console, echo, out

app = typer.Typer(
    name="ngpt",
    help="Train, finetune, sample, evaluate and benchmark GPT-2-class language models.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.add_typer(prepare_app, name="prepare")
app.add_typer(data_app, name="data")

# Config keys are parsed by config.parse_overrides, not by click: they arrive as extra args.
CONFIG_KEYS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["-h", "--help"]}
PresetOption = Annotated[str | None, typer.Option(
    "--preset", help="a preset name (see `ngpt presets`) or a path to a .toml file")]
JsonOption = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]


def config_args(ctx: typer.Context) -> list[str]:
    return [a for a in ctx.args if a != "--debug"]


def version_callback(value: bool) -> None:
    if value:
        echo(f"ngpt {__version__}\n")
        raise typer.Exit()


@app.callback()
@report_errors
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks instead of one-line errors")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only errors and data (samples, JSON, "
                                        "results); no logs or progress")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="a log line per step even on a terminal "
                                          "(no live bar), plus debug details")] = False,
) -> None:
    """ngpt: nanoGPT as one installable command. Start with `ngpt prepare shakespeare-char`.

    Data (samples, JSON, results) goes to stdout; logs and progress go to stderr, without colour or live
    bars when it is not a terminal or NO_COLOR is set. Shell completion: `ngpt --install-completion`.
    """
    from nanogpt_cli.progress import configure

    configure(quiet=quiet, verbose=verbose)


def _finish_training(result, command: str) -> None:
    """A run stopped by SIGINT/SIGTERM saved a checkpoint: say how to resume it, exit 130 / 143 (128 + signal)."""
    if not result.stopped_by:
        return
    import os

    from nanogpt_cli.errors import current_context

    ctx = current_context()
    if ctx is not None:  # the command as given (also right when invoked in-process, where sys.argv is not ours)
        preset = ctx.params.get("preset")
        args = [command, *(["--preset", preset] if preset else []), *ctx.args]
    else:
        args = [command, *sys.argv[2:]]
    kept, skip = [], False
    for arg in args:  # drop --init_from X / --init_from=X: the resume replaces it
        if skip:
            skip = False
        elif arg.replace("-", "_") == "__init_from":
            skip = True
        elif not arg.replace("-", "_").startswith("__init_from="):
            kept.append(arg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prog = f"torchrun --nproc_per_node={world} -m nanogpt_cli" if world > 1 else "ngpt"
    if int(os.environ.get("RANK", "0")) == 0:  # printed even with --quiet: it says what the exit code means
        print(f"stopped by {result.stopped_by} at iteration {result.iter_num}; checkpoint saved. Resume with:\n"
              f"  {prog} {shlex.join(kept)} --init_from=resume", file=sys.stderr, flush=True)
    raise typer.Exit(130 if result.stopped_by == "SIGINT" else 143)


# `ngpt train --nproc-per-node N ...` = `torchrun --nproc-per-node N -m nanogpt_cli train ...`
LAUNCH = "Multi-process (through torchrun)"
NprocOption = Annotated[int | None, typer.Option(
    "--nproc-per-node", min=1, rich_help_panel=LAUNCH, show_default=False,
    help="start N processes on this node (one per GPU) with PyTorch's launcher, torch.distributed.run")]
NnodesOption = Annotated[int, typer.Option("--nnodes", min=1, rich_help_panel=LAUNCH,
                                           help="number of machines; run the same command on each")]
NodeRankOption = Annotated[int, typer.Option("--node-rank", min=0, rich_help_panel=LAUNCH,
                                             help="this machine's index, 0 to nnodes-1")]
MasterAddrOption = Annotated[str | None, typer.Option("--master-addr", rich_help_panel=LAUNCH, show_default=False,
                                                      help="address of node 0, reachable from every node")]
MasterPortOption = Annotated[int | None, typer.Option("--master-port", rich_help_panel=LAUNCH, show_default=False,
                                                      help="a free TCP port on node 0 [default: 29500]")]


def _launch_if_asked(ctx: typer.Context, command: str, preset: str | None, nproc: int | None, nnodes: int,
                     node_rank: int, master_addr: str | None, master_port: int | None) -> None:
    """With launcher options, run this command again under torchrun (in this process) and exit with its code."""
    if nproc is None and nnodes == 1 and node_rank == 0 and master_addr is None and master_port is None:
        return
    import os

    from nanogpt_cli.distributed import launch, launcher_args

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise UsageError("--nproc-per-node/--nnodes start torchrun, but this process already is a torchrun "
                         "worker: drop them (or run `ngpt train --nproc-per-node N ...` without torchrun)")
    build(TrainConfig, preset, config_args(ctx))  # bad keys fail here, once, not in N processes
    torchrun_args = launcher_args(nproc or 1, nnodes, node_rank, master_addr, master_port)
    root = ctx.find_root().params  # the global flags reach the workers through the environment
    for flag in ("debug", "quiet", "verbose"):
        if root.get(flag):
            os.environ[f"NGPT_{flag.upper()}"] = "1"
    raise typer.Exit(launch(torchrun_args, [command, *(["--preset", preset] if preset else []), *ctx.args],
                            nproc or 1))


@app.command(context_settings=CONFIG_KEYS, epilog=help_epilog(TrainConfig))
@report_errors
def train(
    ctx: typer.Context,
    preset: PresetOption = None,
    nproc_per_node: NprocOption = None,
    nnodes: NnodesOption = 1,
    node_rank: NodeRankOption = 0,
    master_addr: MasterAddrOption = None,
    master_port: MasterPortOption = None,
) -> None:
    """Train a GPT from scratch, or resume a run with --init_from=resume.

    Example: ngpt train --preset shakespeare-char --max_iters=2000 --device=cpu

    On 8 GPUs: ngpt train --nproc-per-node 8 --preset gpt2-124m (--strategy=fsdp shards the model)
    """
    from nanogpt_cli.train import train as run_training

    _launch_if_asked(ctx, "train", preset, nproc_per_node, nnodes, node_rank, master_addr, master_port)
    cfg = build(TrainConfig, preset, config_args(ctx))
    _finish_training(run_training(cfg), "train")


@app.command(context_settings=CONFIG_KEYS, epilog=help_epilog(TrainConfig))
@report_errors
def finetune(
    ctx: typer.Context,
    preset: PresetOption = None,
    nproc_per_node: NprocOption = None,
    nnodes: NnodesOption = 1,
    node_rank: NodeRankOption = 0,
    master_addr: MasterAddrOption = None,
    master_port: MasterPortOption = None,
) -> None:
    """Finetune pretrained weights (gpt2*, a Hugging Face folder, or an ngpt checkpoint) on a dataset.

    Example: ngpt finetune --preset finetune-shakespeare --init_from=gpt2 (--nproc-per-node N: N processes)
    """
    from nanogpt_cli.train import train as run_training

    _launch_if_asked(ctx, "finetune", preset, nproc_per_node, nnodes, node_rank, master_addr, master_port)
    cfg = build(TrainConfig, preset, config_args(ctx))
    if cfg.init_from == "scratch":
        raise UsageError("finetune starts from weights: set --init_from to gpt2*, a Hugging Face folder or an "
                         "ngpt checkpoint (or use `ngpt train` to start from scratch)")
    _finish_training(run_training(cfg), "finetune")


@app.command(context_settings=CONFIG_KEYS, epilog=help_epilog(SampleConfig))
@report_errors
def sample(
    ctx: typer.Context,
    preset: PresetOption = None,
    as_json: JsonOption = False,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="read prompts from stdin, one per line, "
                                              "until EOF, an empty line or 'exit'; the model loads once")] = False,
) -> None:
    """Generate text from a checkpoint (--out-dir) or a pretrained GPT-2 (--init_from=gpt2).

    One sample streams as it is generated; several are one batch, each under a "sample i/n" header.
    Example: ngpt sample --out-dir out/shakespeare-char --prompt "ROMEO:" --num-samples 3
    Prompts: --prompt TEXT, --prompt - (stdin), --prompt-file PATH, --start=FILE:PATH, or --interactive.
    """
    from nanogpt_cli.sample import run_sample_command

    cfg = build(SampleConfig, preset, config_args(ctx))
    code = run_sample_command(cfg, as_json=as_json, interactive=interactive)
    if code:
        raise typer.Exit(code)


@app.command(context_settings=CONFIG_KEYS, epilog=help_epilog(ServeConfig))
@report_errors
def serve(ctx: typer.Context, preset: PresetOption = None) -> None:
    """Serve a model over HTTP with OpenAI's API (completions, chat, streaming) and a playground page at /.

    Concurrent requests are decoded as one batch. Needs the serve extra: pip install 'nanogpt-cli[serve]'.
    Example: ngpt serve --out-dir out/shakespeare-char (then open http://127.0.0.1:8000)
    With the openai client: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    """
    from nanogpt_cli.serve import serve as run_server

    run_server(build(ServeConfig, preset, config_args(ctx)))


@app.command("eval", context_settings=CONFIG_KEYS, epilog=help_epilog(TrainConfig))
@report_errors
def eval_command(
    ctx: typer.Context,
    preset: PresetOption = None,
    task: Annotated[list[str] | None, typer.Option(
        "--task", metavar="NAME", rich_help_panel="Zero-shot benchmarks", show_default=False,
        help="hellaswag or lambada (repeat the option, or hellaswag,lambada, for both); the dataset's loss is then "
             "evaluated only when --dataset is given")] = None,
    hellaswag_file: Annotated[str | None, typer.Option(
        "--hellaswag-file", metavar="PATH", rich_help_panel="Zero-shot benchmarks", show_default=False,
        help="a local hellaswag_val.jsonl (implies --task hellaswag); without it, downloaded once into the cache")]
    = None,
    lambada_file: Annotated[str | None, typer.Option(
        "--lambada-file", metavar="PATH", rich_help_panel="Zero-shot benchmarks", show_default=False,
        help="a local lambada_test.jsonl, OpenAI's GPT-2 version (implies --task lambada); without it, "
             "downloaded once into the cache")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, metavar="N", rich_help_panel="Zero-shot benchmarks", show_default=False,
        help="score only the first N examples of each benchmark")] = None,
    as_json: JsonOption = False,
) -> None:
    """Loss and perplexity on a prepared dataset's splits, and zero-shot HellaSwag / LAMBADA accuracy.

    Example: ngpt eval --out-dir out/shakespeare-char --dataset shakespeare_char --init_from=resume
    Zero-shot: ngpt eval --init_from=gpt2 --task hellaswag --task lambada (--limit 500 for a quick look)
    """
    from nanogpt_cli.config import parse_overrides
    from nanogpt_cli.evaluate import evaluate
    from nanogpt_cli.zeroshot import parse_tasks, zeroshot

    cfg = build(TrainConfig, preset, config_args(ctx))
    if cfg.init_from == "scratch":
        cfg.init_from = "resume"
    files = {"hellaswag": hellaswag_file, "lambada": lambada_file}
    tasks = parse_tasks([*(task or []), *(name for name, path in files.items() if path is not None)])
    if limit is not None and not tasks:
        raise UsageError("--limit applies to the zero-shot benchmarks: add --task hellaswag or --task lambada")
    # with benchmarks, a dataset's loss only when asked for by name (a preset's default dataset may not be prepared)
    with_dataset = not tasks or "dataset" in parse_overrides(config_args(ctx), TrainConfig)
    loaded = None
    if tasks and with_dataset:  # both: the model is loaded once, after the benchmark files are found
        from nanogpt_cli.checkpoint import load_model
        from nanogpt_cli.zeroshot import benchmark_file

        for name in tasks:
            benchmark_file(name, files.get(name))
        loaded = load_model(cfg.init_from, cfg.out_dir)[:2]
    report = evaluate(cfg, loaded) if with_dataset else {}
    if tasks:
        report = {**report, **zeroshot(cfg, tasks, files, limit, loaded)}
    if as_json:
        echo(json.dumps(report) + "\n")
        return
    from rich.table import Table

    if "dataset" in report:
        table = Table(title=f"{report['model']} on {report['dataset']}")
        for column in ("split", "loss", "perplexity"):
            table.add_column(column)
        for split in ("train", "val"):
            table.add_row(split, f"{report[f'{split}_loss']:.4f}", f"{report[f'{split}_perplexity']:.2f}")
        out.print(table)
    if tasks:
        table = Table(title=f"{report['model']}, zero-shot (block_size {report['block_size']})")
        for column in ("task", "examples", "accuracy", "acc_norm", "perplexity"):
            table.add_column(column)
        for name in tasks:
            r = report[name]
            norm = f"{r['accuracy_norm']:.4f}" if "accuracy_norm" in r else "-"
            ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
            table.add_row(name, str(r["examples"]), f"{r['accuracy']:.4f}", norm, ppl)
        out.print(table)


@app.command(context_settings=CONFIG_KEYS, epilog=help_epilog(TrainConfig))
@report_errors
def bench(
    ctx: typer.Context,
    preset: PresetOption = None,
    data: Annotated[str, typer.Option(help="synthetic (random tokens, no prepared data needed) or real (the "
                                           "dataset of the preset or --dataset)")] = "synthetic",
    iters: Annotated[int, typer.Option(help="timed iterations", min=1)] = 20,
    warmup: Annotated[int, typer.Option(help="untimed iterations first (compile, allocator warm-up)", min=0)] = 5,
    compare: Annotated[str | None, typer.Option(
        help="run each value of one config key and show the ratios to the first, e.g. dtype=float32,bfloat16 "
             "or compile=False,True")] = None,
    profile: Annotated[bool, typer.Option(
        "--profile", help="also run a few steps under torch.profiler: write a Chrome trace and print the top "
                          "operators")] = False,
    trace: Annotated[str | None, typer.Option(
        help="where --profile writes the trace (default: OUT_DIR/bench-trace.json)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Time training steps: ms/iter, tokens/s, MFU against this device's peak, peak memory.

    Example: ngpt bench --preset gpt2-124m --batch_size=4 --block_size=256 --compare dtype=float32,bfloat16
    """
    from dataclasses import fields

    from nanogpt_cli.bench import bench as run_bench
    from nanogpt_cli.bench import compare as run_compare
    from nanogpt_cli.bench import parse_compare

    if data not in ("synthetic", "real"):
        raise UsageError(f"--data must be synthetic or real, got {data!r}")
    args = config_args(ctx)

    def make_cfg(*extra: str) -> TrainConfig:
        cfg = build(TrainConfig, preset, [*args, *extra])
        if data == "synthetic":
            cfg.dataset = "synthetic"
        return cfg

    if compare:
        key, values = parse_compare(compare, {f.name for f in fields(TrainConfig)})
        configs = [(f"{key}={value}", make_cfg(f"--{key}={value}")) for value in values]  # all validated first
        rows = run_compare(configs, iters, warmup, profile, trace,
                           on_result=None if as_json else _print_bench_top_ops)
        if as_json:
            echo(json.dumps({"compare": key, "results": rows}) + "\n")
        else:
            _print_bench_compare(key, rows)
        return
    result = run_bench(make_cfg(), iters=iters, warmup=warmup, profile=profile, trace_path=trace)
    if as_json:
        echo(json.dumps(result.as_dict()) + "\n")
        return
    _print_bench_top_ops(None, result)
    _print_bench_result(result)


def _fmt_mfu(mfu: float | None) -> str:
    return f"{mfu * 100:.2f}%" if mfu is not None else "unknown"


def _print_bench_choices(result) -> None:
    from nanogpt_cli.progress import out

    out.print(f"[bold]{result.params_millions:.2f}M[/bold] parameters, {result.tokens_per_iter:,} tokens/iter on "
              f"[bold]{result.device}[/bold]; {result.iters} timed iterations after "
              f"{result.warmup_seconds:.1f} s of warm-up")
    out.print(f"  dtype {result.dtype}: {result.dtype_why}", style="dim")
    out.print(f"  compile {result.compile}: {result.compile_why}", style="dim")
    if result.threads is not None:
        out.print(f"  threads {result.threads}: {result.threads_why}", style="dim")
    peak = f"{result.peak_flops / 1e12:.2f} TFLOP/s" if result.peak_flops else "unknown"
    out.print(f"  peak {peak} ({result.peak_flops_source}); memory: {result.memory_kind}", style="dim")


def _print_bench_result(result) -> None:
    from nanogpt_cli.progress import out

    _print_bench_choices(result)
    out.print(f"[bold]{result.ms_per_iter:.1f} ms/iter[/bold], [bold]{result.tokens_per_second:,.0f} tokens/s"
              f"[/bold], MFU {_fmt_mfu(result.mfu)}, peak memory {result.peak_memory_mb:,.0f} MB")
    if result.per_rank_tokens_per_second:
        out.print(f"{result.world_size} processes: " + ", ".join(
            f"rank {r} {t:,.0f}" for r, t in enumerate(result.per_rank_tokens_per_second))
            + f" tokens/s; total {result.tokens_per_second:,.0f} tokens/s (MFU is per process)")


def _print_bench_top_ops(label: str | None, result) -> None:
    if not result.trace:
        return
    from rich.table import Table

    from nanogpt_cli.progress import out

    table = Table(title=f"top operators{f' ({label})' if label else ''}, by self "
                        f"{result.top_ops[0]['time'] if result.top_ops else 'cpu'} time", title_justify="left")
    for column in ("operator", "ms/iter", "%", "calls/iter"):
        table.add_column(column, justify="left" if column == "operator" else "right")
    for op in result.top_ops:
        table.add_row(op["name"][:70], f"{op['self_ms_per_iter']:.2f}", f"{op['percent']:.1f}",
                      f"{op['calls_per_iter']:g}")
    out.print(table)
    out.print(f"trace: {result.trace} (open in https://ui.perfetto.dev or chrome://tracing)")


def _print_bench_compare(key: str, rows: list[dict]) -> None:
    from rich.table import Table

    from nanogpt_cli.progress import out

    first = rows[0]
    out.print(f"[bold]{first['params_millions']:.2f}M[/bold] parameters on [bold]{first['device']}[/bold], "
              f"{first['iters']} timed iterations each; ratio: tokens/s over {first['label']}")
    table = Table()
    columns = [(key, lambda r: r["label"].partition("=")[2]), ("ms/iter", lambda r: f"{r['ms_per_iter']:.1f}"),
               ("tokens/s", lambda r: f"{r['tokens_per_second']:,.0f}"), ("MFU", lambda r: _fmt_mfu(r["mfu"])),
               ("peak MB", lambda r: f"{r['peak_memory_mb']:,.0f}")]
    for name in ("dtype", "compile", "threads"):  # the choices, where they differ between the runs
        if name != key and len({str(r[name]) for r in rows}) > 1:
            columns.append((name, lambda r, name=name: str(r[name])))
    columns += [("warm-up s", lambda r: f"{r['warmup_seconds']:.1f}"), ("ratio", lambda r: f"{r['ratio']:.2f}x")]
    for name, _ in columns:
        table.add_column(name, justify="left" if name == key else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(cell(row) for _, cell in columns))
    out.print(table)
    for name, why in (("dtype", "dtype_why"), ("compile", "compile_why")):
        chosen = [r for r in rows if r[why] != "asked for"]
        if chosen and len({(r[name], r[why]) for r in chosen}) == 1:
            out.print(f"  {name} {chosen[0][name]}: {chosen[0][why]}", style="dim")
        else:
            for row in chosen:
                out.print(f"  {row['label']}: {name} {row[name]}: {row[why]}", style="dim")


@app.command()
@report_errors
def export(
    out_dir: Annotated[str, typer.Argument(help="an ngpt out_dir (or checkpoint file), or gpt2* / a Hugging Face "
                                                 "folder to re-export")],
    dest: Annotated[str, typer.Argument(help="the folder to write")],
    to: Annotated[str, typer.Option("--to", help="export format: hf (a transformers GPT2LMHeadModel folder)")] = "hf",
    force: Annotated[bool, typer.Option("--force", help="write into a non-empty DEST")] = False,
) -> None:
    """Export a checkpoint to a Hugging Face folder that transformers' GPT2LMHeadModel loads.

    Example: ngpt export out/shakespeare-char --to hf hf-shakespeare-char
    """
    from pathlib import Path

    from nanogpt_cli.checkpoint import load_model
    from nanogpt_cli.hf import export_hf

    if to != "hf":
        raise UsageError(f"unknown export format {to!r}; the only one is hf")
    target = Path(dest).expanduser()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not force)):
        raise UsageError(f"{dest} exists and is not an empty folder; choose another DEST or add --force")
    try:
        model, meta, _ = load_model(out_dir, out_dir)
    except UsageError as e:  # its message names --init_from, the training key; here the source is an argument
        if not str(e).startswith("unknown init_from"):
            raise
        raise UsageError(f"cannot export {out_dir!r}: not an ngpt out_dir or checkpoint file, gpt2*, or a Hugging "
                         "Face folder or hub id") from None
    path = export_hf(model, target, meta)
    console.print(f"wrote {path} (load it with transformers.GPT2LMHeadModel.from_pretrained({str(path)!r}))")


presets_app = typer.Typer(help="List the presets, or show one's resolved values.\n\nExample: ngpt presets; "
                               "ngpt presets show shakespeare-char", no_args_is_help=False)
app.add_typer(presets_app, name="presets")


@presets_app.callback(invoke_without_command=True)
@report_errors
def presets_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the presets that ship with ngpt.

    Example: ngpt presets
    """
    if ctx.invoked_subcommand:
        return
    names = list_presets()
    if as_json:
        echo(json.dumps({name: preset_description(name) for name in names}) + "\n")
        return
    for name in names:
        out.print(f"[bold]{name:<22}[/bold] {preset_description(name)}")


@presets_app.command("show")
@report_errors
def presets_show(name: Annotated[str, typer.Argument(help="preset name or .toml path")],
                 as_json: JsonOption = False) -> None:
    """Show a preset's resolved values (defaults with the preset applied), as TOML.

    Example: ngpt presets show shakespeare-char
    """
    from nanogpt_cli.config import _field_types

    keys = load_preset(name)
    cls = TrainConfig if set(keys) <= set(_field_types(TrainConfig)) else SampleConfig
    cfg = build(cls, name, [])
    echo(json.dumps(to_dict(cfg)) + "\n" if as_json else to_toml(cfg))


@app.command()
@report_errors
def info(as_json: JsonOption = False) -> None:
    """Report versions, the device and its peak FLOP/s, compile support, CPU features and ngpt's choices.

    Include this output in bug reports. Example: ngpt info --json
    """
    from nanogpt_cli.info import environment_report, report_rows
    from nanogpt_cli.progress import out

    report = environment_report()
    if as_json:
        echo(json.dumps(report) + "\n")
        return
    from rich.text import Text

    for label, value in report_rows(report):  # plain lines: easy to paste into an issue
        out.print(Text.assemble((f"{label + ':':<22}", "bold"), value))


@app.command()
@report_errors
def plot(
    out_dirs: Annotated[list[str], typer.Argument(help="run folders (out_dir) with a metrics.jsonl",
                                                  show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="the image to write (PNG; .svg and .pdf work too)")]
    = "loss.png",
    title: Annotated[str | None, typer.Option(help="the chart's title")] = None,
    log_y: Annotated[bool, typer.Option("--log-y", help="a logarithmic loss axis")] = False,
) -> None:
    """Draw train and val loss curves of one or more runs to an image (needs the `plot` extra).

    Example: ngpt plot out/shakespeare-char out/other-run --output loss.png
    """
    from nanogpt_cli.plot import plot_runs

    path = plot_runs(out_dirs, output, title=title, log_scale=log_y)
    console.print(f"wrote {path}", markup=False)


def main() -> None:
    """The console script: click's own usage errors (a bad option, a missing argument, an unknown
    command) become one `error:` line and exit 2, like the project's errors."""
    from typer._click import exceptions as click_errors

    try:
        code = typer.main.get_command(app).main(prog_name="ngpt", standalone_mode=False)
    except click_errors.NoArgsIsHelpError:  # `ngpt` or a group alone: the help was printed already
        code = 0
    except click_errors.ClickException as e:
        message = " ".join(e.format_message().split()).rstrip(".")
        if isinstance(e, click_errors.UsageError) and e.ctx is not None:
            message += f"; see `{e.ctx.command_path} --help`"
        print(f"error: {message}", file=sys.stderr)
        code = e.exit_code
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        code = 130
    raise SystemExit(code if isinstance(code, int) else 0)
