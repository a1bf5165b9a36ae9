"""LoRA finetuning (lora.py): adapters on frozen weights, the run's small checkpoint and its base reference,
exact resume, merging, the PEFT folder loaded by peft onto transformers' GPT-2, and the commands end to end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from nanogpt_cli import lora
from nanogpt_cli.checkpoint import load_checkpoint, model_from_checkpoint
from nanogpt_cli.cli import app
from nanogpt_cli.config import TrainConfig, build, to_dict
from nanogpt_cli.metrics import read_jsonl
from nanogpt_cli.model import GPT, GPTConfig
from nanogpt_cli.runtime import autocast
from nanogpt_cli.train import build_trainer, run_config, train
from tests.conftest import TEXT, TINY, needs_bpe, require_module, write_char_dataset

peft = require_module("peft")
transformers = require_module("transformers")
runner = CliRunner()
LORA = ["--lora_rank=4", "--lora_alpha=8", "--learning_rate=1e-2"]


def ngpt(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def one_error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr
    return errors[0]


def losses(out_dir) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_jsonl(out_dir / "metrics.jsonl") if "loss" in r}


def logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(idx, all_logits=True)[0]


@pytest.fixture(scope="module")
def char_base(tmp_path_factory):
    """A tiny ngpt run (the base to adapt) on a character-level dataset: (data_dir, its out_dir)."""
    root = tmp_path_factory.mktemp("lora")
    data_dir = root / "data"
    write_char_dataset(data_dir)
    base = root / "base"
    train(build(TrainConfig, None, [*TINY, f"--data_dir={data_dir}", f"--out_dir={base}"]))
    return data_dir, base


def lora_cfg(char_base, out_dir, *extra: str) -> TrainConfig:
    data_dir, base = char_base
    return build(TrainConfig, None, [*TINY, f"--data_dir={data_dir}", f"--init_from={base}", f"--out_dir={out_dir}",
                                     *LORA, *extra])


def test_a_fresh_adapter_changes_no_logit_and_only_it_trains():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=40))
    idx = torch.randint(0, 40, (2, 8))
    before = logits(model, idx)
    lora.attach(model, {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["attn", "proj", "mlp"]})
    assert torch.equal(logits(model, idx), before)  # B starts at zero: W x + B A x = W x
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * 4 * 2  # A and B of 4 layers in each of 2 blocks
    adapters, frozen = (sum(p.numel() for p in model.parameters() if p.requires_grad is grad) for grad in (True, False))
    attention = 12 * 2 * 2 * 8 * 8  # 12 L H Q T
    assert model.flops_per_token() == 6 * adapters + 4 * (frozen - 8 * 16) + attention  # no gradients of frozen weights
    lora.merge(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not lora.is_attached(model) and torch.equal(logits(model, idx), before)


def test_frozen_weights_held_in_bfloat16_compute_what_bfloat16_autocast_does():
    """autocast casts a float32 weight to bfloat16 at each use: storing it so gives the same bits, with half the
    memory; the embeddings (the residual stream) and the adapters stay float32."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=40))
    lora.attach(model, {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["attn", "mlp"]})
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p)
    idx, targets = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8))

    def step():
        model.zero_grad()
        with autocast(torch.device("cpu"), "bfloat16"):
            out, loss = model(idx, targets)
        loss.backward()
        return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    out, grads = step()
    held = lora.hold_frozen_in_bfloat16(model)
    assert held == 2 * 16 * (3 * 16 + 16 + 4 * 16 + 4 * 16)  # the weights of every linear layer in the blocks
    held_out, held_grads = step()
    assert torch.equal(held_out, out) and grads.keys() == held_grads.keys()
    assert all(torch.equal(held_grads[name], grad) for name, grad in grads.items())
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["transformer.h.0.mlp.c_fc.base_layer.weight"] == dtypes["transformer.h.1.attn.c_proj.weight"] \
        == torch.bfloat16
    assert {dtypes["transformer.wte.weight"], dtypes["transformer.h.0.mlp.c_fc.lora_A.default.weight"],
            dtypes["transformer.h.0.ln_1.weight"]} == {torch.float32}


