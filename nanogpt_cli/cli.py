"""The `ngpt` command: one thin function per subcommand, no torch math here.

Each command builds one validated config (defaults < preset < command line), calls a plain
function (train, sample, run_eval, bench), prints its result (report.py's tables, or JSON) and turns
errors into one line and an exit code.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from typing import Annotated

import typer

from nanogpt_cli import __version__
from nanogpt_cli.atomic import stop_on_signals
from nanogpt_cli.cli_data import data_app, prepare_app
from nanogpt_cli.config import (
    EVAL_KEYS,
    SampleConfig,
    ServeConfig,
    TrainConfig,
    build,
    help_epilog,
    list_presets,
    parse_overrides,
    preset_description,
    resolve_preset,
    to_dict,
    to_toml,
)
from nanogpt_cli.errors import (
    UnknownInitFrom,
    UsageError,
    emit_error,
    one_line,
    report_errors,
    silence_stdout,
    write_stderr,
)
from nanogpt_cli.progress import console, echo
from nanogpt_cli.report import (
    print_bench,
    print_bench_compare,
    print_bench_generate,
    print_environment,
    print_eval,
    print_presets,
    print_top_operators,
)

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
def complete_preset(incomplete: str) -> list[str]:
    """`--preset <TAB>`: the shipped presets' names that start with what was typed."""
    return [name for name in list_presets() if name.startswith(incomplete)]


PresetOption = Annotated[str | None, typer.Option(
    "--preset", help="a preset name (see `ngpt presets`) or a path to a .toml file", autocompletion=complete_preset)]
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
        write_stderr(f"stopped by {result.stopped_by} at iteration {result.iter_num}; checkpoint saved. Resume "
                     f"with:\n  {prog} {shlex.join(kept)} --init_from=resume\n")
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
                     node_rank: int, master_addr: str | None, master_port: int | None,
                     flags: list[str] | None = None) -> None:
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
    raise typer.Exit(launch(torchrun_args, [command, *(["--preset", preset] if preset else []), *(flags or []),
                                            *ctx.args], nproc or 1))


def _add_training_command(name: str, finetune: bool, help_text: str) -> None:
    """Register `ngpt train` or `ngpt finetune`: the same options and the same loop; finetune starts from weights."""

    def command(
        ctx: typer.Context,
        preset: PresetOption = None,
        nproc_per_node: NprocOption = None,
        nnodes: NnodesOption = 1,
        node_rank: NodeRankOption = 0,
        master_addr: MasterAddrOption = None,
        master_port: MasterPortOption = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the run already in out_dir (its "
                                                "checkpoint, metrics and config) instead of refusing")] = False,
    ) -> None:
        from nanogpt_cli.train import run_config, train

        _launch_if_asked(ctx, name, preset, nproc_per_node, nnodes, node_rank, master_addr, master_port,
                         ["--overwrite"] if overwrite else [])
        cfg = run_config(preset, config_args(ctx), finetune)
        if finetune and cfg.init_from == "scratch":
            raise UsageError("finetune starts from weights: set --init_from to gpt2*, a Hugging Face folder or an "
                             "ngpt checkpoint (or use `ngpt train` to start from scratch)")
        _finish_training(train(cfg, overwrite=overwrite), name)

    command.__name__, command.__doc__ = name, help_text  # set before report_errors copies them for typer
    app.command(name, context_settings=CONFIG_KEYS, epilog=help_epilog(TrainConfig))(report_errors(command))


_add_training_command("train", finetune=False, help_text="""
    Train a GPT from scratch, or resume a run with --init_from=resume.

    Example: ngpt train --preset shakespeare-char --max_iters=2000 --device=cpu

    On 8 GPUs: ngpt train --nproc-per-node 8 --preset gpt2-124m (--strategy=fsdp shards the model)
    """)
_add_training_command("finetune", finetune=True, help_text="""
    Finetune pretrained weights (gpt2*, a Hugging Face folder, or an ngpt checkpoint) on a dataset.

    Example: ngpt finetune --preset finetune-shakespeare --init_from=gpt2 (--nproc-per-node N: N processes)
    """)


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


