"""The optimizers: AdamW's groups, Muon's orthogonalised update and its AdamW groups, the schedules, and Muon
through the trainer (learning, exact resume, the non-finite guard)."""

from __future__ import annotations

import json

import pytest
import torch

from nanogpt_cli.checkpoint import load_checkpoint
from nanogpt_cli.config import TrainConfig, build
from nanogpt_cli.errors import NgptError
from nanogpt_cli.metrics import read_jsonl
from nanogpt_cli.nonfinite import checks_on_device
from nanogpt_cli.optim import Muon, MuonWithAdamW, adamw, build_optimizer, muon_roles
from nanogpt_cli.train import build_trainer, lr_at, train
from tests.conftest import poison_training_from
from tests.test_model import tiny

MUON = ("--optimizer=muon", "--muon_lr=0.02", "--embedding_lr=0.01", "--head_lr=0.004", "--scalar_lr=0.02",
        "--learning_rate=0.01")


def muon_cfg(*extra: str) -> TrainConfig:
    return build(TrainConfig, None, [*MUON, *extra])


def test_adamw_groups_decay_matrices_only():
    model = tiny(bias=False)
    for opt in (adamw(model, 0.1, 1e-3, (0.9, 0.95), "cpu"), model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")):
        decay, no_decay = opt.param_groups
        assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
        assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
        assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["fused"]


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest_each_at_its_rate(tied):
    model = tiny(tie_embeddings=tied)
    opt = build_optimizer(model, muon_cfg("--weight_decay=0.1"), "cpu")
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt.muon, Muon)
    roles = muon_roles(model)
    names = {id(p): name for name, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in roles["muon"]) == sorted(
        name for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2)
    assert [names[id(p)] for p in roles["head"]] == ["transformer.wte.weight" if tied else "lm_head.weight"]
    assert [names[id(p)] for p in roles["embedding"]] == ([] if tied else ["transformer.wte.weight"]) + [
        "transformer.wpe.weight"]
    assert all(p.dim() == 1 for p in roles["scalar"])
    everything = [p for group in opt.param_groups for p in group["params"]]
    assert len(everything) == len(set(map(id, everything))) == len(list(model.parameters()))
    muon_group, embedding, head, scalar = opt.param_groups
    assert (muon_group["lr"], muon_group["momentum"], muon_group["nesterov"]) == (0.02, 0.95, True)
    assert [g["lr"] for g in (embedding, head, scalar)] == [0.01, 0.004, 0.02]
    assert [g["lr_scale"] for g in opt.param_groups] == pytest.approx([2.0, 1.0, 0.4, 2.0])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.1, 0.0]  # matrices only


def test_muon_with_rotary_and_tied_weights_has_no_embedding_group():
    opt = build_optimizer(tiny(position="rope"), muon_cfg(), "cpu")
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.004, 0.02]


def test_muons_update_has_singular_values_near_one():
    """Gradients whose singular values spread 30-60x become steps whose singular values are all about 1 (the
    Newton-Schulz iteration's, between 0.68 and 1.17 here), scaled by sqrt(max(1, rows / cols))."""
    model = tiny(n_embd=32)
    opt = build_optimizer(model, muon_cfg("--weight_decay=0", "--muon_momentum=0", "--no-muon_nesterov",
                                          "--muon_lr=1"), "cpu")
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in muon_roles(model)["muon"]]
    opt.step()
    spreads = []
    for p, old in zip(muon_roles(model)["muon"], before, strict=True):
        rows, cols = p.shape
        step = torch.linalg.svdvals((old - p.detach()) / max(1, rows / cols) ** 0.5)
        assert 0.6 < step.min() and step.max() < 1.25, (tuple(p.shape), step)
        grad = torch.linalg.svdvals(p.grad)
        spreads.append(grad.max() / grad.min())
    assert max(spreads) > 20


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_steps_exactly_as_torch_optim_muon(nesterov):
    """The same steps as torch's Muon, bit for bit (its matrices of one shape orthogonalised in one batch)."""
    shapes = [(24, 8), (8, 8), (32, 8), (8, 32)] * 2
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    kwargs = dict(lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=nesterov, ns_steps=5)
    optimizers = Muon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs)
    for _ in range(4):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))
    assert not any(torch.equal(p, p0) for p, p0 in zip(ours, start, strict=True))
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_wsd_holds_the_peak_then_cools_down_linearly():
    cfg = build(TrainConfig, None, ["--lr_schedule=wsd", "--warmup_iters=10", "--lr_decay_iters=110",
                                    "--cooldown_frac=0.5", "--learning_rate=1", "--min_lr=0.1"])
    assert lr_at(0, cfg) == pytest.approx(1 / 11)
    assert lr_at(10, cfg) == lr_at(55, cfg) == 1.0  # stable until 110 * 0.5 = 55
    assert lr_at(82, cfg) == pytest.approx(1 - 0.9 * 27 / 55)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(111, cfg) == 0.1
    assert lr_at(30, build(TrainConfig, None, ["--lr_schedule=wsd", "--cooldown_frac=0", "--learning_rate=1",
                                               "--warmup_iters=0", "--lr_decay_iters=30"])) == 1.0


