"""Hugging Face GPT-2 interop (both directions), on tiny models made here."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from nanogpt_cli import hf, hub
from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.model import GPT, GPTConfig
from nanogpt_cli.tokenizer import CharTokenizer, from_meta
from tests.conftest import needs_bpe, require_module

transformers = require_module("transformers")

TOL = 1e-5


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may touch the network: the hub is off, so any attempt fails at once."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Non-trivial values everywhere (transformers and ngpt start biases at 0 and norms at 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm_gain = ".ln_" in f".{name}" and name.endswith(".weight")
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if norm_gain else 0.0))


def make_hf_folder(path, seed=0, **overrides):
    """A random GPT2LMHeadModel saved with save_pretrained; returns (folder, model)."""
    args = dict(vocab_size=97, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    args.update(overrides)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**args)).eval()
    _randomize(model, seed)
    model.save_pretrained(str(path))
    return path, model


def ngpt_logits(model: GPT, idx):
    with torch.no_grad():
        return model(idx, all_logits=True)[0]


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def ngpt_greedy(model: GPT, idx, n):
    return torch.cat([idx, *model.generate(idx, n, temperature=0)], dim=1)


def hf_greedy(model, idx, n):
    with torch.no_grad():
        return model.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=0)


# --------------------------------------------------------------------------- import: parity


@pytest.mark.parametrize(
    "vocab,block,n_layer,n_head,n_embd",
    [(97, 16, 1, 1, 8), (256, 32, 2, 4, 32), (1000, 24, 3, 3, 24), (50257, 12, 1, 2, 8)],
)
def test_import_matches_transformers(tmp_path, vocab, block, n_layer, n_head, n_embd):
    _check_import_parity(tmp_path, vocab, block, n_layer, n_head, n_embd)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh", "gelu", "relu2"])
def test_import_keeps_the_models_gelu(tmp_path, activation):
    """GPT-2 uses the tanh GELU; a GPT-2 trained with the exact one (nanoGPT's) or ReLU² imports exactly too."""
    model = _check_import_parity(tmp_path, 256, 32, 2, 4, 32, activation_function=activation)
    assert model.config.activation == {"gelu_pytorch_tanh": "gelu_new"}.get(activation, activation)


def _check_import_parity(tmp_path, vocab, block, n_layer, n_head, n_embd, **overrides) -> GPT:
    folder, ref = make_hf_folder(tmp_path / "m", seed=vocab, vocab_size=vocab, n_positions=block,
                                 n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides)
    model, meta = hf.load_hf_gpt2(str(folder))
    model.eval()
    cfg = model.config
    shape = (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd)
    assert shape == (vocab, block, n_layer, n_head, n_embd)
    assert cfg.bias is True and cfg.dropout == 0.0
    tied = overrides.get("tie_word_embeddings", True)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied == cfg.tie_embeddings
    assert all(p.dtype == torch.float32 and not p.is_meta for p in model.parameters())
    if vocab == 50257:
        assert meta == {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256}
    else:
        assert meta == {"tokenizer": None, "vocab_size": vocab}

    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (3, block), generator=g)
    torch.testing.assert_close(ngpt_logits(model, idx), hf_logits(ref, idx), atol=TOL, rtol=0)
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    with torch.no_grad():
        ref_loss = ref(idx, labels=idx).loss
    torch.testing.assert_close(loss, ref_loss, atol=TOL, rtol=0)

    prompt = idx[:2, :3]
    n = block - 3
    assert torch.equal(ngpt_greedy(model, prompt, n), hf_greedy(ref, prompt, n))
    return model


def test_import_dropout_override(tmp_path):
    folder, _ = make_hf_folder(tmp_path / "m")
    model, _ = hf.load_hf_gpt2(str(folder), dropout=0.1)
    assert model.config.dropout == 0.1


# --------------------------------------------------------------------------- export


