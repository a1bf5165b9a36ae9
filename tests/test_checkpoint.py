"""Checkpoints: what they hold, atomic writes, failed writes, safe loading, refusing what does not fit."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nanogpt_cli import checkpoint as ckpt_io
from nanogpt_cli.checkpoint import atomic_save, load_checkpoint, load_model, rng_state, set_rng_state
from nanogpt_cli.cli import app
from nanogpt_cli.errors import NgptError
from nanogpt_cli.run_folder import check_out_dir
from nanogpt_cli.train import train
from tests.conftest import TINY, poison_training_from

runner = CliRunner()
PACKAGE = Path(__file__).resolve().parent.parent / "nanogpt_cli"


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".ckpt.pt.tmp-*"))


def one_error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip("\n").splitlines()[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return errors[0]


@pytest.fixture
def trained(tiny_cfg, tmp_path) -> Path:
    """An out_dir with a checkpoint at iteration 3."""
    train(tiny_cfg("--max_iters=3"))
    return tmp_path / "out"


def cli_args(tmp_path, data_dir, *extra: str) -> list[str]:
    return [*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", *extra]


# ---------------------------------------------------------------- contents

def test_checkpoint_holds_everything_an_exact_resume_needs(trained):
    raw = torch.load(trained / "ckpt.pt", map_location="cpu", weights_only=True)  # plain data only
    assert raw["format"] == ckpt_io.FORMAT and raw["iter_num"] == 3
    assert raw["model"] and all(isinstance(v, torch.Tensor) for v in raw["model"].values())
    assert raw["optimizer"]["state"] and len(raw["optimizer"]["param_groups"]) == 2
    assert "scaler" in raw  # None on CPU float32; the GradScaler's state with float16 on CUDA
    assert np.isfinite(raw["best_val_loss"])
    expected_rng = ({"python", "numpy", "torch"} | ({"cuda"} if torch.cuda.is_available() else set())
                    | ({"mps"} if torch.backends.mps.is_available() else set()))
    assert set(raw["rng"]) == expected_rng
    assert isinstance(raw["loader"]["generator"], torch.Tensor)
    assert raw["model_args"]["n_layer"] == 2 and raw["config"]["max_iters"] == 3
    assert raw["meta"]["tokenizer"] == "char"


def test_checkpoints_without_the_model_options_load_as_gpt2(trained, tmp_path):
    """A checkpoint written before the model had options (model_args without their keys) is GPT-2, as it was
    trained: learned positions, LayerNorm, a tied head, no soft-cap; and it resumes."""
    from nanogpt_cli.model import GPTConfig

    ckpt = load_checkpoint(trained)
    old_keys = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "activation")
    ckpt["model_args"] = {k: ckpt["model_args"][k] for k in old_keys}
    atomic_save(ckpt, trained / "ckpt.pt")
    model, _, _ = load_model("resume", str(trained))
    gpt2 = GPTConfig(**{k: ckpt["model_args"][k] for k in old_keys})
    assert model.config == gpt2 and model.lm_head.weight is model.transformer.wte.weight
    result = runner.invoke(app, ["train", *cli_args(tmp_path, trained.parent / "data"), "--init_from=resume"])
    assert result.exit_code == 0, result.stderr
    assert load_checkpoint(trained)["model_args"]["position"] == "learned"


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian is part of numpy's state too
    atomic_save({"rng": rng_state()}, tmp_path / "rng.pt")
    first = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == first


# ---------------------------------------------------------------- atomic writes

def test_atomic_save_writes_a_temp_file_beside_fsyncs_then_renames(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}") or Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "ckpt.pt"
    atomic_save({"x": torch.arange(5)}, target)
    (kind, written), (_, src, dst), (last, is_dir) = events
    assert kind == "fsync" and written == src  # the data reaches the disk before the rename
    assert src.parent == dst.parent == tmp_path and src.name.startswith(".ckpt.pt.tmp-") and dst == target
    assert last == "fsync" and is_dir is True  # and the rename itself is made durable
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(5))
    assert temp_files(tmp_path) == []


def fail_mid_write(monkeypatch, exc: BaseException):
    """torch.save writes part of the file, then fails the way a full disk (or a Ctrl-C) does."""
    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint" * 1000)
        raise exc

    monkeypatch.setattr(torch, "save", save)


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temp_file(trained, tmp_path, data_dir,
                                                                             monkeypatch):
    before = (trained / "ckpt.pt").read_bytes()
    fail_mid_write(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    result = runner.invoke(app, ["train", *cli_args(tmp_path, data_dir, "--init_from=resume")])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    line = one_error_line(result)
    assert re.fullmatch(r"error: could not save the checkpoint .*ckpt\.pt: No space left on device; "
                        r"the previous checkpoint is intact", line), line
    assert (trained / "ckpt.pt").read_bytes() == before
    assert temp_files(trained) == []
    monkeypatch.undo()  # the disk has room again: the kept checkpoint resumes
    assert train(load_resume_cfg(tmp_path, data_dir)).iter_num == 7


def load_resume_cfg(tmp_path, data_dir):
    from nanogpt_cli.config import TrainConfig, build

    return build(TrainConfig, None, cli_args(tmp_path, data_dir, "--init_from=resume"))


def test_a_failed_first_save_says_so(tmp_path, monkeypatch):
    fail_mid_write(monkeypatch, OSError(errno.EIO, os.strerror(errno.EIO)))
    with pytest.raises(NgptError, match="Input/output error; no checkpoint was written"):
        atomic_save({"x": 1}, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_save_cleans_up_and_passes_the_interrupt_on(trained, monkeypatch):
    before = (trained / "ckpt.pt").read_bytes()
    fail_mid_write(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"x": 1}, trained / "ckpt.pt")
    assert (trained / "ckpt.pt").read_bytes() == before and temp_files(trained) == []


def test_temp_files_of_killed_writers_are_removed_on_the_next_save(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ckpt.pt.tmp-{dead.pid}"
    live = tmp_path / f".ckpt.pt.tmp-{os.getppid()}"  # a running process's write in progress: left alone
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    atomic_save({"x": 1}, tmp_path / "ckpt.pt")
    assert not stale.exists() and live.exists()


# ---------------------------------------------------------------- out_dir checks before training

def test_out_dir_under_a_file_is_refused_before_training(tmp_path, data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = runner.invoke(app, ["train", *cli_args(tmp_path, data_dir, f"--out_dir={blocker}/run")])
    assert result.exit_code == 1
    assert "is a file, not a folder" in one_error_line(result)
    with pytest.raises(NgptError, match="is a file, not a folder"):
        check_out_dir(blocker)


def test_full_disk_is_found_before_training(tmp_path, data_dir, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    result = runner.invoke(app, ["train", *cli_args(tmp_path, data_dir)])
    assert result.exit_code == 1
    assert one_error_line(result).endswith("No space left on device")
    assert not (tmp_path / "out").exists()  # the probe file is gone, and the folder made for it too


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through chmod 0500")
def test_read_only_out_dir_is_refused_before_training(tmp_path, data_dir):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        result = runner.invoke(app, ["train", *cli_args(tmp_path, data_dir)])
    finally:
        out.chmod(0o700)
    assert result.exit_code == 1 and "Permission denied" in one_error_line(result)


# ---------------------------------------------------------------- safe loading

def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start():text.index(")", match.end()) + 1]
            calls.append((path.name, call))
            assert "weights_only=True" in call, (path, call)
        assert not re.search(r"\bpickle\.loads?\(|\byaml\.load\(|\bjoblib\.load\(", text), path
    assert any(name == "checkpoint.py" for name, _ in calls)


def test_a_model_loads_without_copying_or_initialising_its_weights(trained, monkeypatch):
    def no_random_init(*args, **kwargs):
        raise AssertionError("the checkpoint's weights replace the initialisation: it must not run")

    monkeypatch.setattr(torch.Tensor, "normal_", no_random_init)
    ckpt = load_checkpoint(trained, mmap=True)
    model = ckpt_io.model_from_checkpoint(ckpt, "ckpt")
    assert model.transformer.wte.weight is model.lm_head.weight  # still tied: one parameter
    # the parameters are the checkpoint's own tensors, mapped from the file, not copies of them
    assert model.lm_head.weight.data_ptr() == ckpt["model"]["lm_head.weight"].data_ptr()
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    monkeypatch.undo()
    copied = load_model("resume", str(trained))[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copied.state_dict().values(),
                                                     strict=True))
    assert torch.nn.init.normal_(torch.zeros(3)).abs().sum() > 0  # torch's init is itself again


class _Exploit:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path):
    exploit = _Exploit()
    exploit.marker = tmp_path / "pwned"
    torch.save({"model": {}, "model_args": {}, "payload": exploit}, tmp_path / "ckpt.pt")
    with pytest.raises(NgptError, match="is corrupt or not a checkpoint"):
        load_checkpoint(tmp_path)
    result = runner.invoke(app, ["sample", f"--out_dir={tmp_path}", "--device=cpu"])
    line = one_error_line(result)
    assert result.exit_code == 1 and "is corrupt or not a checkpoint" in line
    # the reason, without torch's advice to load it with weights_only=False (which would run the code)
    assert "Unsupported global" in line and "never runs code" in line, line
    assert "weights_only` set to `False" not in line and "\x1b" not in line, line
    assert not exploit.marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"", "is corrupt"),
    (os.urandom(2048), "is corrupt"),
    ({"weights": {}}, "no 'model' and 'model_args'"),
    ([1, 2, 3], "no 'model' and 'model_args'"),
    ({"model": {"w": 3}, "model_args": {}}, "is damaged"),
    ({"model": [torch.zeros(1)], "model_args": {}}, "is damaged"),
    ({"model": {}, "model_args": "n_layer=2"}, "is damaged"),
    ({"model": {}, "model_args": {"n_layer": 2, "n_head": 3, "n_embd": 32}}, "invalid model_args"),
])
def test_broken_checkpoints_are_refused_clearly(tmp_path, content, message):
    if isinstance(content, bytes):
        (tmp_path / "ckpt.pt").write_bytes(content)
    else:
        torch.save(content, tmp_path / "ckpt.pt")
    with pytest.raises(NgptError, match=message):
        load_model("resume", str(tmp_path))


def tamper(out: Path, change) -> None:
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, out / "ckpt.pt")


@pytest.mark.parametrize("change, message", [
    (lambda c: c["model"].update({"transformer.h.9.mlp.c_fc.weight": torch.zeros(4, 4)}),
     "unexpected transformer.h.9.mlp.c_fc.weight"),
    (lambda c: c["model"].pop("transformer.ln_f.weight"), "missing transformer.ln_f.weight"),
    (lambda c: c["model"].update({"transformer.wpe.weight": torch.zeros(16, 32)}),
     "shape of transformer.wpe.weight (16, 32) vs (32, 32)"),
])
def test_a_checkpoint_that_does_not_fit_the_model_says_what_differs(trained, tmp_path, data_dir, change, message):
    tamper(trained, change)
    with pytest.raises(NgptError, match=re.escape(message)):
        load_model("resume", str(trained))
    for args in (["sample", f"--out_dir={trained}", "--device=cpu", "--max_new_tokens=2"],
                 ["train", *cli_args(tmp_path, data_dir, "--init_from=resume")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in one_error_line(result), args


def test_optimizer_state_that_does_not_fit_is_refused(trained, tmp_path, data_dir):
    tamper(trained, lambda c: c["optimizer"]["param_groups"].pop())
    result = runner.invoke(app, ["train", *cli_args(tmp_path, data_dir, "--init_from=resume")])
    assert result.exit_code == 1
    assert "the optimizer state in" in one_error_line(result) and "does not fit this run" in result.stderr


# ---------------------------------------------------------------- non-finite gradients

class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward: a finite loss whose step would ruin the weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def poison_gradients_from(monkeypatch, call: int) -> None:
    poison_training_from(monkeypatch, call, _InfGrad.apply)


def test_non_finite_gradients_with_a_finite_loss_stop_before_the_weights_change(tiny_cfg, tmp_path, monkeypatch):
    train(tiny_cfg("--max_iters=3"))
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    poison_gradients_from(monkeypatch, 2)
    with pytest.raises(NgptError, match="gradients became non-finite at iteration 4; stopped before updating"):
        train(tiny_cfg("--init_from=resume"))
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before


def test_non_finite_gradients_can_be_skipped_and_the_weights_stay_finite(tiny_cfg, tmp_path, monkeypatch):
    poison_gradients_from(monkeypatch, 3)
    result = train(tiny_cfg("--on_nonfinite=skip"))
    assert result.iter_num == 7
    weights = load_checkpoint(tmp_path / "out")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


# ---------------------------------------------------------------- nanoGPT's checkpoints and meta.pkl

NANOGPT_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
NANOGPT_ARGS = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, bias=True, vocab_size=len(set(NANOGPT_TEXT)),
                    dropout=0.0)  # nanoGPT's train.py: exactly these keys


def nanogpt_weights(n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout, seed=3) -> dict:
    """Random weights named and shaped as nanoGPT's model.py makes them (Linear weights (out, in),
    lm_head tied to wte), with the causal-mask buffer `attn.bias` (1, 1, T, T) that nanoGPT registers
    when flash attention is unavailable and that older checkpoints all carry. (Seed 3's greedy text
    varies, "Firstmmm mo ...": a wrong logit shows.)"""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, mean=0.0):
        return torch.randn(shape, generator=g) * 0.3 + mean

    sd = {"transformer.wte.weight": randn(vocab_size, n_embd), "transformer.wpe.weight": randn(block_size, n_embd)}
    shapes = {"ln_1.weight": (n_embd,), "attn.c_attn.weight": (3 * n_embd, n_embd), "attn.c_proj.weight": (n_embd,
              n_embd), "ln_2.weight": (n_embd,), "mlp.c_fc.weight": (4 * n_embd, n_embd),
              "mlp.c_proj.weight": (n_embd, 4 * n_embd)}
    for i in range(n_layer):
        for name, shape in shapes.items():
            sd[f"transformer.h.{i}.{name}"] = randn(*shape, mean=1.0 if name.startswith("ln_") else 0.0)
            if bias:
                sd[f"transformer.h.{i}.{name.removesuffix('.weight')}.bias"] = randn(shape[0])
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(block_size, block_size)).view(
            1, 1, block_size, block_size)
    sd["transformer.ln_f.weight"] = randn(n_embd, mean=1.0)
    if bias:
        sd["transformer.ln_f.bias"] = randn(n_embd)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # weight tying: one tensor under two names
    return sd


def nanogpt_logits(sd: dict, idx: torch.Tensor, n_layer: int, n_head: int, **_) -> torch.Tensor:
    """nanoGPT's forward, written out from its model.py: pre-LN blocks, the mask from the `attn.bias`
    buffer, the exact GELU of nn.GELU(), logits at every position."""
    import math

    from torch.nn import functional as F

    B, T = idx.shape
    C = sd["transformer.wte.weight"].shape[1]

    def ln(x, name):
        return F.layer_norm(x, (C,), sd[f"{name}.weight"], sd.get(f"{name}.bias"), 1e-5)

    def linear(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    for i in range(n_layer):
        h = f"transformer.h.{i}"
        q, k, v = linear(ln(x, f"{h}.ln_1"), f"{h}.attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(sd[f"{h}.attn.bias"][:, :, :T, :T] == 0, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        x = x + linear(y, f"{h}.attn.c_proj")
        x = x + linear(F.gelu(linear(ln(x, f"{h}.ln_2"), f"{h}.mlp.c_fc")), f"{h}.mlp.c_proj")
    return F.linear(ln(x, "transformer.ln_f"), sd["lm_head.weight"])


def write_nanogpt_run(root: Path, model_args: dict | None = None, dataset="shakespeare_char", meta_at="data"):
    """A nanoGPT run as its train.py and data/<dataset>/prepare.py leave it: root/out/ckpt.pt (the state dict
    of a torch.compile'd model, so every key has the `_orig_mod.` prefix) and the dataset's meta.pkl
    (vocab_size, itos, stoi), pickled as nanoGPT pickles it. Returns (out_dir, weights, characters)."""
    model_args = dict(model_args or NANOGPT_ARGS)
    chars = sorted(set(NANOGPT_TEXT))
    weights = nanogpt_weights(**model_args)
    params = [torch.nn.Parameter(w.clone()) for k, w in weights.items() if not k.endswith(".attn.bias")]
    optimizer = torch.optim.AdamW(params, lr=6e-4, betas=(0.9, 0.95))
    sum(p.square().sum() for p in params).backward()
    optimizer.step()
    config = {"out_dir": "out", "eval_interval": 250, "dataset": dataset, "batch_size": 12, "block_size": 32,
              "learning_rate": 1e-3, "compile": True, "dtype": "bfloat16", "init_from": "scratch",
              "always_save_checkpoint": False, "backend": "nccl", "device": "cuda"}
    out = root / "out"
    out.mkdir(parents=True)
    torch.save({"model": {"_orig_mod." + k: v for k, v in weights.items()}, "optimizer": optimizer.state_dict(),
                "model_args": model_args, "iter_num": 250, "best_val_loss": torch.tensor(1.4697), "config": config},
               out / "ckpt.pt")
    meta_dir = {"data": root / "data" / dataset, "out": out, None: None}[meta_at]
    if meta_dir is not None:
        meta_dir.mkdir(parents=True, exist_ok=True)
        with open(meta_dir / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                         "stoi": {c: i for i, c in enumerate(chars)}}, f)
    return out, weights, chars


@pytest.mark.parametrize("bias", [True, False])
def test_a_nanogpt_checkpoint_loads_and_computes_nanogpts_logits(tmp_path, monkeypatch, bias):
    monkeypatch.chdir(tmp_path)
    model_args = {**NANOGPT_ARGS, "bias": bias}
    out, weights, chars = write_nanogpt_run(tmp_path, model_args)
    for where in (out, out / "ckpt.pt", str(out)):
        ckpt = load_checkpoint(where)
        plain = {k: v for k, v in weights.items() if not k.endswith(".attn.bias")}
        assert ckpt["model"].keys() == plain.keys()  # prefixes stripped, mask buffers dropped, nothing else
        assert all(torch.equal(ckpt["model"][k], v) for k, v in plain.items())
        assert ckpt["iter_num"] == 250 and float(ckpt["best_val_loss"]) == pytest.approx(1.4697)

    model, meta, _ = load_model(str(out), str(out))  # what ngpt sample/eval/finetune use
    assert meta == {"tokenizer": "char", "vocab_size": len(chars), "itos": chars}
    assert model.config.activation == "gelu" and model.config.bias is bias  # nanoGPT's nn.GELU() is exact
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, len(chars), (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.eval()(idx, all_logits=True)[0]
    torch.testing.assert_close(ours, nanogpt_logits(weights, idx, **model_args), atol=1e-5, rtol=0)


def test_ngpt_sample_on_a_nanogpt_out_dir(tmp_path, monkeypatch):
    """`ngpt sample --out-dir` on a nanoGPT run, end to end: the char vocabulary comes from the dataset's
    meta.pkl, and greedy decoding follows nanoGPT's own logits."""
    monkeypatch.chdir(tmp_path)
    out, weights, chars = write_nanogpt_run(tmp_path)
    prompt, n = "First", 20
    idx = torch.tensor([[chars.index(c) for c in prompt]])
    for _ in range(n):
        with torch.no_grad():
            idx = torch.cat([idx, nanogpt_logits(weights, idx, **NANOGPT_ARGS)[:, -1:].argmax(-1)], dim=1)
    expected = "".join(chars[i] for i in idx[0].tolist())  # the prompt and its continuation

    result = runner.invoke(app, ["sample", "--out-dir", str(out), "--prompt", prompt, "--num_samples=1",
                                 f"--max_new_tokens={n}", "--temperature=0", "--device=cpu", "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert json.loads(result.stdout)["samples"] == [expected]


def test_find_nanogpt_meta_locations(tmp_path, monkeypatch):
    from nanogpt_cli.tokenizer import GPT2_META

    out, _, chars = write_nanogpt_run(tmp_path / "a", meta_at="out")  # next to the checkpoint
    assert ckpt_io.find_nanogpt_meta(out, {"dataset": "shakespeare_char"})["itos"] == chars
    out, _, chars = write_nanogpt_run(tmp_path / "b")  # <out_dir>/../data/<dataset>/meta.pkl
    assert ckpt_io.find_nanogpt_meta(out, {"dataset": "shakespeare_char"})["itos"] == chars

    out, _, _ = write_nanogpt_run(tmp_path / "c", meta_at=None)
    assert ckpt_io.find_nanogpt_meta(out, {"dataset": "shakespeare_char"}) == GPT2_META  # as nanoGPT assumes
    cwd = tmp_path / "cwd"  # ./data/<dataset>/meta.pkl, as nanoGPT's sample.py looks from where it runs
    (cwd / "data" / "shakespeare_char").mkdir(parents=True)
    (cwd / "data" / "shakespeare_char" / "meta.pkl").write_bytes(
        pickle.dumps({"vocab_size": 2, "itos": {0: "a", 1: "b"}, "stoi": {"a": 0, "b": 1}}))
    monkeypatch.chdir(cwd)
    assert ckpt_io.find_nanogpt_meta(out, {"dataset": "shakespeare_char"})["itos"] == ["a", "b"]
    assert ckpt_io.find_nanogpt_meta(out, {"dataset": "openwebtext"}) == GPT2_META
    assert ckpt_io.find_nanogpt_meta(out, None) == GPT2_META  # a checkpoint without a config


class _ShellExploit:
    """Unpickling this runs a shell command: what a malicious meta.pkl would do (in any pickle protocol)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_meta_pkl_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "meta.pkl"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        payload = {"vocab_size": 1, "itos": {0: _ShellExploit(marker)}, "stoi": {}}
        path.write_bytes(pickle.dumps(payload, protocol=protocol))
        with pytest.raises(NgptError, match="refusing"):
            ckpt_io.read_nanogpt_meta_pkl(path)
        assert not marker.exists()


@pytest.mark.parametrize("meta, message", [
    ({"vocab_size": 3, "stoi": {}}, "needs an 'itos' dict"),
    ({"vocab_size": 3, "itos": {0: "a", 2: "b"}}, r"does not map ids 0\.\.2"),
    ({"itos": {0: 1}}, "must be strings"),
])
def test_a_broken_meta_pkl_is_refused_clearly(tmp_path, meta, message):
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    with pytest.raises(NgptError, match=message):
        ckpt_io.read_nanogpt_meta_pkl(tmp_path / "meta.pkl")
