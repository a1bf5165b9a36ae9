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
from nanogpt_cli.progress import console, echo

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


def show_config(cfg) -> None:
    """The resolved config, compactly, at the start of a run."""
    pairs = [f"{k}={'auto' if v is None else v}" for k, v in to_dict(cfg).items()]
    console.print("[bold]config[/bold] " + "  ".join(pairs), style="dim")


def version_callback(value: bool) -> None:
    if value:
        echo(f"ngpt {__version__}\n")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks instead of one-line errors")] = False,
) -> None:
    """ngpt: nanoGPT as one installable command. Start with `ngpt prepare shakespeare-char`."""


def _finish_training(result, command: str) -> None:
    if result.stopped_by:
        argv = [a for a in sys.argv[1:] if not a.startswith("--init_from") and not a.startswith("--init-from")]
        console.print(f"stopped by {result.stopped_by} at iteration {result.iter_num}; checkpoint saved. Resume with:\n"
                      f"  ngpt {shlex.join(argv)} --init_from=resume")
        raise typer.Exit(130 if result.stopped_by == "SIGINT" else 143)


@app.command(context_settings=CONFIG_KEYS, epilog=help_epilog(TrainConfig))
@report_errors
def train(ctx: typer.Context, preset: PresetOption = None) -> None:
    """Train a GPT from scratch, or resume a run with --init_from=resume.

    Example: ngpt train --preset shakespeare-char --max_iters=2000 --device=cpu
    """
    from nanogpt_cli.train import train as run_training

    cfg = build(TrainConfig, preset, config_args(ctx))
    show_config(cfg)
    _finish_training(run_training(cfg), "train")


@app.command(context_settings=CONFIG_KEYS, epilog=help_epilog(TrainConfig))
@report_errors
def finetune(ctx: typer.Context, preset: PresetOption = None) -> None:
    """Finetune pretrained weights (gpt2*, a Hugging Face folder, or an ngpt checkpoint) on a dataset.

    Example: ngpt finetune --preset finetune-shakespeare --init_from=gpt2
    """
    from nanogpt_cli.train import train as run_training

    cfg = build(TrainConfig, preset, config_args(ctx))
    if cfg.init_from == "scratch":
        raise UsageError("finetune starts from weights: set --init_from to gpt2*, a Hugging Face folder or an "
                         "ngpt checkpoint (or use `ngpt train` to start from scratch)")
    show_config(cfg)
    _finish_training(run_training(cfg, finetune=True), "finetune")


@app.command(context_settings=CONFIG_KEYS, epilog=help_epilog(SampleConfig))
@report_errors
def sample(ctx: typer.Context, preset: PresetOption = None, as_json: JsonOption = False) -> None:
    """Generate text from a checkpoint (--out-dir) or a pretrained GPT-2 (--init_from=gpt2).

    Example: ngpt sample --out-dir out/shakespeare-char --prompt "ROMEO:" --num-samples 3
    """
    from nanogpt_cli.sample import sample as run_sampling

    cfg = build(SampleConfig, preset, config_args(ctx))
    if as_json:
        result = run_sampling(cfg)
        echo(json.dumps({"prompt": result.prompt, "samples": result.samples, "new_tokens": result.new_tokens,
                         "seconds": round(result.seconds, 4),
                         "tokens_per_second": round(result.tokens_per_second, 2)}) + "\n")
        return
    if cfg.num_samples == 1:  # one sample streams as it is generated
        from nanogpt_cli.sample import read_prompt

        cfg.prompt, cfg.start, cfg.prompt_file = read_prompt(cfg), None, None
        shown = False

        def stream(i: int, text: str) -> None:
            nonlocal shown
            if not shown:  # the prompt first, once the model has loaded and accepted it
                echo(cfg.prompt)
                shown = True
            echo(text)

        result = run_sampling(cfg, on_token=stream)
        echo(("" if shown else result.samples[0]) + "\n")
    else:
        result = run_sampling(cfg)
        for text in result.samples:
            echo(text + "\n---------------\n")


@app.command("eval", context_settings=CONFIG_KEYS, epilog=help_epilog(TrainConfig))
@report_errors
def eval_command(ctx: typer.Context, preset: PresetOption = None, as_json: JsonOption = False) -> None:
    """Loss and perplexity on a prepared dataset's train and val splits, for a checkpoint or GPT-2.

    Example: ngpt eval --out-dir out/shakespeare-char --dataset shakespeare_char --init_from=resume
    """
    from nanogpt_cli.evaluate import evaluate

    cfg = build(TrainConfig, preset, config_args(ctx))
    if cfg.init_from == "scratch":
        cfg.init_from = "resume"
    report = evaluate(cfg)
    if as_json:
        echo(json.dumps(report) + "\n")
        return
    from rich.table import Table

    table = Table(title=f"{report['model']} on {report['dataset']}")
    for column in ("split", "loss", "perplexity"):
        table.add_column(column)
    for split in ("train", "val"):
        table.add_row(split, f"{report[f'{split}_loss']:.4f}", f"{report[f'{split}_perplexity']:.2f}")
    console.print(table)


@app.command(context_settings=CONFIG_KEYS, epilog=help_epilog(TrainConfig))
@report_errors
def bench(
    ctx: typer.Context,
    preset: PresetOption = None,
    data: Annotated[str, typer.Option(help="synthetic (no prepared data needed) or real (the preset's dataset)")]
    = "synthetic",
    iters: Annotated[int, typer.Option(help="timed iterations", min=1)] = 20,
    warmup: Annotated[int, typer.Option(help="untimed iterations first (compile, allocator warm-up)", min=0)] = 5,
    as_json: JsonOption = False,
) -> None:
    """Time training steps: ms/iter, tokens/s, MFU against this device's peak, peak memory.

    Example: ngpt bench --preset gpt2-124m --batch_size=4 --block_size=256 --iters 10
    """
    from nanogpt_cli.bench import bench as run_bench

    if data not in ("synthetic", "real"):
        raise UsageError(f"--data must be synthetic or real, got {data!r}")
    cfg = build(TrainConfig, preset, config_args(ctx))
    if data == "synthetic":
        cfg.dataset = "synthetic"
    result = run_bench(cfg, iters=iters, warmup=warmup)
    if as_json:
        echo(json.dumps(result.as_dict()) + "\n")
        return
    mfu = f"{result.mfu * 100:.2f}%" if result.mfu is not None else "unknown"
    console.print(f"{result.params_millions:.1f}M params on {result.device} ({result.dtype}, compile "
                  f"{result.compile}): {result.ms_per_iter:.1f} ms/iter, {result.tokens_per_second:,.0f} tokens/s, "
                  f"MFU {mfu}, peak memory {result.peak_memory_mb:,.0f} MB")


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
    model, meta, _ = load_model(out_dir, out_dir)
    path = export_hf(model, target, meta)
    console.print(f"wrote {path} (load it with transformers.GPT2LMHeadModel.from_pretrained({str(path)!r}))")


presets_app = typer.Typer(help="List the presets, or show one's resolved values.", no_args_is_help=False)
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
        console.print(f"[bold]{name:<22}[/bold] {preset_description(name)}")


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


def main() -> None:
    app()
