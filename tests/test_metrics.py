"""Local metrics (metrics.jsonl, config.toml) from a real tiny run, and Weights & Biases (offline)."""

from __future__ import annotations

import json
import math
import re
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch

from nanogpt_cli.config import to_dict
from nanogpt_cli.errors import NgptError
from nanogpt_cli.metrics import MetricsLog, read_jsonl, start_wandb
from nanogpt_cli.train import train
from tests.conftest import require_module


def test_every_run_writes_metrics_jsonl_and_its_config(tiny_cfg):
    cfg = tiny_cfg()
    train(cfg)
    out = Path(cfg.out_dir)
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in steps] == list(range(7))
    for r in steps:
        assert {"iter", "loss", "lr", "tokens_per_s", "mfu", "ms", "time"} <= set(r)
        assert r["loss"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    assert [r["iter"] for r in evals] == [0, 3, 6]
    assert all(r["train_loss"] > 0 and r["val_loss"] > 0 for r in evals)
    # bits per byte beside the loss: the tiny char dataset is ASCII, one byte per token
    assert all(r[f"{s}_bpb"] == pytest.approx(r[f"{s}_loss"] / math.log(2)) for r in evals for s in ("train", "val"))

    saved = tomllib.loads((out / "config.toml").read_text(encoding="utf-8"))
    assert saved["n_layer"] == 2 and saved["n_embd"] == 32 and saved["max_iters"] == 6
    assert saved["dataset"] == "tiny_char" and saved["learning_rate"] == pytest.approx(1e-3)


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False
        self.id = kwargs.get("id") or "fake1234"
        self.dir = f"{kwargs['dir']}/wandb/offline-run-x-{self.id}/files"
        self.settings = types.SimpleNamespace(mode="offline")
        self.url = None

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def fake_wandb(monkeypatch, init=None):
    runs = []

    def default_init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    module = types.SimpleNamespace(init=init or default_init, Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return runs


def test_wandb_gets_the_resolved_config_a_dir_under_out_dir_and_every_record(tiny_cfg, monkeypatch, tmp_path):
    runs = fake_wandb(monkeypatch)
    cfg = tiny_cfg("--wandb_log=True", "--wandb_project=ngpt-tests", "--wandb_run_name=tiny")
    log = MetricsLog(tmp_path / "out", cfg)
    log.step(0, 3.5, 1e-3, 1000.0, 0.01, 5.0)
    log.eval(1, {"train": 3.4, "val": 3.6}, 1e-3)
    log.close()
    (run,) = runs
    assert run.kwargs["project"] == "ngpt-tests" and run.kwargs["name"] == "tiny"
    assert run.kwargs["config"] == to_dict(cfg) and run.kwargs["config"]["n_layer"] == 2
    assert run.kwargs["dir"] == str(tmp_path / "out")
    assert run.kwargs["settings"] == {"silent": True}  # no wandb banners in our output
    assert "id" not in run.kwargs  # a new run gets a fresh id
    assert run.logged == [(0, {"loss": 3.5, "lr": 1e-3, "tokens_per_s": 1000.0, "mfu": 0.01, "ms": 5.0}),
                          (1, {"train_loss": 3.4, "val_loss": 3.6, "lr": 1e-3})]
    assert run.finished and log.run_id == "fake1234"

    resumed = MetricsLog(tmp_path / "out", cfg, resume_from=1, run_id="fake1234")
    assert runs[-1].kwargs["id"] == "fake1234" and runs[-1].kwargs["resume"] == "allow"
    resumed.close()


def test_missing_wandb_names_the_extra(tiny_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    cfg = tiny_cfg("--wandb_log=True")
    with pytest.raises(NgptError, match=r"nanogpt-cli\[wandb\]"):
        start_wandb(cfg, None)
    with pytest.raises(NgptError, match=r"pip install 'nanogpt-cli\[wandb\]'"):
        train(cfg)


def test_wandb_that_cannot_start_is_one_error_with_the_offline_hint(tiny_cfg, monkeypatch):
    def init(**kwargs):
        raise RuntimeError("No API key configured.\nUse `wandb login` to log in.")

    fake_wandb(monkeypatch, init)
    with pytest.raises(NgptError, match="WANDB_MODE=offline") as info:
        start_wandb(tiny_cfg("--wandb_log=True"), None)
    assert "\n" not in str(info.value) and "No API key" in str(info.value)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    require_module("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var, sub in (("WANDB_DIR", "wandb-dir"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.mark.slow
def test_wandb_offline_run_lives_in_out_dir_and_resume_continues_it(tiny_cfg, wandb_offline, capsys):
    import wandb

    cfg = tiny_cfg("--wandb_log=True", "--wandb_project=ngpt-tests", "--wandb_run_name=tiny-offline")
    train(cfg)
    out = Path(cfg.out_dir)
    folders = sorted(out.glob("wandb/offline-run-*"))
    assert len(folders) == 1, list(out.rglob("*"))
    run_id = folders[0].name.rsplit("-", 1)[1]
    assert torch.load(out / "ckpt.pt", weights_only=False)["wandb_run_id"] == run_id
    wandb.teardown()  # the wandb service writes the run file in the background: let it finish (as at exit)
    data = next(folders[0].glob("run-*.wandb")).read_bytes()  # the run's records: config and history
    for text in ("ngpt-tests", "tiny-offline", "n_layer", "learning_rate", "val_loss", "tokens_per_s"):
        assert text.encode() in data, text
    err = capsys.readouterr().err
    assert f"wandb: offline run {run_id}" in err and "wandb sync" in err
    assert "View this run" not in err and "Run history" not in err  # wandb's own banners stay quiet

    train(tiny_cfg("--wandb_log=True", "--init_from=resume", "--max_iters=9", "--lr_decay_iters=9"))
    folders = sorted(out.glob("wandb/offline-run-*"))
    # the same wandb run: offline-run-<date>_<time>-<id>, with "-1" appended when it starts in the same second
    assert len(folders) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", f.name)
                                     for f in folders), folders
    assert torch.load(out / "ckpt.pt", weights_only=False)["wandb_run_id"] == run_id
    iters = [r["iter"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert iters == list(range(10))
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["iter"] == 9