def test_a_lora_run_trains_only_its_adapters_and_saves_only_them(char_base, tmp_path):
    data_dir, base = char_base
    trainer = build_trainer(lora_cfg(char_base, tmp_path / "run"))
    trainer.run()
    base_state = load_checkpoint(base)["model"]
    for name, tensor in trainer.model.state_dict().items():  # the base's weights are untouched
        if not lora.is_adapter(name):
            assert torch.equal(tensor, base_state[name.replace(".base_layer", "")]), name
    assert any(t.abs().sum() > 0 for name, t in trainer.model.state_dict().items() if ".lora_B." in name)

    ckpt = load_checkpoint(tmp_path / "run")
    assert set(ckpt["model"]) == set(lora.adapter_state_dict(trainer.model.state_dict()))
    assert all(name.endswith((".lora_A.weight", ".lora_B.weight")) for name in ckpt["model"])
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["model"])  # AdamW moments of the adapters only
    assert ckpt["lora"]["base"] == {"init_from": str(base), "source": str(base.resolve()),
                                    "fingerprint": lora.fingerprint(model_from_checkpoint(load_checkpoint(base), ""))}
    assert (tmp_path / "run" / "ckpt.pt").stat().st_size < (base / "ckpt.pt").stat().st_size / 2

    # merged for inference or not, the same function (fp32); and not the base's any more
    idx = torch.randint(0, ckpt["model_args"]["vocab_size"], (2, 16))
    apart, merged = (model_from_checkpoint(ckpt, "run", merged=flag) for flag in (False, True))
    assert lora.is_attached(apart) and not lora.is_attached(merged)
    torch.testing.assert_close(logits(merged, idx), logits(apart, idx), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(merged, idx), logits(model_from_checkpoint(load_checkpoint(base), ""), idx))


def test_a_resumed_lora_run_is_bit_identical(char_base, tmp_path):
    dropout = ("--dropout=0.1", "--lora_dropout=0.2")
    train(lora_cfg(char_base, tmp_path / "full", *dropout))
    train(lora_cfg(char_base, tmp_path / "half", *dropout, "--max_iters=3"))
    result = train(run_config(None, [f"--out_dir={tmp_path / 'half'}", "--init_from=resume", "--max_iters=6"]))
    assert result.iter_num == 7
    assert losses(tmp_path / "half") == losses(tmp_path / "full")
    full, half = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "half")
    assert half["lora"] == full["lora"]
    assert all(torch.equal(half["model"][name], tensor) for name, tensor in full["model"].items())


@pytest.mark.slow
def test_a_lora_run_on_two_processes_matches_one(char_base, tmp_path):
    """DDP with frozen weights: 2 processes x accumulation 2 give 1 process x accumulation 4's losses and
    adapters (--strategy=fsdp does too, but costs another start of two processes here)."""
    import subprocess
    import sys

    args = [*TINY, f"--data_dir={char_base[0]}", f"--init_from={char_base[1]}", *LORA,
            "--gradient_accumulation_steps=4"]
    train(run_config(None, [*args, f"--out_dir={tmp_path / 'one'}"], finetune=True))
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "nanogpt_cli", "--quiet", "finetune", "--nproc-per-node", "2", *args,
                           f"--out_dir={out}"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    one, two = load_checkpoint(tmp_path / "one"), load_checkpoint(out)
    assert two["world_size"] == 2 and two["lora"] == one["lora"] and two["model"].keys() == one["model"].keys()
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, rtol=1e-4, atol=1e-6)


def test_a_changed_or_missing_base_is_refused_in_one_line(char_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(char_base[1], base)
    run = tmp_path / "run"
    train(build(TrainConfig, None, [*TINY, f"--data_dir={char_base[0]}", f"--init_from={base}", f"--out_dir={run}",
                                    *LORA, "--max_iters=3"]))
    original = (base / "ckpt.pt").read_bytes()
    ckpt = load_checkpoint(base)
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] += 1e-3
    torch.save(ckpt, base / "ckpt.pt")
    for command in (["train", "--init_from=resume"], ["sample", "--max_new_tokens=2"], ["export", str(run)]):
        where = [str(tmp_path / "hf")] if command[0] == "export" else [f"--out_dir={run}", "--device=cpu"]
        line = one_error_line(ngpt(*command, *where, code=2))
        assert "has changed" in line and f"{base}" in line, line
    (base / "ckpt.pt").write_bytes(original)
    ngpt("sample", f"--out_dir={run}", "--max_new_tokens=2", "--num_samples=1", "--device=cpu")
    shutil.rmtree(base)
    line = one_error_line(ngpt("train", "--init_from=resume", f"--out_dir={run}", code=1))
    assert "is missing" in line and str(base.resolve()) in line
    assert losses(run) and max(losses(run)) == 3  # the refused runs wrote nothing


def test_bad_lora_input_is_one_line_and_writes_nothing(char_base, tmp_path):
    data_dir, base = char_base
    out = tmp_path / "out"
    common = [*TINY, f"--data_dir={data_dir}", f"--out_dir={out}"]
    cases = [(["finetune", f"--init_from={base}", "--lora_rank=-1"], "--lora_rank must be positive"),
             (["finetune", f"--init_from={base}", "--lora_rank=33"], "at most 32"),
             (["finetune", f"--init_from={base}", "--lora_rank=4", "--lora_targets=attn,mpl"],
              "unknown --lora_targets name 'mpl'; did you mean mlp?"),
             (["finetune", f"--init_from={base}", "--lora_rank=4", "--lora_alpha=0"], "--lora_alpha must be positive"),
             (["finetune", f"--init_from={base}", "--lora_rank=4", f"--out_dir={base}"], "holds a checkpoint"),
             (["finetune", f"--init_from={base}", "--lora_rank=4", f"--out_dir={base}", "--overwrite"],
              "holds the base"),
             (["train", "--lora_rank=4"], "--init_from=scratch has none")]
    for args, message in cases:
        line = one_error_line(ngpt(args[0], *common, *args[1:], code=2))
        assert message in line, (args, line)
        assert not out.exists(), args
    assert sorted(p.name for p in base.iterdir()) == ["ckpt.pt", "config.toml", "metrics.jsonl"]

    train(build(TrainConfig, None, [*common, f"--init_from={base}", *LORA, "--max_iters=3"]))
    line = one_error_line(ngpt("train", f"--out_dir={out}", "--init_from=resume", "--lora_rank=8", code=2))
    assert "keeps its model's lora_rank (4)" in line
    line = one_error_line(ngpt("train", f"--out_dir={base}", "--init_from=resume", "--lora_rank=4", code=2))
    assert "ngpt finetune --init_from=" in line


