"""`ngpt eval` (loss and perplexity per split) and `ngpt finetune` from pretrained weights, with a tiny
GPT-2 saved as a Hugging Face folder and Tiny Shakespeare prepared in GPT-2 BPE; bits per byte."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from nanogpt_cli.cli import app
from nanogpt_cli.config import TrainConfig, build
from nanogpt_cli.data import BatchLoader, load_meta
from nanogpt_cli.errors import UsageError
from nanogpt_cli.evaluate import evaluate_loss, run_eval
from nanogpt_cli.model import GPT, GPTConfig
from nanogpt_cli.tokenizer import from_meta
from tests.conftest import require_module, shared_file

transformers = require_module("transformers")
runner = CliRunner()
CPU = torch.device("cpu")


def ngpt(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def shakespeare_bpe(tmp_path_factory):
    """Tiny Shakespeare in GPT-2 BPE, prepared by `ngpt prepare shakespeare` from the shared copy."""
    source = shared_file("NGPT_TEST_SHAKESPEARE")
    data_dir = tmp_path_factory.mktemp("data")
    ngpt("prepare", "shakespeare", "--source", str(source), "--data-dir", str(data_dir), "--quiet")
    assert load_meta(data_dir / "shakespeare")["tokenizer"] == "gpt2"
    return data_dir


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


class TransformersLoss(torch.nn.Module):
    """A transformers model behind ngpt's (logits, loss) interface: the reference."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        logits = self.model(x).logits
        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def test_eval_of_an_hf_folder_matches_transformers_on_the_same_batches(shakespeare_bpe, hf_folder):
    args = (f"--init_from={hf_folder}", "--dataset=shakespeare", f"--data_dir={shakespeare_bpe}", "--eval_iters=3",
            "--batch_size=2", "--block_size=48", "--device=cpu", "--dtype=float32", "--seed=7")
    report = json.loads(ngpt("eval", *args, "--json").stdout)
    assert report["model"] == str(hf_folder) and report["dataset"] == "shakespeare" and report["block_size"] == 48
    assert report["tokens_per_split"] == 3 * 2 * 48

    folder = shakespeare_bpe / "shakespeare"
    loader = BatchLoader(folder, load_meta(folder), 2, 48, CPU, seed=7)
    reference = TransformersLoss(transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval())
    want = evaluate_loss(reference, loader, 3, CPU, "float32", seed=7)
    for split in ("train", "val"):
        assert report[f"{split}_loss"] == pytest.approx(want[split], abs=1e-5)
        assert report[f"{split}_perplexity"] == pytest.approx(math.exp(want[split]), rel=1e-5)
        assert 9 < report[f"{split}_loss"] < 12  # a random model: about ln(50257) = 10.8

    table = ngpt("eval", *args).stdout  # the human-readable table
    assert "perplexity" in table and "val" in table and f"{report['val_loss']:.4f}" in table


def test_eval_gpt2_presets_are_nanogpts_and_run_with_a_local_model(shakespeare_bpe, hf_folder):
    for size in ("", "-medium", "-large", "-xl"):
        cfg = build(TrainConfig, f"eval-gpt2{size}")
        assert (cfg.init_from, cfg.batch_size, cfg.eval_iters, cfg.eval_only, cfg.wandb_log) == (
            f"gpt2{size}", 8, 500, True, False)
        assert cfg.dataset == "openwebtext"
    report = json.loads(ngpt("eval", "--preset", "eval-gpt2", f"--init_from={hf_folder}", "--dataset=shakespeare",
                             f"--data_dir={shakespeare_bpe}", "--eval_iters=1", "--block_size=32", "--device=cpu",
                             "--json").stdout)
    assert report["tokens_per_split"] == 1 * 8 * 32 and report["val_loss"] > 0