def test_export_no_bias_model_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=16, bias=False)).eval()
    _randomize(model, 3)
    itos = [chr(32 + i) for i in range(65)]
    meta = {"tokenizer": "char", "vocab_size": 65, "itos": itos}
    dest = hf.export_hf(model, tmp_path / "out", meta)

    assert (dest / "model.safetensors").is_file() and (dest / "config.json").is_file()
    assert not (dest / "vocab.json").exists()  # not GPT-2's files: a character tokenizer of its own
    tok = transformers.AutoTokenizer.from_pretrained(str(dest))
    text = "HELLO, WORLD! 'QUOTED'  SPACED   OUT: " + "".join(itos)  # characters 32-96 only
    ids = tok(text)["input_ids"]
    assert ids == CharTokenizer(itos).encode(text) and tok.decode(ids) == text
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(dest)).eval()
    assert all(not t.any() for k, t in ref.state_dict().items() if k.endswith(".bias"))  # zero = no bias
    idx = torch.randint(0, 65, (2, 16))
    torch.testing.assert_close(hf_logits(ref, idx), ngpt_logits(model, idx), atol=TOL, rtol=0)
    assert torch.equal(hf_greedy(ref, idx[:, :4], 12), ngpt_greedy(model, idx[:, :4], 12))

    back, back_meta = hf.load_hf_gpt2(str(dest))  # ngpt_meta.json brings the char vocab and bias=False back
    assert back_meta == meta
    assert back.config == model.config
    _assert_same_state(back, model)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(("bias", "activation"), [(True, "gelu_new"), (False, "gelu_new"), (True, "gelu"),
                                                  (False, "gelu")])
