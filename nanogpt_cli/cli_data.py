"""The `ngpt prepare ...` and `ngpt data ...` commands: thin Typer wrappers over nanogpt_cli.prepare.

    ngpt prepare shakespeare-char
    ngpt prepare text notes/ books/*.txt --tokenizer gpt2 --name mybooks
    ngpt data list
"""

import json
from pathlib import Path
from typing import Annotated

import typer

from nanogpt_cli.errors import report_errors

# the defaults shown in --help; the module itself is imported only when a command runs
OPENWEBTEXT_ID = "Skylion007/openwebtext"
OPENWEBTEXT_REVISION = "refs/convert/parquet"

prepare_app = typer.Typer(help="Turn text into training tokens: <data-dir>/<name>/train.bin, val.bin, meta.json.",
                          no_args_is_help=True)
data_app = typer.Typer(help="List and inspect prepared datasets.", no_args_is_help=True)

# Options every prepare command shares; each command sets its own defaults for name and val fraction.
DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", envvar="NGPT_DATA_DIR", show_default=False,
    help="Where datasets live (default: $NGPT_DATA_DIR, else the per-user data folder).")]
Name = Annotated[str | None, typer.Option("--name", help="Output folder under the data dir.")]
Force = Annotated[bool, typer.Option("--force", help="Rebuild even when the sources and options are unchanged.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for choosing the val documents.")]
Tokenizer = Annotated[str, typer.Option("--tokenizer", help="char, gpt2 or any tiktoken encoding (cl100k_base, ...).")]
Errors = Annotated[str, typer.Option("--errors", help="Invalid UTF-8: 'strict' stops, 'replace' substitutes U+FFFD.")]
TextField = Annotated[str, typer.Option("--text-field", help="JSONL field or parquet/dataset column with the text.")]
NumProc = Annotated[int, typer.Option("--num-proc", help="Tokenizer threads, 0 = one per core.")]
Source = Annotated[str | None, typer.Option(
    "--source", help="A local file or URL instead of downloading the corpus.", show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
Eot = Annotated[bool, typer.Option("--eot/--no-eot", help="Append the end-of-text token after every document (BPE).")]


ValFraction = Annotated[float, typer.Option(
    "--val-fraction", help="Share of documents held out for val (of a single document: its last characters).")]


def _options(**kwargs):
    from nanogpt_cli.prepare import PrepareOptions

    return PrepareOptions(**kwargs)


def _show_summary(summary: dict) -> None:
    """The result as a table, or one line when nothing needed doing."""
    from rich.table import Table

    from nanogpt_cli.progress import out

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


@prepare_app.command("shakespeare-char")
@report_errors
def shakespeare_char(source: Source = None, data_dir: DataDir = None, name: Name = None, force: Force = False,
                     val_fraction: ValFraction = 0.1, quiet: Quiet = False) -> None:
    """Tiny Shakespeare, one token per character (nanoGPT's shakespeare_char).

    The vocabulary (65 characters) comes from the data; the first 90% of the characters train,
    the rest val. The corpus is downloaded into the cache once, unless --source names a file or URL.

    Example: ngpt prepare shakespeare-char --source input.txt
    """
    from nanogpt_cli.prepare import prepare_shakespeare_char

    opts = _options(name=name, data_dir=data_dir, force=force, val_fraction=val_fraction, quiet=quiet)
    _show_summary(prepare_shakespeare_char(opts, source))


@prepare_app.command("shakespeare")
@report_errors
def shakespeare(source: Source = None, data_dir: DataDir = None, name: Name = None, force: Force = False,
                val_fraction: ValFraction = 0.1, tokenizer: Tokenizer = "gpt2",
                quiet: Quiet = False) -> None:
    """Tiny Shakespeare in GPT-2 BPE (nanoGPT's shakespeare).

    Split 90/10 by characters like shakespeare-char, each part encoded on its own, no EOT.

    Example: ngpt prepare shakespeare --data-dir ./data
    """
    from nanogpt_cli.prepare import prepare_shakespeare

    opts = _options(name=name, data_dir=data_dir, force=force, val_fraction=val_fraction,
                    tokenizer=tokenizer, quiet=quiet)
    _show_summary(prepare_shakespeare(opts, source))


@prepare_app.command("openwebtext")
@report_errors
def openwebtext(
    dataset_id: Annotated[str, typer.Option(
        "--dataset-id", help="Hub id, or a local folder (save_to_disk output or data files).")] = OPENWEBTEXT_ID,
    revision: Annotated[str | None, typer.Option(
        "--revision", help="Hub revision; the parquet export by default (no loading scripts).")] = OPENWEBTEXT_REVISION,
    data_files: Annotated[list[str] | None, typer.Option(
        "--data-files", help="Local .parquet/.jsonl files or globs to use instead of the Hub (repeatable).")] = None,
    num_proc: NumProc = 0, data_dir: DataDir = None, name: Name = None, force: Force = False,
    val_fraction: ValFraction = 0.0005, seed: Seed = 2357, tokenizer: Tokenizer = "gpt2",
    text_field: TextField = "text", quiet: Quiet = False,
) -> None:
    """OpenWebText, the nanoGPT recipe (about 9B train tokens, 17 GB; the download is about 55 GB).

    Hugging Face `datasets` loads the whole train split, train_test_split(test_size=0.0005, seed=2357,
    shuffle=True) holds out val, and GPT-2 BPE tokens go out in uint16 with an EOT after every document.
    The Hub's automatic parquet export (the default revision) may hold only part of a large dataset:
    for all of it, pass --data-files with local parquet files, or a --revision that has them.

    Example: ngpt prepare openwebtext --num-proc 8
    """
    from nanogpt_cli.prepare import prepare_openwebtext

    opts = _options(name=name, data_dir=data_dir, force=force, val_fraction=val_fraction, seed=seed,
                    tokenizer=tokenizer, num_threads=num_proc, quiet=quiet)
    _show_summary(prepare_openwebtext(opts, dataset_id, revision, data_files, num_proc or None, text_field))


@prepare_app.command("text")
@report_errors
def text(
    paths: Annotated[list[str], typer.Argument(help="Files, folders (recursive) or globs: .txt, .jsonl, .parquet.",
                                               show_default=False)],
    text_field: TextField = "text", tokenizer: Tokenizer = "gpt2", data_dir: DataDir = None, name: Name = None,
    force: Force = False, val_fraction: ValFraction = 0.1, seed: Seed = 2357,
    errors: Errors = "strict", eot: Eot = True, num_proc: NumProc = 0, quiet: Quiet = False,
) -> None:
    """Local .txt, .jsonl and .parquet files, folders (recursive) and globs.

    Each .txt file is one document (read a few MB at a time, however large), each JSONL line or
    parquet row one document; an EOT token follows every document. Val takes whole documents at
    random (--val-fraction, --seed); a single document gives val its last characters instead.
    The output folder is --name, else the first path's name.

    Example: ngpt prepare text corpus/ extra/*.jsonl --tokenizer gpt2 --name mycorpus
    """
    from nanogpt_cli.prepare import prepare_text

    opts = _options(name=name, data_dir=data_dir, force=force, val_fraction=val_fraction, seed=seed,
                    tokenizer=tokenizer, errors=errors, append_eot=eot, num_threads=num_proc, quiet=quiet)
    _show_summary(prepare_text(paths, opts, text_field))


@prepare_app.command("hf")
@report_errors
def hf(
    name_or_path: Annotated[str, typer.Argument(
        help="Hub id (streamed), a folder saved with save_to_disk, or a folder of data files.", show_default=False)],
    config: Annotated[str | None, typer.Option("--config", help="Dataset configuration (subset).")] = None,
    split: Annotated[str, typer.Option("--split", help="Which split to read.")] = "train",
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag, commit).")] = None,
    text_field: TextField = "text", tokenizer: Tokenizer = "gpt2", data_dir: DataDir = None, name: Name = None,
    force: Force = False, val_fraction: ValFraction = 0.1, seed: Seed = 2357, eot: Eot = True,
    num_proc: NumProc = 0, quiet: Quiet = False,
) -> None:
    """Any Hugging Face dataset: a Hub id (streamed), a save_to_disk folder, or a folder of data files.

    Val takes whole documents at random (--val-fraction, --seed); an EOT token follows every document
    (--no-eot to leave it out).

    Example: ngpt prepare hf roneneldan/TinyStories --val-fraction 0.01
    """
    from nanogpt_cli.prepare import prepare_hf

    opts = _options(name=name, data_dir=data_dir, force=force, val_fraction=val_fraction, seed=seed,
                    tokenizer=tokenizer, append_eot=eot, num_threads=num_proc, quiet=quiet)
    _show_summary(prepare_hf(name_or_path, opts, config, split, text_field, revision))


JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@data_app.command("list")
@report_errors
def list_command(data_dir: DataDir = None, as_json: JsonFlag = False) -> None:
    """The prepared datasets: name, tokenizer, tokens per split, size on disk, source.

    Example: ngpt data list --json
    """
    from rich.table import Table

    from nanogpt_cli.config import resolve_data_dir
    from nanogpt_cli.prepare import list_datasets
    from nanogpt_cli.progress import echo, out

    rows = list_datasets(data_dir)
    if as_json:
        echo(json.dumps(rows, indent=1) + "\n")
        return
    root = resolve_data_dir(data_dir)
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
                      _size(row["bytes"]), str(row["source"]))
    out.print(table)


@data_app.command("info")
@report_errors
def info_command(
    name: Annotated[str, typer.Argument(help="Dataset name (or folder path).", show_default=False)],
    data_dir: DataDir = None, as_json: JsonFlag = False,
) -> None:
    """Everything meta.json records about one dataset.

    Example: ngpt data info shakespeare_char
    """
    from rich.table import Table

    from nanogpt_cli.prepare import dataset_info
    from nanogpt_cli.progress import echo, out

    meta = dataset_info(name, data_dir)
    if as_json:
        echo(json.dumps(meta, indent=1) + "\n")
        return
    table = Table(title=meta["path"], show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in meta.items():
        if key == "itos":  # the whole vocabulary is in --json; here, a preview
            value = "".join(value).encode("unicode_escape").decode()
            value = value[:60] + ("..." if len(value) > 60 else "")
        elif key == "splits":
            value = "\n".join(f"{s}: {v['tokens']:,} tokens ({v['file']})" for s, v in value.items())
        elif key == "bytes":
            value = _size(value)
        elif isinstance(value, dict):
            value = json.dumps(value)
        table.add_row(key, str(value))
    out.print(table)