def test_eval_refuses_a_dataset_of_another_vocabulary(tmp_path, data_dir, hf_folder):
    result = ngpt("eval", f"--init_from={hf_folder}", "--dataset=tiny_char", f"--data_dir={data_dir}",
                  "--device=cpu", code=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "uses the 'char' tokenizer but the model was trained with 'gpt2'" in lines[0]


def test_finetune_preset_from_a_tiny_hf_model_on_shakespeare_bpe(tmp_path, shakespeare_bpe, hf_folder):
    out = tmp_path / "ft"
    common = (f"--data_dir={shakespeare_bpe}", f"--out_dir={out}", "--device=cpu", "--dtype=float32",
              "--compile=False", "--eval_iters=2", "--eval_interval=2", "--max_iters=2",
              "--always_save_checkpoint=True")  # the preset saves only on a better val loss
    # a block size longer than the model's is refused (cropping is asked for, never silent); without one the
    # finetune takes the model's own
    result = ngpt("finetune", "--preset", "finetune-shakespeare", f"--init_from={hf_folder}", "--block_size=1024",
                  *common, code=2)
    assert "larger than the model's 64" in result.stderr
    ngpt("finetune", "--preset", "finetune-shakespeare", f"--init_from={hf_folder}", "--block_size=32",
         "--gradient_accumulation_steps=2", *common)

    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["model_args"]["block_size"] == 32 and ckpt["model"]["transformer.wpe.weight"].shape == (32, 32)
    assert ckpt["model_args"]["vocab_size"] == 50257 and ckpt["model_args"]["bias"] is True
    assert ckpt["meta"]["tokenizer"] == "gpt2"
    config = ckpt["config"]  # nanoGPT's finetune_shakespeare.py values, with this run's overrides
    assert (config["batch_size"], config["learning_rate"], config["decay_lr"], config["dataset"]) == (
        1, 3e-5, False, "shakespeare")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in steps if "loss" in r] == [3e-5, 3e-5, 3e-5]  # constant
    assert [r["iter"] for r in steps if "val_loss" in r] == [0, 2]

    start = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).state_dict()["transformer.h.0.mlp.c_fc.weight"]
    assert not torch.equal(ckpt["model"]["transformer.h.0.mlp.c_fc.weight"], start.t())  # it trained

    # the finetuned run evaluates, and finetunes again from its own checkpoint
    report = json.loads(ngpt("eval", f"--out_dir={out}", "--dataset=shakespeare", f"--data_dir={shakespeare_bpe}",
                             "--eval_iters=2", "--batch_size=2", "--device=cpu", "--json").stdout)
    assert report["block_size"] == 32 and report["val_loss"] > 0
    ngpt("finetune", "--preset", "finetune-shakespeare", f"--init_from={out}", "--block_size=16",
         *common[:1], f"--out_dir={tmp_path / 'ft2'}", *common[2:])
    again = torch.load(tmp_path / "ft2" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert again["model_args"]["block_size"] == 16


def test_run_eval_of_scratch_evaluates_the_out_dirs_checkpoint_and_leaves_the_config_alone(tiny_cfg):
    from nanogpt_cli.train import train

    cfg = tiny_cfg("--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2")
    train(cfg)
    before = dataclasses.replace(cfg)
    report = run_eval(cfg, [])
    assert cfg == before and cfg.init_from == "scratch"
    assert report["model"] == cfg.out_dir and report["dataset"] == "tiny_char" and report["val_loss"] > 0
    with pytest.raises(UsageError, match="--limit applies to the zero-shot benchmarks"):
        run_eval(cfg, [], limit=5)


def test_eval_of_a_run_uses_the_runs_own_dataset(tmp_path, data_dir):
    """`ngpt eval --out_dir RUN` without --dataset: the run's dataset (and data folder), not openwebtext."""
    from nanogpt_cli.train import run_config, train
    from tests.conftest import TINY

    train(run_config(None, [*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'run'}", "--max_iters=3"]))
    report = json.loads(ngpt("eval", f"--out_dir={tmp_path / 'run'}", "--device=cpu", "--eval_iters=1",
                             "--json").stdout)
    assert report["dataset"] == "tiny_char" and report["val_loss"] > 0


def test_sampling_a_hugging_face_folder_as_a_run_points_at_init_from(hf_folder):
    result = ngpt("sample", f"--out_dir={hf_folder}", "--device=cpu", code=2)
    assert f"is a Hugging Face model folder, not an ngpt run: load it with --init_from={hf_folder}" in result.stderr


def tiny_model(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16)).eval()


def test_bits_per_byte_of_a_char_model_of_ascii_text_are_its_loss_over_ln2(data_dir):
    folder = data_dir / "tiny_char"  # conftest's TEXT: ASCII, one byte per character
    meta = load_meta(folder)
    loader = BatchLoader(folder, meta, 4, 16, CPU, seed=1)
    result = evaluate_loss(tiny_model(meta["vocab_size"]), loader, 3, CPU, "float32", seed=7)
    for split in ("train", "val"):
        assert result[f"{split}_bpb"] == pytest.approx(result[split] / math.log(2), rel=1e-12)


def test_bits_per_byte_of_a_bpe_model_divide_by_the_bytes_the_targets_stand_for(tmp_path):
    """The summed cross-entropy in bits over the UTF-8 bytes of the target tokens (<|endoftext|>: none),
    worked out here from the logits and each token's bytes."""
    from nanogpt_cli.prepare import PrepareOptions, prepare_text

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Doc {i}: naïve café, {w} 🤖 the end."}) + "\n"
                            for i, w in enumerate(["alpha", "beta", "gamma", "delta"] * 60)), encoding="utf-8")
    prepare_text([str(docs)], PrepareOptions(data_dir=tmp_path, tokenizer="bpe:300", quiet=True, val_fraction=0.2))
    folder = tmp_path / "docs"
    meta = load_meta(folder)
    tokenizer = from_meta(meta)
    model = tiny_model(320)
    result = evaluate_loss(model, BatchLoader(folder, meta, 4, 16, CPU), 3, CPU, "float32", seed=7)

    loader = BatchLoader(folder, meta, 4, 16, CPU)
    for i, split in enumerate(("train", "val")):
        loader.generator.manual_seed(7 + 104729 * i)  # evaluate_loss's batches for this seed
        nats = n_bytes = 0.0
        for _ in range(3):
            X, Y = loader.batch(split, loader.pick(split))
            with torch.no_grad():
                logits = model(X, all_logits=True)[0]
            nats += torch.nn.functional.cross_entropy(logits.flatten(0, 1), Y.flatten(), reduction="sum").item()
            n_bytes += sum(0 if t == tokenizer.eot_token else len(tokenizer.enc.decode_single_token_bytes(t))
                           for t in Y.flatten().tolist())
        assert result[f"{split}_bpb"] == pytest.approx(nats / n_bytes / math.log(2), rel=1e-6)
        assert result[f"{split}_bpb"] < result[split] / math.log(2) / 1.5  # a token stands for several bytes