# ---------------------------------------------------------------- a Hugging Face base, through the CLI


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny random GPT-2 in GPT-2 BPE saved as a Hugging Face folder, and a BPE dataset: (folder, data_dir)."""
    from tests.test_hf import make_hf_folder

    root = tmp_path_factory.mktemp("hf-lora")
    folder, _ = make_hf_folder(root / "tiny-gpt2", seed=3, vocab_size=50257, n_positions=64, n_embd=16, n_layer=2,
                               n_head=2, bos_token_id=50256, eos_token_id=50256)
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    ngpt("prepare", "text", str(root / "text.txt"), "--name", "tiny_bpe", "--data-dir", str(root / "data"), "--quiet")
    return folder, root / "data"


@needs_bpe
def test_a_lora_run_of_a_hf_model_through_every_command_and_peft(hf_base, tmp_path):
    """finetune -> sample -> eval (loss and zero-shot) -> export, and the adapter folder in peft: the same
    logits and the same greedy text as ngpt's."""
    import tiktoken

    folder, data_dir = hf_base
    run = tmp_path / "run"
    ngpt("finetune", "--preset", "finetune-shakespeare-lora", f"--init_from={folder}", "--dataset=tiny_bpe",
         f"--data_dir={data_dir}", f"--out_dir={run}", "--block_size=32", "--batch_size=4",
         "--gradient_accumulation_steps=1", "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--device=cpu",
         "--dtype=float32", "--compile=False", "--lora_rank=4", "--lora_targets=attn,mlp", "--learning_rate=3e-2")
    assert load_checkpoint(run)["lora"]["dropout"] == 0.05  # the preset's
    assert sorted(p.name for p in (run / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(folder.resolve()) and adapter_config["fan_in_fan_out"]

    enc = tiktoken.get_encoding("gpt2")
    idx = torch.tensor([enc.encode("ROMEO: the quick")])
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        before = hf(idx).logits
    with_adapter = peft.PeftModel.from_pretrained(hf, str(run / "adapter")).eval()
    ours = model_from_checkpoint(load_checkpoint(run), str(run))
    with torch.no_grad():
        theirs = with_adapter(idx).logits
        assert not torch.allclose(theirs, before, atol=1e-3)  # the adapters learnt something
        torch.testing.assert_close(logits(ours, idx), theirs, rtol=0, atol=1e-5)
        greedy = with_adapter.generate(input_ids=idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                       max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    sampled = json.loads(ngpt("sample", f"--out_dir={run}", "--prompt", "ROMEO: the quick", "--num_samples=1",
                              "--max_new_tokens=12", "--temperature=0", "--no-stop_at_eot", "--device=cpu",
                              "--dtype=float32", "--json").stdout)
    assert sampled["samples"][0] == enc.decode(greedy[0].tolist())

    lambada = tmp_path / "lambada_test.jsonl"
    lambada.write_text("".join(json.dumps({"text": line}) + "\n" for line in TEXT.splitlines()[:3]), encoding="utf-8")
    report = json.loads(ngpt("eval", f"--out_dir={run}", "--lambada-file", str(lambada), "--dataset=tiny_bpe",
                             f"--data_dir={data_dir}", "--eval_iters=1", "--batch_size=2", "--device=cpu",
                             "--dtype=float32", "--json").stdout)
    assert report["lambada"]["examples"] == 3 and report["val_loss"] > 0

    ngpt("export", str(run), "--to", "hf", str(tmp_path / "merged"))
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, theirs, rtol=0, atol=1e-5)


def test_the_lora_preset_is_nanogpts_finetune_recipe_with_adapters():
    full, adapted = (to_dict(build(TrainConfig, f"finetune-shakespeare{lora}")) for lora in ("", "-lora"))
    assert {key for key in full if full[key] != adapted[key]} == {
        "preset", "out_dir", "wandb_run_name", "learning_rate", "lora_rank", "lora_dropout"}
    assert (adapted["lora_rank"], adapted["init_from"], adapted["learning_rate"]) == (8, "gpt2-xl", 3e-4)
