"""The `ngpt prepare ...` and `ngpt data ...` commands: thin Typer wrappers over nanogpt_cli.prepare.

    ngpt prepare shakespeare-char
    ngpt prepare text notes/ books/*.txt --tokenizer gpt2 --name mybooks
    ngpt prepare text code/ --tokenizer bpe:8192 --tokenizer-sample 200MB
    ngpt data list
"""

import json
from pathlib import Path
from typing import Annotated

import typer

from nanogpt_cli.atomic import stop_on_signals
from nanogpt_cli.errors import report_errors
from nanogpt_cli.hub import OPENWEBTEXT_ID, OPENWEBTEXT_REVISION  # defaults shown in --help (prepare loads later)
from nanogpt_cli.progress import echo
from nanogpt_cli.report import print_dataset_info, print_datasets, print_prepared

prepare_app = typer.Typer(help="Turn text into training tokens: <data-dir>/<name>/train.bin, val.bin, meta.json.",
                          no_args_is_help=True)
data_app = typer.Typer(help="List and inspect prepared datasets.", no_args_is_help=True)

# Options every prepare command shares; each command sets its own defaults for name and val fraction.
DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", envvar="NGPT_DATA_DIR", show_default=False,
    help="Where datasets live (default: $NGPT_DATA_DIR, else the per-user data folder).")]
Name = Annotated[str | None, typer.Option("--name", help="Output folder under the data dir.")]
Force = Annotated[bool, typer.Option(
    "--force", help="Rebuild even when the sources and options are unchanged, or replace a dataset of the same name "
                    "prepared from other sources.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for choosing the val documents.")]
Tokenizer = Annotated[str, typer.Option(
    "--tokenizer", help="char, gpt2, any tiktoken encoding (cl100k_base, ...), bpe:N to train an N-token byte-level "
                        "BPE on the train split, or a tokenizer.json (or a dataset folder) whose BPE to reuse.")]
TokenizerSample = Annotated[str | None, typer.Option(
    "--tokenizer-sample", metavar="BYTES", show_default=False,
    help="bpe:N trains on the first BYTES of the train split (e.g. 100MB); default: all of it.")]
