"""Bad input, across every command: one `error:` line on stderr, exit 2 (usage) or 1 (runtime), no traceback.

The table runs each case through the real CLI (typer's CliRunner on nanogpt_cli.cli.app); a few run
as real `python -m nanogpt_cli` processes, and --debug is checked to show the traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nanogpt_cli.cli import app
from nanogpt_cli.config import TrainConfig, build
from nanogpt_cli.errors import UsageError
from tests.conftest import TINY, write_char_dataset

runner = CliRunner()
NON_UTF8 = b"\xff\xfe\xfa not utf-8 \xc3\x28\n"
HAS_CUDA = torch.cuda.is_available()
HAS_MPS = torch.backends.mps.is_available()


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, str]:
    """A workspace of good and bad inputs, built once: a dataset, a trained run, broken files."""
    from nanogpt_cli.train import train

    root = tmp_path_factory.mktemp("bad_input")
    data = root / "data"
    write_char_dataset(data)
    run = root / "run"
    train(build(TrainConfig, None, [*TINY, f"--data_dir={data}", f"--out_dir={run}", "--max_iters=3"]))
    assert (run / "ckpt.pt").is_file()
    rope_run = root / "rope_run"  # a model Hugging Face's GPT-2 cannot compute
    train(build(TrainConfig, None, [*TINY, f"--data_dir={data}", f"--out_dir={rope_run}", "--max_iters=3",
                                    "--position=rope"]))

    def folder(name: str) -> Path:
        (root / name).mkdir()
        return root / name

    (folder("corrupt") / "ckpt.pt").write_bytes(os.urandom(4096))
    (folder("empty_ckpt") / "ckpt.pt").write_bytes(b"")
    (folder("truncated") / "ckpt.pt").write_bytes((run / "ckpt.pt").read_bytes()[:5000])
    folder("no_ckpt")
    (root / "empty.txt").write_bytes(b"")
    (root / "non_utf8.txt").write_bytes(NON_UTF8)
    (root / "non_utf8.toml").write_bytes(NON_UTF8)
    (root / "bad_type.toml").write_text('weight_decay = "heavy"\n')
    (root / "unknown_key.toml").write_text("n_layers = 4\n")
    (root / "a_file").write_text("not a folder\n")
    (root / "good.txt").write_text("some perfectly good text\n" * 20)
    (folder("garbled_run") / "metrics.jsonl").write_bytes(NON_UTF8)
    # datasets that are broken in different ways
    for name in ("empty_split", "garbled_meta", "empty_meta", "no_meta"):
        write_char_dataset(data, name)
    (data / "empty_split" / "train.bin").write_bytes(b"")
    (data / "garbled_meta" / "meta.json").write_bytes(NON_UTF8)
    (data / "empty_meta" / "meta.json").write_bytes(b"")
    (data / "no_meta" / "meta.json").unlink()
    (data / "other_vocab").mkdir()
    write_char_dataset(data, "other_vocab", text="xyz " * 500)
    return {"root": str(root), "data": str(data), "run": str(run), "rope_run": str(rope_run),
            "file": str(root / "a_file")}


def T(*args: str) -> list[str]:
    """A tiny CPU training command line (placeholders {data}, {root}, ... are filled in per case)."""
    return [*TINY, "--data_dir={data}", "--out_dir={root}/out_{n}", *args]


# (id, command line, exit code, a piece of the message)
CASES = [
    # ------------------------------------------------------------------ train
    ("train-batch-zero", ["train", *T("--batch_size=0")], 2, "--batch_size must be positive"),
    ("train-batch-negative", ["train", *T("--batch_size=-4")], 2, "--batch_size must be positive"),
    ("train-batch-ill-typed", ["train", *T("--batch_size=four")], 2, "--batch_size expects int"),
    ("train-lr-nan", ["train", *T("--learning_rate=nan")], 2, "finite number"),
    ("train-max-iters-negative", ["train", *T("--max_iters=-1")], 2, "--max_iters must not be negative"),
    ("train-dropout-range", ["train", *T("--dropout=1.5")], 2, "--dropout must be in"),
    ("train-head-divides", ["train", *T("--n_embd=30", "--n_head=4")], 2, "divisible by --n_head"),
    ("train-dtype", ["train", *T("--dtype=float64")], 2, "--dtype must be one of"),
    ("train-on-nonfinite", ["train", *T("--on_nonfinite=ignore")], 2, "--on_nonfinite must be one of"),
    ("train-unknown-key", ["train", *T("--n_layers=3")], 2, "did you mean --n_layer"),
    ("train-position-unknown", ["train", *T("--position=alibi")], 2, "--position must be one of learned, rope"),
    ("train-norm-unknown", ["train", *T("--norm=batchnorm")], 2, "--norm must be one of"),
    ("train-activation-unknown", ["train", *T("--activation=swish")], 2, "--activation must be one of"),
    ("train-optimizer-unknown", ["train", *T("--optimizer=sgd")], 2, "--optimizer must be one of adamw, muon"),
    ("train-lr-schedule-unknown", ["train", *T("--lr_schedule=linear")], 2, "--lr_schedule must be one of"),
    ("train-rope-odd-head", ["train", *T("--position=rope", "--n_embd=30", "--n_head=2")], 2,
     "head size n_embd / n_head = 15 must be even"),
    ("train-softcap-zero", ["train", *T("--logit_softcap=0")], 2, "--logit_softcap must be positive"),
    ("train-softcap-negative", ["train", *T("--logit_softcap=-15")], 2, "--logit_softcap must be positive"),
    ("train-rope-base", ["train", *T("--position=rope", "--rope_base=0")], 2, "--rope_base must be positive"),
    ("train-cooldown-range", ["train", *T("--lr_schedule=wsd", "--cooldown_frac=1.5")], 2, "--cooldown_frac"),
    ("train-muon-fsdp", ["train", *T("--optimizer=muon", "--strategy=fsdp")], 2, "cannot run with --strategy=fsdp"),
    ("train-muon-lr-zero", ["train", *T("--optimizer=muon", "--learning_rate=0")], 2, "must be positive, got 0.0"),
    ("train-muon-momentum", ["train", *T("--optimizer=muon", "--muon_momentum=1")], 2, "--muon_momentum"),
    ("train-muon-ns-steps", ["train", *T("--optimizer=muon", "--muon_ns_steps=0")], 2, "--muon_ns_steps"),
    ("train-head-lr-negative", ["train", *T("--optimizer=muon", "--head_lr=-1")], 2, "--head_lr must not be"),
    ("train-device-unknown", ["train", *T("--device=tpu")], 2, "unknown device"),
    ("train-device-index", ["train", *T("--device=cpu:x")], 2, "unknown device"),
    ("train-preset-unknown", ["train", "--preset", "no-such-preset", *T()], 2, "unknown preset"),
    ("train-preset-missing-file", ["train", "--preset", "{root}/missing.toml", *T()], 2, "does not exist"),
    ("train-preset-folder", ["train", "--preset", "{root}/no_ckpt", *T()], 2, "unknown preset"),
    ("train-preset-non-utf8", ["train", "--preset", "{root}/non_utf8.toml", *T()], 2, "not valid TOML"),
    ("train-preset-bad-type", ["train", "--preset", "{root}/bad_type.toml", *T()], 2, "--weight_decay expects float"),
    ("train-preset-unknown-key", ["train", "--preset", "{root}/unknown_key.toml", *T()], 2, "did you mean"),
    ("train-dataset-missing", ["train", *T("--dataset=nothing_here")], 2, "ngpt prepare"),
    ("train-data-dir-is-file", ["train", *T("--data_dir={file}")], 2, "not prepared"),
    ("train-dataset-empty-split", ["train", *T("--dataset=empty_split")], 2, "fewer than block_size"),
    ("train-dataset-meta-non-utf8", ["train", *T("--dataset=garbled_meta")], 1, "is corrupt"),
    ("train-dataset-meta-empty", ["train", *T("--dataset=empty_meta")], 1, "is corrupt"),
    ("train-dataset-meta-missing", ["train", *T("--dataset=no_meta")], 2, "ngpt prepare"),
    ("train-out-dir-under-file", ["train", *T("--out_dir={file}/out")], 1, "is a file, not a folder"),
    ("train-out-dir-is-file", ["train", *T("--out_dir={file}")], 1, "is a file, not a folder"),
    ("train-resume-nothing", ["train", *T("--init_from=resume", "--out_dir={root}/no_ckpt")], 2, "no checkpoint"),
    ("train-resume-corrupt", ["train", *T("--init_from=resume", "--out_dir={root}/corrupt")], 1, "is corrupt"),
    ("train-resume-empty", ["train", *T("--init_from=resume", "--out_dir={root}/empty_ckpt")], 1, "is corrupt"),
    ("train-resume-truncated", ["train", *T("--init_from=resume", "--out_dir={root}/truncated")], 1, "is corrupt"),
    ("train-resume-block-size", ["train", *T("--init_from=resume", "--out_dir={run}", "--block_size=64")], 2,
     "keeps its model's block_size (32)"),
    ("train-resume-other-vocab", ["train", *T("--init_from=resume", "--out_dir={run}", "--dataset=other_vocab")],
     2, "character vocabulary"),
    # ------------------------------------------------------------------ finetune
    ("finetune-from-scratch", ["finetune", *T()], 2, "finetune starts from weights"),
    ("finetune-corrupt", ["finetune", *T("--init_from={root}/corrupt")], 1, "is corrupt"),
    ("finetune-corrupt-file", ["finetune", *T("--init_from={root}/corrupt/ckpt.pt")], 1, "is corrupt"),
    ("finetune-folder-without-ckpt", ["finetune", *T("--init_from={root}/no_ckpt")], 2, "no checkpoint"),
    ("finetune-text-file", ["finetune", *T("--init_from={root}/non_utf8.txt")], 1, "is corrupt"),
    ("finetune-block-size", ["finetune", *T("--init_from={run}", "--block_size=64")], 2, "larger than the model"),
    ("finetune-batch-zero", ["finetune", *T("--init_from={run}", "--batch_size=0")], 2, "must be positive"),
    ("finetune-dataset-missing", ["finetune", *T("--init_from={run}", "--dataset=nothing_here")], 2,
     "ngpt prepare"),
    # ------------------------------------------------------------------ sample
    ("sample-no-ckpt", ["sample", "--out_dir={root}/no_ckpt", "--device=cpu"], 2, "no checkpoint"),
    ("sample-missing-out-dir", ["sample", "--out_dir={root}/nowhere", "--device=cpu"], 2, "no checkpoint"),
    ("sample-corrupt", ["sample", "--out_dir={root}/corrupt", "--device=cpu"], 1, "is corrupt"),
    ("sample-empty-ckpt", ["sample", "--out_dir={root}/empty_ckpt", "--device=cpu"], 1, "is corrupt"),
    ("sample-prompt-file-missing", ["sample", "--out_dir={run}", "--prompt_file={root}/missing.txt"], 2,
     "does not exist"),
    ("sample-prompt-file-folder", ["sample", "--out_dir={run}", "--prompt_file={root}/no_ckpt"], 2, "is a folder"),
    ("sample-prompt-file-empty", ["sample", "--out_dir={run}", "--prompt_file={root}/empty.txt"], 2, "is empty"),
    ("sample-prompt-file-non-utf8", ["sample", "--out_dir={run}", "--prompt_file={root}/non_utf8.txt"], 2,
     "not UTF-8"),
    ("sample-start-file-non-utf8", ["sample", "--out_dir={run}", "--start=FILE:{root}/non_utf8.txt"], 2,
     "not UTF-8"),
    ("sample-num-samples-zero", ["sample", "--out_dir={run}", "--num_samples=0"], 2, "must be positive"),
    ("sample-max-new-tokens-ill-typed", ["sample", "--out_dir={run}", "--max_new_tokens=lots"], 2, "expects int"),
    ("sample-temperature-negative", ["sample", "--out_dir={run}", "--temperature=-1"], 2, "must not be negative"),
    ("sample-top-p-range", ["sample", "--out_dir={run}", "--top_p=1.5"], 2, "--top_p must be in"),
    ("sample-device-unknown", ["sample", "--out_dir={run}", "--device=gpu"], 2, "unknown device"),
    ("sample-preset-unknown", ["sample", "--preset", "no-such-preset"], 2, "unknown preset"),
    ("sample-init-from-unknown", ["sample", "--init_from=not-a-model", "--device=cpu"], 2, "unknown init_from"),
    # ------------------------------------------------------------------ serve (all before the server starts)
    ("serve-no-ckpt", ["serve", "--out_dir={root}/no_ckpt", "--device=cpu"], 2, "no checkpoint"),
    ("serve-corrupt", ["serve", "--out_dir={root}/corrupt", "--device=cpu"], 1, "is corrupt"),
    ("serve-init-from-unknown", ["serve", "--init_from=not-a-model", "--device=cpu"], 2, "unknown init_from"),
    ("serve-port-range", ["serve", "--out_dir={run}", "--port=70000"], 2, "--port must be in"),
    ("serve-port-ill-typed", ["serve", "--out_dir={run}", "--port=http"], 2, "expects int"),
    ("serve-host-unknown", ["serve", "--out_dir={run}", "--device=cpu", "--host=no-such-host.invalid"], 1,
     "cannot listen on no-such-host.invalid"),
    ("serve-max-n-above-batch", ["serve", "--out_dir={run}", "--max_batch=2", "--max_n=3"], 2, "cannot exceed"),
    ("serve-max-queue-zero", ["serve", "--out_dir={run}", "--max_queue=0"], 2, "must be positive"),
    ("serve-api-key-empty", ["serve", "--out_dir={run}", "--api_key="], 2, "--api_key is empty"),
    ("serve-device-unknown", ["serve", "--out_dir={run}", "--device=gpu"], 2, "unknown device"),
    # ------------------------------------------------------------------ eval
    ("eval-no-ckpt", ["eval", *T("--out_dir={root}/no_ckpt")], 2, "no checkpoint"),
    ("eval-corrupt", ["eval", *T("--out_dir={root}/corrupt")], 1, "is corrupt"),
    ("eval-dataset-missing", ["eval", *T("--out_dir={run}", "--dataset=nothing_here")], 2, "ngpt prepare"),
    ("eval-dataset-empty-split", ["eval", *T("--out_dir={run}", "--dataset=empty_split")], 2, "fewer than"),
    ("eval-other-vocab", ["eval", *T("--out_dir={run}", "--dataset=other_vocab")], 2, "character vocabulary"),
    ("eval-batch-zero", ["eval", *T("--out_dir={run}", "--batch_size=0")], 2, "must be positive"),
    ("eval-eval-iters-ill-typed", ["eval", *T("--out_dir={run}", "--eval_iters=some")], 2, "expects int"),
    ("eval-device-unknown", ["eval", *T("--out_dir={run}", "--device=npu")], 2, "unknown device"),
    ("eval-preset-unknown", ["eval", "--preset", "no-such-preset"], 2, "unknown preset"),
    # ------------------------------------------------------------------ bench
    ("bench-batch-zero", ["bench", *T("--batch_size=0")], 2, "must be positive"),
    ("bench-head-divides", ["bench", *T("--n_embd=30", "--n_head=4")], 2, "divisible"),
    ("bench-device-unknown", ["bench", *T("--device=abacus")], 2, "unknown device"),
    ("bench-data-unknown", ["bench", "--data", "imaginary", *T()], 2, "--data must be synthetic or real"),
    ("bench-real-dataset-missing", ["bench", "--data", "real", *T("--dataset=nothing_here")], 2, "ngpt prepare"),
    ("bench-resume-corrupt", ["bench", *T("--init_from=resume", "--out_dir={root}/corrupt")], 1, "is corrupt"),
    ("bench-preset-unknown", ["bench", "--preset", "no-such-preset"], 2, "unknown preset"),
    # ------------------------------------------------------------------ presets show
    ("presets-unknown", ["presets", "show", "no-such-preset"], 2, "unknown preset"),
    ("presets-missing-file", ["presets", "show", "{root}/missing.toml"], 2, "does not exist"),
    ("presets-non-utf8", ["presets", "show", "{root}/non_utf8.toml"], 2, "not valid TOML"),
    ("presets-bad-type", ["presets", "show", "{root}/bad_type.toml"], 2, "expects float"),
    ("presets-unknown-key", ["presets", "show", "{root}/unknown_key.toml"], 2, "unknown option --n_layers"),
    # ------------------------------------------------------------------ export
    ("export-no-ckpt", ["export", "{root}/no_ckpt", "{root}/hf_{n}"], 2, "no checkpoint"),
    ("export-corrupt", ["export", "{root}/corrupt", "{root}/hf_{n}"], 1, "is corrupt"),
    ("export-unknown-source", ["export", "{root}/nothing_here", "{root}/hf_{n}"], 2, "cannot export"),
    ("export-format", ["export", "{run}", "{root}/hf_{n}", "--to", "onnx"], 2, "unknown export format"),
    ("export-dest-is-file", ["export", "{run}", "{file}"], 2, "exists and is not a folder"),
    ("export-rope", ["export", "{rope_run}", "{root}/hf_{n}"], 2, "the model has position=rope"),
    # ------------------------------------------------------------------ prepare / data
    ("prepare-text-missing", ["prepare", "text", "{root}/missing.txt", "--data-dir={root}/pd_{n}",
                              "--tokenizer=char"], 2, "missing.txt"),
    ("prepare-text-empty", ["prepare", "text", "{root}/empty.txt", "--data-dir={root}/pd_{n}", "--tokenizer=char"],
     2, "no text in"),
    ("prepare-text-non-utf8", ["prepare", "text", "{root}/non_utf8.txt", "--data-dir={root}/pd_{n}",
                               "--tokenizer=char"], 2, "invalid UTF-8"),
    ("prepare-text-empty-folder", ["prepare", "text", "{root}/no_ckpt", "--data-dir={root}/pd_{n}",
                                   "--tokenizer=char"], 2, "no .txt, .jsonl or .parquet files"),
    ("prepare-text-tokenizer", ["prepare", "text", "{root}/good.txt", "--data-dir={root}/pd_{n}", "--tokenizer=nope"],
     2, "nope"),
    ("prepare-text-file-type", ["prepare", "text", "{file}", "--data-dir={root}/pd_{n}", "--tokenizer=char"], 2,
     "unsupported file type"),
    ("prepare-shakespeare-source-missing", ["prepare", "shakespeare-char", "--source={root}/missing.txt",
                                            "--data-dir={root}/pd_{n}"], 2, "no such file"),
    ("data-info-missing", ["data", "info", "nothing_here", "--data-dir={data}"], 2, "no dataset 'nothing_here'"),
    ("data-info-garbled", ["data", "info", "garbled_meta", "--data-dir={data}"], 1, "unreadable"),
    # ------------------------------------------------------------------ plot
    ("plot-missing", ["plot", "{root}/nowhere", "-o", "{root}/plot_{n}.png"], 1, "no metrics.jsonl"),
    ("plot-not-a-run", ["plot", "{data}", "-o", "{root}/plot_{n}.png"], 1, "no metrics.jsonl"),
    ("plot-garbled-metrics", ["plot", "{root}/garbled_run", "-o", "{root}/plot_{n}.png"], 1, "no losses"),
]
if not HAS_CUDA:
    CASES += [(f"{cmd}-cuda-absent", [cmd, *args, "--device=cuda"], 2, "sees no CUDA GPU")
              for cmd, args in (("train", T()), ("sample", ["--out_dir={run}"]), ("eval", T("--out_dir={run}")),
                                ("bench", T()))]
    CASES.append(("train-cuda-index-absent", ["train", *T("--device=cuda:3")], 2, "no CUDA GPU"))
if not HAS_MPS:
    CASES += [(f"{cmd}-mps-absent", [cmd, *args, "--device=mps"], 2, "MPS is not available")
              for cmd, args in (("train", T()), ("sample", ["--out_dir={run}"]), ("eval", T("--out_dir={run}")),
                                ("bench", T()))]


def fill(args: list[str], w: dict, n: int) -> list[str]:
    return [a.format(n=n, **w) for a in args]


def check_one_error_line(result, code: int, message: str, args) -> str:
    """Exit `code`, one `error:` line and nothing else on stderr, and no traceback."""
    what = (args, result.exit_code, result.stdout[-2000:], result.stderr[-2000:], repr(result.exception))
    assert result.exit_code == code, what
    assert isinstance(result.exception, SystemExit), what  # handled, not a crash the runner caught
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, what
    assert result.stderr.strip().splitlines() == errors, what  # nothing else: no config line, no warnings
    assert message in errors[0], what
    assert "Traceback" not in result.stdout + result.stderr, what
    return errors[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_an_exit_code(case, w):
    name, args, code, message = case
    args = fill(args, w, CASES.index(case))
    result = runner.invoke(app, args)
    check_one_error_line(result, code, message, args)


NO_INPUT = {"info"}  # commands that read no file and take no value to get wrong


def test_every_command_is_covered():
    """A new command without a bad-input case here fails this test."""
    import typer.main

    covered = {tuple(c[1][:2]) if c[1][0] in ("presets", "prepare", "data") else (c[1][0],) for c in CASES}
    group = typer.main.get_command(app)
    missing = []
    for name, command in group.commands.items():
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            missing += [] if (name,) in covered or name in NO_INPUT else [name]
        elif name in ("prepare", "data", "presets"):
            # downloads (shakespeare, openwebtext, hf) and listings have no file input to spoil
            expected = {"text", "shakespeare-char", "info", "show"} & set(subcommands)
            missing += [f"{name} {s}" for s in expected if (name, s) not in covered]
    assert not missing, f"commands without bad-input cases: {missing}"


def test_click_level_usage_errors_exit_2_without_traceback():
    """Errors click itself finds (an option's range, a missing argument, an unknown command) exit 2 as well."""
    for args, message in ((["bench", "--iters", "0"], "--iters"), (["presets", "show"], "Missing argument"),
                          (["no-such-command"], "No such command")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_debug_shows_the_traceback(w):
    result = runner.invoke(app, ["--debug", "train", *fill(T("--batch_size=0"), w, 1000)])
    assert isinstance(result.exception, UsageError), (result.exit_code, result.stderr)
    result = runner.invoke(app, ["sample", "--out_dir", f"{w['root']}/corrupt", "--device=cpu", "--debug"])
    assert type(result.exception).__name__ == "NgptError", (result.exit_code, result.stderr)


def run_ngpt(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanogpt_cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_COLOR": "1", **env})


def test_real_process_one_line_and_debug_traceback(w):
    corrupt = f"{w['root']}/corrupt"
    plain = run_ngpt("sample", f"--out_dir={corrupt}", "--device=cpu")
    assert plain.returncode == 1, plain.stderr
    assert plain.stderr.strip().splitlines() == [line for line in plain.stderr.splitlines()
                                                 if line.startswith("error:")], plain.stderr
    assert "is corrupt" in plain.stderr and "Traceback" not in plain.stderr + plain.stdout
    usage = run_ngpt("train", "--batch_size=0")
    assert usage.returncode == 2 and usage.stderr.startswith("error: --batch_size must be positive"), usage.stderr
    assert usage.stderr.count("\n") == 1
    for debug in (run_ngpt("--debug", "sample", f"--out_dir={corrupt}", "--device=cpu"),
                  run_ngpt("sample", f"--out_dir={corrupt}", "--device=cpu", NGPT_DEBUG="1")):
        assert debug.returncode == 1
        assert "Traceback (most recent call last)" in debug.stderr and "NgptError" in debug.stderr, debug.stderr