def test_every_group_follows_the_schedule_at_its_own_scale(tiny_cfg):
    trainer = build_trainer(tiny_cfg(*MUON, "--lr_schedule=wsd"))
    trainer.prefetch()
    lr = lr_at(1, trainer.cfg)
    trainer.train_step(lr)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([2 * lr, lr, 0.4 * lr, 2 * lr])


def losses(out_dir):
    return {r["iter"]: r["loss"] for r in read_jsonl(out_dir / "metrics.jsonl") if "loss" in r}


def test_muon_learns_and_resumes_bit_identically(tiny_cfg, tmp_path):
    """Its momentum is in the checkpoint: 3 iterations, stop, resume to 6 give the run of 6, bit for bit."""
    modern = ("--position=rope", "--norm=rmsnorm", "--qk_norm", "--activation=relu2", "--no-tie_embeddings",
              "--logit_softcap=15", "--zero_init_proj", "--lr_schedule=wsd", "--dropout=0.1")
    train(tiny_cfg(*MUON, *modern, f"--out_dir={tmp_path / 'full'}"))
    train(tiny_cfg(*MUON, *modern, f"--out_dir={tmp_path / 'half'}", "--max_iters=3"))
    train(tiny_cfg(*MUON, *modern, f"--out_dir={tmp_path / 'half'}", "--init_from=resume"))
    assert losses(tmp_path / "half") == losses(tmp_path / "full")
    full, half = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "half")
    assert all(torch.equal(full["model"][k], v) for k, v in half["model"].items())
    assert set(full["optimizer"]) == {"muon", "adamw"} and full["optimizer"]["muon"]["state"]
    assert full["model_args"]["position"] == "rope" and full["config"]["optimizer"] == "muon"
    history = losses(tmp_path / "full")
    assert history[6] < history[0]
    # the modern model samples (KV cache, rotary positions) and evaluates through the CLI like any other
    from typer.testing import CliRunner

    from nanogpt_cli.cli import app

    runner = CliRunner()
    sampled = runner.invoke(app, ["sample", f"--out_dir={tmp_path / 'full'}", "--device=cpu", "--max_new_tokens=40",
                                  "--num_samples=2", "--seed=1", "--json"])
    assert sampled.exit_code == 0, sampled.stderr
    assert all(len(text) > 40 for text in json.loads(sampled.stdout)["samples"])
    data_dir = tmp_path / "data"
    evaluated = runner.invoke(app, ["eval", f"--out_dir={tmp_path / 'full'}", "--dataset=tiny_char", "--device=cpu",
                                    f"--data_dir={data_dir}", "--eval_iters=2", "--batch_size=2", "--json"])
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["val_loss"] < history[0]


def test_an_adamw_checkpoint_does_not_resume_under_muon(tiny_cfg):
    train(tiny_cfg("--max_iters=3"))
    with pytest.raises(NgptError, match="the optimizer state in .* does not fit this run"):
        train(tiny_cfg(*MUON, "--init_from=resume"))


def test_muon_runs_are_checked_at_every_step(tiny_cfg, tmp_path, monkeypatch):
    """Muon has no found_inf: even on cuda its steps take the checked path; a NaN stops the run before the
    weights change, or is skipped."""
    model = tiny()
    cuda = torch.device("cuda")
    assert not checks_on_device(cuda, build_optimizer(model, muon_cfg(), "cuda"), False, False)
    assert checks_on_device(cuda, adamw(model, 0.1, 1e-3, (0.9, 0.95), "cuda"), False, False)
    train(tiny_cfg(*MUON, "--max_iters=3"))
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    poison_training_from(monkeypatch, 2, lambda loss: loss * float("nan"))
    with pytest.raises(NgptError, match="loss became nan"):
        train(tiny_cfg(*MUON, "--init_from=resume"))
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before
    result = train(tiny_cfg(*MUON, "--on_nonfinite=skip", f"--out_dir={tmp_path / 'skip'}"))
    assert result.iter_num == 7
    assert all(torch.isfinite(w).all() for w in load_checkpoint(tmp_path / "skip")["model"].values())