@app.command("eval", context_settings=CONFIG_KEYS, epilog=help_epilog(TrainConfig, EVAL_KEYS))
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
    from nanogpt_cli.evaluate import run_eval
    from nanogpt_cli.zeroshot import parse_tasks

    args = config_args(ctx)
    cfg = build(TrainConfig, preset, args)
    files = {"hellaswag": hellaswag_file, "lambada": lambada_file}
    tasks = parse_tasks([*(task or []), *(name for name, path in files.items() if path is not None)])
    result = run_eval(cfg, tasks, files, limit, dataset_named="dataset" in parse_overrides(args, TrainConfig))
    if as_json:
        echo(json.dumps(result) + "\n")
    else:
        print_eval(result)


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
    force: Annotated[bool, typer.Option(
        "--force", help="let --profile replace a file at the trace path that is not a previous trace")] = False,
    generate: Annotated[bool, typer.Option(
        "--generate", help="time decoding instead: load a model as `ngpt sample` does (its keys: --out_dir, "
                           "--init_from, --dtype, --quantize, --max_new_tokens [256], --num_samples [1], ...) and "
                           "report prefill, time to first token, decode tokens/s and the memory bandwidth used")]
    = False,
    as_json: JsonOption = False,
) -> None:
    """Time training steps: ms/iter, tokens/s, MFU against this device's peak, peak memory (--generate: decoding).

    Example: ngpt bench --preset gpt2-124m --batch_size=4 --block_size=256 --compare dtype=float32,bfloat16
    Decoding: ngpt bench --generate --out_dir out/gpt2-124m --quantize=int8
    """
    from nanogpt_cli.bench import bench as run_bench
    from nanogpt_cli.bench import compare as run_compare
    from nanogpt_cli.bench import parse_compare

    if data not in ("synthetic", "real"):
        raise UsageError(f"--data must be synthetic or real, got {data!r}")
    args = config_args(ctx)
    if generate:
        from nanogpt_cli.bench_generate import bench_generate

        if compare or profile:
            raise UsageError("--generate times decoding; --compare and --profile time training steps")
        sample_cfg = build(SampleConfig, preset, ["--max_new_tokens=256", "--num_samples=1", *args])
        if sample_cfg.max_new_tokens < 2:  # the first token is the prefill's: no step would be timed
            raise UsageError("--generate times decoding steps after the first token: --max_new_tokens must be at "
                             f"least 2, got {sample_cfg.max_new_tokens}")
        result = bench_generate(sample_cfg)
        if as_json:
            echo(json.dumps(result.as_dict()) + "\n")
        else:
            print_bench_generate(result)
        return

    def bench_config(*extra: str) -> TrainConfig:
        cfg = build(TrainConfig, preset, [*args, *extra])
        return dataclasses.replace(cfg, dataset="synthetic") if data == "synthetic" else cfg

    if compare:
        key, values = parse_compare(compare, {field.name for field in dataclasses.fields(TrainConfig)})
        configs = [(f"{key}={value}", bench_config(f"--{key}={value}")) for value in values]  # all validated first
        rows = run_compare(configs, iters, warmup, profile, trace, on_result=None if as_json else print_top_operators,
                           replace_any_trace=force)
        if as_json:
            echo(json.dumps({"compare": key, "results": rows}) + "\n")
        else:
            print_bench_compare(key, rows)
        return
    result = run_bench(bench_config(), iters=iters, warmup=warmup, profile=profile, trace_path=trace,
                       replace_any_trace=force)
    if as_json:
        echo(json.dumps(result.as_dict()) + "\n")
        return
    print_top_operators(None, result)
    print_bench(result)