def test_export_logits_and_round_trip(tmp_path, bias, activation):
    """Models trained from scratch (exact GELU) and imported GPT-2s (tanh GELU) both export exactly."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=24, vocab_size=300, n_layer=2, n_head=4, n_embd=32, bias=bias,
                          activation=activation)).eval()
    _randomize(model, 4)
    dest = hf.export_hf(model, tmp_path / "hf", {"tokenizer": None, "vocab_size": 300})
    config = json.loads((dest / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_positions"] == 24 and config["vocab_size"] == 300
    assert config.get("tie_word_embeddings", True) is True  # transformers 4 leaves defaults out
    assert config["activation_function"] == activation
    assert (dest / "generation_config.json").is_file()
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(dest)).eval()
    idx = torch.randint(0, 300, (2, 24))
    torch.testing.assert_close(hf_logits(ref, idx), ngpt_logits(model, idx), atol=TOL, rtol=0)
    back, _ = hf.load_hf_gpt2(str(dest))
    _assert_same_state(back, model)
    assert back.config.activation == activation


def test_export_of_the_options_gpt2_computes(tmp_path):
    """ReLU², an untied head and zero-initialised projections are GPT-2 in transformers too: logits match and the
    model comes back as it went."""
    torch.manual_seed(2)
    model = GPT(GPTConfig(block_size=16, vocab_size=80, n_layer=2, n_head=2, n_embd=16, bias=False,
                          activation="relu2", tie_embeddings=False, zero_init_proj=True)).eval()
    _randomize(model, 6)
    dest = hf.export_hf(model, tmp_path / "hf", {"tokenizer": None, "vocab_size": 80})
    config = json.loads((dest / "config.json").read_text())
    assert config["activation_function"] == "relu2" and config["tie_word_embeddings"] is False
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(dest)).eval()
    idx = torch.randint(0, 80, (2, 16))
    torch.testing.assert_close(hf_logits(ref, idx), ngpt_logits(model, idx), atol=TOL, rtol=0)
    back, _ = hf.load_hf_gpt2(str(dest))
    _assert_same_state(back, model)
    assert (back.config.activation, back.config.tie_embeddings) == ("relu2", False)


@pytest.mark.parametrize("option", [dict(position="rope"), dict(norm="rmsnorm"), dict(qk_norm=True),
                                    dict(embedding_norm=True), dict(logit_softcap=30.0)], ids=str)
def test_export_refuses_what_gpt2_cannot_compute_naming_the_option(tmp_path, option):
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8, **option))
    with pytest.raises(UsageError) as e:
        hf.export_hf(model, tmp_path / "hf", {"tokenizer": None, "vocab_size": 16})
    key, value = next(iter(option.items()))
    assert f"{key}={value}" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_hf_import_export_import_is_lossless(tmp_path):
    folder, ref = make_hf_folder(tmp_path / "a", seed=5, vocab_size=128, n_positions=20, n_layer=2, n_head=2, n_embd=16)
    model, meta = hf.load_hf_gpt2(str(folder))
    dest = hf.export_hf(model, tmp_path / "b", meta)
    again, meta2 = hf.load_hf_gpt2(str(dest))
    _assert_same_state(again, model)
    assert meta2 == meta
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(dest))
    s_ref, s_new = ref.state_dict(), reloaded.state_dict()
    for k, v in s_ref.items():
        assert torch.equal(v, s_new[k]), k


def test_export_refuses_a_file_destination(tmp_path):
    (tmp_path / "f").write_text("x")
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(UsageError):
        hf.export_hf(model, tmp_path / "f", {"tokenizer": None, "vocab_size": 16})


@needs_bpe
def test_export_writes_gpt2_tokenizer(tmp_path):
    """A GPT-2 BPE model exports with tokenizer files that transformers loads and that encode as ngpt does
    (the files themselves: test_hf_tokenizer.py)."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    model = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=8)).eval()
    dest = hf.export_hf(model, tmp_path / "bpe", {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256})
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dest / name).is_file(), name
    gen = json.loads((dest / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 50256 and gen["bos_token_id"] == 50256

    tok = transformers.GPT2TokenizerFast.from_pretrained(str(dest))
    assert len(tok) == 50257 and tok.eos_token_id == 50256 and tok.model_max_length == 32
    text = "It's 3.14159 — naïve café's déjà vu!\n\n\tTabs   and  spaces  "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == enc.encode_ordinary(text) and tok.decode(ids) == text

    back, meta = hf.load_hf_gpt2(str(dest))
    assert back.config.vocab_size == 50304 and meta["tokenizer"] == "gpt2"


def test_export_writes_a_trained_bpe_that_autotokenizer_encodes_as_ngpt(tmp_path):
    """A model of a `--tokenizer bpe:N` dataset exports its tokenizer.json: AutoTokenizer gives ngpt's ids, and the
    folder comes back with the same tokenizer (the same sha256), so it trains on the same datasets."""
    from nanogpt_cli.prepare.bpe import train_bpe

    text = "".join(f"{w} the quick brown fox, naïve café {i} 🤖 jumps over the lazy dog\n"
                   for i, w in enumerate(["ROMEO:", "JULIET:", "日本語:"] * 300))
    bpe = train_bpe(iter([text]), 400, "text")
    model = GPT(GPTConfig(block_size=16, vocab_size=448, n_layer=1, n_head=2, n_embd=8)).eval()
    dest = hf.export_hf(model, tmp_path / "bpe", bpe.meta())
    tok = transformers.AutoTokenizer.from_pretrained(str(dest))
    assert tok.eos_token_id == bpe.eot_token == 399 and tok.model_max_length == 16
    assert json.loads((dest / "config.json").read_text())["eos_token_id"] == 399
    for sample in (text[:500], "Unseen: Ελληνικά, русский, 12345 'll 've\r\n\u00a0 ok  ", "x" * 40):
        ids = tok(sample)["input_ids"]
        assert ids == bpe.encode(sample) and tok.decode(ids) == sample
    back, meta = hf.load_hf_gpt2(str(dest))
    assert back.config.vocab_size == 448 and meta["tokenizer_sha256"] == bpe.sha256
    assert from_meta(meta).encode(text[:200]) == bpe.encode(text[:200])


# --------------------------------------------------------------------------- errors


def test_is_hf_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-community/gpt2", "someone/some-gpt2"):
        assert hf.is_hf_source(name), name
    for name in ("scratch", "resume", "", "llama7b"):
        assert not hf.is_hf_source(name), name
    (tmp_path / "with_config").mkdir()
    (tmp_path / "with_config" / "config.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    (tmp_path / "runs" / "one").mkdir(parents=True)
    assert hf.is_hf_source(str(tmp_path / "with_config")) and hf.is_hf_source("with_config")
    assert not hf.is_hf_source(str(tmp_path / "plain"))
    assert not hf.is_hf_source("runs/one")  # an existing local path is never a hub id
    (tmp_path / "ckpt.pt").write_bytes(b"")
    assert not hf.is_hf_source(str(tmp_path / "ckpt.pt"))


@pytest.mark.parametrize("name", ["gpt2-huge", "llama7b", "not a model"])
def test_unknown_name(name):
    with pytest.raises(UsageError) as e:
        hf.load_hf_gpt2(name)
    message = str(e.value)
    assert "\n" not in message and "gpt2-medium" in message and "gpt2-xl" in message


def test_folder_of_another_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(UsageError, match="llama"):
        hf.load_hf_gpt2(str(tmp_path))


def test_folder_without_config(tmp_path):
    with pytest.raises(UsageError, match="config.json"):
        hf.load_hf_gpt2(str(tmp_path))


def test_hub_unreachable():
    with pytest.raises(NgptError) as e:
        hf.load_hf_gpt2("someone/some-gpt2")
    message = str(e.value)
    assert "could not be reached" in message and "--init_from=" in message and "\n" not in message


@pytest.mark.parametrize(
    "override,word",
    [({"activation_function": "relu"}, "activation_function"),
     ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
     ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
     ({"n_inner": 24}, "n_inner"),
     ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon")],
)
def test_refuses_unrepresentable_options(tmp_path, override, word):
    folder, _ = make_hf_folder(tmp_path / "m", **override)
    with pytest.raises(UsageError, match=word):
        hf.load_hf_gpt2(str(folder))


def test_an_untied_output_layer_imports_untied(tmp_path):
    model = _check_import_parity(tmp_path, 256, 32, 2, 4, 32, tie_word_embeddings=False)
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)


def test_transformers_missing(tmp_path, monkeypatch):
    folder, _ = make_hf_folder(tmp_path / "m")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(NgptError, match=r"pip install 'nanogpt-cli\[hf\]'"):
        hf.load_hf_gpt2(str(folder))
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(NgptError, match="hf extra"):
        hf.export_hf(model, tmp_path / "out", {"tokenizer": None, "vocab_size": 16})


def test_no_network_is_one_line_without_the_hubs_retry_warnings(monkeypatch, caplog):
    """A real failed hub download (a refused connection, retries made instant): huggingface_hub's
    per-retry warnings stay hidden (shown with --verbose) and ngpt's one line says how to pass a local folder."""
    import logging
    import time

    import huggingface_hub.constants as hub_constants

    from nanogpt_cli.progress import configure

    endpoint = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)  # a host that answers, then fails: the retry path
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level

    def hub_warnings():
        return [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub")]

    caplog.set_level(logging.DEBUG)
    configure()
    try:
        with pytest.raises(NgptError) as e:
            hf.load_hf_gpt2("someone/some-gpt2")
        message = str(e.value)
        assert "could not be reached" in message and "--init_from=" in message and "\n" not in message
        assert hub_warnings() == []
        assert hub_logger.level == level  # restored

        configure(verbose=True)
        with pytest.raises(NgptError):
            hf.load_hf_gpt2("someone/some-gpt2")
        assert any("Retry" in m for m in hub_warnings())  # the hub really retried: the test did reach it
    finally:
        configure()


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """A machine without network, with the Hub client not told so: a refused endpoint and an empty cache."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return tmp_path / "hub-cache"


def test_an_offline_machine_is_told_at_once_without_the_hubs_retries(unreachable_hub, monkeypatch):
    import time

    def no_retries(seconds):
        raise AssertionError("the Hub client retried")

    monkeypatch.setattr(time, "sleep", no_retries)
    assert hub.hub_reachable() is False
    with pytest.raises(NgptError, match="could not be reached"):
        hf.load_hf_gpt2("someone/some-gpt2")


def test_an_offline_machine_loads_a_cached_hub_model(unreachable_hub, tmp_path):
    folder, reference = make_hf_folder(tmp_path / "src", n_layer=1)
    repo = unreachable_hub / "models--someone--tiny-gpt2"  # the Hub cache's layout: refs/main -> snapshot
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(folder, repo / "snapshots" / "0123abcd")
    model, _ = hf.load_hf_gpt2("someone/tiny-gpt2")
    torch.testing.assert_close(model.lm_head.weight, reference.lm_head.weight)


def test_incomplete_or_misshapen_weights_are_refused_not_randomly_filled(tmp_path, capfd):
    """transformers fills missing weights, and weights of the wrong shape, with random values and
    only logs it: ngpt refuses such folders with one line, and the load report stays out of the output."""
    from safetensors.torch import load_file, save_file

    folder, _ = make_hf_folder(tmp_path / "partial", n_layer=2)
    weights = load_file(folder / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    capfd.readouterr()
    with pytest.raises(NgptError, match=r"lacks weights \(transformer\.h\.1\.mlp\.c_fc\.weight\)"):
        hf.load_hf_gpt2(str(folder))
    assert "LOAD REPORT" not in capfd.readouterr().err

    folder, _ = make_hf_folder(tmp_path / "mismatch")
    config = json.loads((folder / "config.json").read_text())
    config["n_positions"] = 32  # the saved wpe has 16 rows
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(NgptError, match=r"transformer\.wpe\.weight \(16, 8\) \(config\.json wants \(32, 8\)\)"):
        hf.load_hf_gpt2(str(folder))
    assert "LOAD REPORT" not in capfd.readouterr().err

    folder, _ = make_hf_folder(tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NgptError, match="could not load the weights in") as e:
        hf.load_hf_gpt2(str(folder))
    assert "\n" not in str(e.value)
