"""The tables commands print, from plain results (no model runs here): eval, bench --compare, data sizes,
and the loss sparkline of the training summary."""

from __future__ import annotations

import pytest

from nanogpt_cli.progress import configure, out
from nanogpt_cli.report import (
    count_text,
    print_bench_compare,
    print_datasets,
    print_eval,
    print_training_start,
    size_text,
    sparkline,
)


@pytest.fixture(autouse=True)
def default_console():
    configure()
    yield
    configure()


def test_sparkline():
    assert sparkline([]) == "" and sparkline([float("nan")]) == ""
    line = sparkline([4.0, 3.0, 2.0, 1.0])
    assert line[0] == "█" and line[-1] == "▁" and len(line) == 4
    assert len(sparkline([float(i) for i in range(1000)], width=40)) == 40
    assert sparkline([2.0, float("inf"), 1.0]) == "█▁"
    assert set(sparkline([3.0, 3.0, 3.0])) == {"▁"}  # flat: no division by zero


def test_small_models_count_their_parameters_in_a_unit_that_shows_them(capsys):
    assert [count_text(n) for n in (850, 23_400, 99_949, 800_000, 123_653_376, 1_557_611_200)] == [
        "850", "23.4K", "99.9K", "0.80M", "123.65M", "1.56B"]

    class Tiny:
        peak = (1e11, "measured")

        def describe(self):
            return "device cpu"

    print_training_start({}, Tiny(), 23_400, 256, [])
    assert "model 23.4K parameters" in capsys.readouterr().err


LOSSES = {"model": "out/run", "dataset": "tiny", "block_size": 32, "train_loss": 1.23456, "val_loss": 2.5,
          "train_perplexity": 3.437, "val_perplexity": 12.18}
ZERO_SHOT = {"model": "gpt2", "block_size": 1024,
             "hellaswag": {"examples": 10, "accuracy": 0.3, "accuracy_norm": 0.4, "file": "h.jsonl"},
             "lambada": {"examples": 5, "accuracy": 0.2, "perplexity": 42.123, "file": "l.jsonl"}}


def test_eval_prints_a_table_for_what_was_evaluated(capsys):
    print_eval(LOSSES)
    text = capsys.readouterr().out
    assert "out/run on tiny" in text and "1.2346" in text and "12.18" in text and "zero-shot" not in text
    assert "bits/byte" not in text  # a dataset whose tokens' bytes are unknown

    print_eval(ZERO_SHOT)
    text = capsys.readouterr().out
    assert "gpt2, zero-shot (block_size 1024)" in text and " on " not in text
    hellaswag, lambada = (next(line for line in text.splitlines() if name in line) for name in ("hellaswag", "lambada"))
    assert "0.3000" in hellaswag and "0.4000" in hellaswag
    assert "42.12" in lambada and "-" in lambada  # lambada has no acc_norm

    print_eval({**LOSSES, "train_bpb": 1.78125, "val_bpb": 3.6})
    text = capsys.readouterr().out
    assert "bits/byte" in text and "1.7812" in text and "3.6000" in text

    print_eval({**LOSSES, **ZERO_SHOT, "model": "out/run"})
    text = capsys.readouterr().out
    assert "out/run on tiny" in text and "out/run, zero-shot" in text


def bench_row(label: str, tokens_per_second: float, threads: int) -> dict:
    return {"label": label, "params_millions": 0.1, "device": "cpu", "iters": 2, "ms_per_iter": 5.0,
            "tokens_per_second": tokens_per_second, "mfu": None, "peak_memory_mb": 100.0, "dtype": "float32",
            "dtype_why": "asked for", "compile": False, "compile_why": "off on cpu", "threads": threads,
            "warmup_seconds": 0.5, "ratio": tokens_per_second / 1000.0}


def test_bench_compare_table_shows_ratios_and_the_choices_that_differ(capsys, monkeypatch):
    monkeypatch.setattr(out, "_width", 200)  # a wide terminal: captured output is 80 columns, too few for all
    print_bench_compare("batch_size", [bench_row("batch_size=2", 1000.0, 1), bench_row("batch_size=4", 1500.0, 2)])
    text = capsys.readouterr().out
    assert "ratio: tokens/s over batch_size=2" in text and "1.00x" in text and "1.50x" in text
    assert "threads" in text.splitlines()[2] and "unknown" in text  # a differing choice gets a column; MFU unknown
    assert text.count("compile False: off on cpu") == 1  # a choice the runs share is said once


def test_sizes_and_an_empty_data_dir(capsys):
    assert [size_text(n) for n in (512, 1500, 3_200_000_000, 2e12)] == ["512 B", "1.5 KB", "3.2 GB", "2,000.0 GB"]
    print_datasets([], "/data")
    assert "no datasets in /data" in capsys.readouterr().out


def test_the_config_line_shows_what_differs_from_the_preset():
    import dataclasses

    from nanogpt_cli.config import TrainConfig, build
    from nanogpt_cli.report import config_line

    cfg = dataclasses.asdict(build(TrainConfig, "shakespeare-char-cpu", ["--max_iters=500"]))
    line = config_line(cfg)
    assert line.startswith("[bold]config[/bold] preset shakespeare-char-cpu with max_iters=500")
    assert "n_layer" not in line and len(line) < 120 and "--verbose" in line
    full = config_line(cfg, verbose=True)
    assert "n_layer=4" in full and "max_iters=500" in full
    plain = config_line(dataclasses.asdict(TrainConfig()))
    assert plain.startswith("[bold]config[/bold] defaults  (every key")