Errors = Annotated[str, typer.Option("--errors", help="Invalid UTF-8: 'strict' stops, 'replace' substitutes U+FFFD.")]
TextField = Annotated[str, typer.Option("--text-field", help="JSONL field or parquet/dataset column with the text.")]
NumProc = Annotated[int, typer.Option("--num-proc", help="Tokenizer threads, 0 = one per core.")]
Source = Annotated[str | None, typer.Option(
    "--source", help="A local file or URL instead of downloading the corpus.", show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
Eot = Annotated[bool, typer.Option("--eot/--no-eot", help="Append the end-of-text token after every document (BPE).")]


ValFraction = Annotated[float, typer.Option(
    "--val-fraction", help="Share of documents held out for val (of a single document: its last characters).")]


def _prepare_options(tokenizer_sample: str | None = None, **kwargs):
    from nanogpt_cli.prepare import PrepareOptions, parse_byte_size

    return PrepareOptions(tokenizer_sample=parse_byte_size(tokenizer_sample) if tokenizer_sample else 0, **kwargs)


@prepare_app.command("shakespeare-char")
@report_errors
@stop_on_signals()
def shakespeare_char(source: Source = None, data_dir: DataDir = None, name: Name = None, force: Force = False,
                     val_fraction: ValFraction = 0.1, quiet: Quiet = False) -> None:
    """Tiny Shakespeare, one token per character (nanoGPT's shakespeare_char).

    The vocabulary (65 characters) comes from the data; the first 90% of the characters train,
    the rest val. The corpus is downloaded into the cache once, unless --source names a file or URL.

    Example: ngpt prepare shakespeare-char --source input.txt
    """
    from nanogpt_cli.prepare import prepare_shakespeare_char

    options = _prepare_options(name=name, data_dir=data_dir, force=force, val_fraction=val_fraction, quiet=quiet)
    print_prepared(prepare_shakespeare_char(options, source))


@prepare_app.command("shakespeare")
@report_errors
@stop_on_signals()
def shakespeare(source: Source = None, data_dir: DataDir = None, name: Name = None, force: Force = False,
                val_fraction: ValFraction = 0.1, tokenizer: Tokenizer = "gpt2",
                tokenizer_sample: TokenizerSample = None, quiet: Quiet = False) -> None:
    """Tiny Shakespeare in GPT-2 BPE (nanoGPT's shakespeare).

    Split 90/10 by characters like shakespeare-char, each part encoded on its own, no EOT.

    Example: ngpt prepare shakespeare --data-dir ./data
    Its own 2k BPE: ngpt prepare shakespeare --tokenizer bpe:2048 --name shakespeare_bpe2k
    """
    from nanogpt_cli.prepare import prepare_shakespeare

    options = _prepare_options(name=name, data_dir=data_dir, force=force, val_fraction=val_fraction,
                               tokenizer=tokenizer, tokenizer_sample=tokenizer_sample, quiet=quiet)
    print_prepared(prepare_shakespeare(options, source))


@prepare_app.command("openwebtext")
@report_errors
@stop_on_signals()
def openwebtext(
    dataset_id: Annotated[str, typer.Option(
        "--dataset-id", help="Hub id, or a local folder (save_to_disk output or data files).")] = OPENWEBTEXT_ID,
    revision: Annotated[str | None, typer.Option(
        "--revision", help="Hub revision; the parquet export by default (no loading scripts).")] = OPENWEBTEXT_REVISION,
    data_files: Annotated[list[str] | None, typer.Option(
        "--data-files", help="Local .parquet/.jsonl files or globs to use instead of the Hub (repeatable).")] = None,
    num_proc: NumProc = 0, data_dir: DataDir = None, name: Name = None, force: Force = False,
    val_fraction: ValFraction = 0.0005, seed: Seed = 2357, tokenizer: Tokenizer = "gpt2",
    tokenizer_sample: TokenizerSample = None, text_field: TextField = "text", quiet: Quiet = False,
) -> None:
    """OpenWebText, the nanoGPT recipe (about 9B train tokens, 17 GB; the download is about 55 GB).

    Hugging Face `datasets` loads the whole train split, train_test_split(test_size=0.0005, seed=2357,
    shuffle=True) holds out val, and GPT-2 BPE tokens go out in uint16 with an EOT after every document.
    The Hub's automatic parquet export (the default revision) may hold only part of a large dataset:
    for all of it, pass --data-files with local parquet files, or a --revision that has them.

    Example: ngpt prepare openwebtext --num-proc 8
    """
    from nanogpt_cli.prepare import prepare_openwebtext

    options = _prepare_options(name=name, data_dir=data_dir, force=force, val_fraction=val_fraction, seed=seed,
                               tokenizer=tokenizer, tokenizer_sample=tokenizer_sample, num_threads=num_proc,
                               quiet=quiet)
    print_prepared(prepare_openwebtext(options, dataset_id, revision, data_files, num_proc or None, text_field))


@prepare_app.command("text")
@report_errors
@stop_on_signals()
def text(
    paths: Annotated[list[str], typer.Argument(help="Files, folders (recursive) or globs: .txt, .jsonl, .parquet.",
                                               show_default=False)],
    text_field: TextField = "text", tokenizer: Tokenizer = "gpt2", tokenizer_sample: TokenizerSample = None,
    data_dir: DataDir = None, name: Name = None, force: Force = False, val_fraction: ValFraction = 0.1,
    seed: Seed = 2357, errors: Errors = "strict", eot: Eot = True, num_proc: NumProc = 0, quiet: Quiet = False,
) -> None:
    """Local .txt, .jsonl and .parquet files, folders (recursive) and globs.

    Each .txt file is one document (read a few MB at a time, however large), each JSONL line or
    parquet row one document; an EOT token follows every document. Val takes whole documents at
    random (--val-fraction, --seed); a single document gives val its last characters instead.
    The output folder is --name, else the first path's name.

    Example: ngpt prepare text corpus/ extra/*.jsonl --tokenizer gpt2 --name mycorpus
    A vocabulary of its own: ngpt prepare text corpus/ --tokenizer bpe:16384 --tokenizer-sample 100MB
    """
    from nanogpt_cli.prepare import prepare_text

    options = _prepare_options(name=name, data_dir=data_dir, force=force, val_fraction=val_fraction, seed=seed,
                               tokenizer=tokenizer, tokenizer_sample=tokenizer_sample, errors=errors,
                               append_eot=eot, num_threads=num_proc, quiet=quiet)
    print_prepared(prepare_text(paths, options, text_field))


@prepare_app.command("hf")
@report_errors
@stop_on_signals()
def hf(
    name_or_path: Annotated[str, typer.Argument(
        help="Hub id (streamed), a folder saved with save_to_disk, or a folder of data files.", show_default=False)],
    config: Annotated[str | None, typer.Option("--config", help="Dataset configuration (subset).")] = None,
    split: Annotated[str, typer.Option("--split", help="Which split to read.")] = "train",
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag, commit).")] = None,
    text_field: TextField = "text", tokenizer: Tokenizer = "gpt2", tokenizer_sample: TokenizerSample = None,
    data_dir: DataDir = None, name: Name = None, force: Force = False, val_fraction: ValFraction = 0.1,
    seed: Seed = 2357, eot: Eot = True, num_proc: NumProc = 0, quiet: Quiet = False,
) -> None:
    """Any Hugging Face dataset: a Hub id (streamed), a save_to_disk folder, or a folder of data files.

    Val takes whole documents at random (--val-fraction, --seed); an EOT token follows every document
    (--no-eot to leave it out).

    Example: ngpt prepare hf roneneldan/TinyStories --val-fraction 0.01
    """
    from nanogpt_cli.prepare import prepare_hf

    options = _prepare_options(name=name, data_dir=data_dir, force=force, val_fraction=val_fraction, seed=seed,
                               tokenizer=tokenizer, tokenizer_sample=tokenizer_sample, append_eot=eot,
                               num_threads=num_proc, quiet=quiet)
    print_prepared(prepare_hf(name_or_path, options, config, split, text_field, revision))


JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@data_app.command("list")
@report_errors
def list_command(data_dir: DataDir = None, as_json: JsonFlag = False) -> None:
    """The prepared datasets: name, tokenizer, tokens per split, size on disk, source.

    Example: ngpt data list --json
    """
    from nanogpt_cli.config import resolve_data_dir
    from nanogpt_cli.prepare import list_datasets

    rows = list_datasets(data_dir)
    if as_json:
        echo(json.dumps(rows, indent=1) + "\n")
        return
    print_datasets(rows, resolve_data_dir(data_dir))


@data_app.command("info")
@report_errors
def info_command(
    name: Annotated[str, typer.Argument(help="Dataset name (or folder path).", show_default=False)],
    data_dir: DataDir = None, as_json: JsonFlag = False,
) -> None:
    """Everything meta.json records about one dataset.

    Example: ngpt data info shakespeare_char
    """
    from nanogpt_cli.prepare import dataset_info

    meta = dataset_info(name, data_dir)
    if as_json:
        echo(json.dumps(meta, indent=1) + "\n")
        return
    print_dataset_info(meta)