@app.command()
@report_errors
@stop_on_signals()
def export(
    out_dir: Annotated[str, typer.Argument(help="an ngpt out_dir (or checkpoint file), or gpt2* / a Hugging Face "
                                                 "folder to re-export")],
    dest: Annotated[str, typer.Argument(help="the folder to write")],
    to: Annotated[str, typer.Option("--to", help="export format: hf (a transformers GPT2LMHeadModel folder)")] = "hf",
    force: Annotated[bool, typer.Option("--force", help="replace the previous export at DEST, all its files")] = False,
) -> None:
    """Export a checkpoint to a Hugging Face folder that transformers' GPT2LMHeadModel loads.

    Example: ngpt export out/shakespeare-char --to hf hf-shakespeare-char
    """
    from pathlib import Path

    from nanogpt_cli.checkpoint import load_model
    from nanogpt_cli.hf import check_export_destination, export_hf

    if to != "hf":
        raise UsageError(f"unknown export format {to!r}; the only one is hf")
    target = Path(dest).expanduser()
    check_export_destination(target, force)  # before the model loads: bad input fails fast
    try:
        model, meta, _ = load_model(out_dir, out_dir)
    except UnknownInitFrom:  # its message names --init_from, the training key; here the source is an argument
        raise UsageError(f"cannot export {out_dir!r}: not an ngpt out_dir or checkpoint file, gpt2*, or a Hugging "
                         "Face folder or hub id") from None
    path = export_hf(model, target, meta, replace=force)
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
    descriptions = {name: preset_description(name) for name in list_presets()}
    if as_json:
        echo(json.dumps(descriptions) + "\n")
    else:
        print_presets(descriptions)


@presets_app.command("show")
@report_errors
def presets_show(name: Annotated[str, typer.Argument(help="preset name or .toml path")],
                 as_json: JsonOption = False) -> None:
    """Show a preset's resolved values (defaults with the preset applied), as TOML.

    Example: ngpt presets show shakespeare-char
    """
    cfg = resolve_preset(name)
    echo(json.dumps(to_dict(cfg)) + "\n" if as_json else to_toml(cfg))


@app.command()
@report_errors
def info(as_json: JsonOption = False) -> None:
    """Report versions, the device and its peak FLOP/s, compile support, CPU features and ngpt's choices.

    Include this output in bug reports. Example: ngpt info --json
    """
    from nanogpt_cli.info import environment_report

    report = environment_report()
    if as_json:
        echo(json.dumps(report) + "\n")
    else:
        print_environment(report)


@app.command()
@report_errors
def plot(
    out_dirs: Annotated[list[str], typer.Argument(help="run folders (out_dir) with a metrics.jsonl",
                                                  show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="the image to write (PNG; .svg and .pdf work too)")]
    = "loss.png",
    title: Annotated[str | None, typer.Option(help="the chart's title")] = None,
    log_y: Annotated[bool, typer.Option("--log-y", help="a logarithmic loss axis")] = False,
    metric: Annotated[str, typer.Option(
        "--metric", help="loss, or bpb: the evaluations' bits per byte, which compare runs with different "
                         "tokenizers")] = "loss",
) -> None:
    """Draw train and val loss curves of one or more runs to an image (needs the `plot` extra).

    Example: ngpt plot out/shakespeare-char out/other-run --output loss.png
    Across tokenizers: ngpt plot out/char out/gpt2 out/bpe2k --metric bpb -o bpb.png
    """
    from nanogpt_cli.plot import plot_runs

    path = plot_runs(out_dirs, output, title=title, log_scale=log_y, metric=metric)
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
        message = one_line(e.format_message()).rstrip(".")
        if isinstance(e, click_errors.UsageError) and e.ctx is not None:
            message += f"; see `{e.ctx.command_path} --help`"
        emit_error(f"error: {message}")
        code = e.exit_code
    except typer.Abort:
        emit_error("error: interrupted")
        code = 130
    try:  # flushed here, not at interpreter exit, where a closed stdout turns the exit code into 120
        sys.stdout.flush()
    except (OSError, ValueError):
        silence_stdout()
    raise SystemExit(code if isinstance(code, int) else 0)
