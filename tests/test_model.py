"""The GPT model: shapes, init, weight tying, cropping, MFU, the two attention forms, the modern options."""

import math

import pytest
import torch
from torch import nn

from nanogpt_cli.model import GPT, DecodingStep, GPTConfig


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_forward_shapes_and_initial_loss():
    model = tiny()
    x = torch.randint(50, (3, 16))
    logits, loss = model(x, x)
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - math.log(50)) < 0.3  # untrained: close to uniform
    logits, loss = model(x)
    assert logits.shape == (3, 1, 50) and loss is None


def test_the_loss_is_the_cross_entropy_of_the_logits_skipping_ignored_targets():
    model = tiny()
    x, y = torch.randint(50, (3, 16)), torch.randint(50, (3, 16))
    y[:, :4] = -1
    logits, loss = model(x, y)
    want = torch.nn.functional.cross_entropy(logits.view(-1, 50), y.view(-1), ignore_index=-1)
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)


def test_weight_tying_and_residual_init():
    model = tiny(n_layer=4)
    assert model.transformer.wte.weight is model.lm_head.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(8)) < 0.003


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_crop_block_size():
    model = tiny()
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 16)
    model(torch.zeros(1, 8, dtype=torch.long))


def test_estimate_mfu():
    model = tiny()
    assert model.estimate_mfu(1000.0, None) is None
    assert model.estimate_mfu(1000.0, 1e12) == pytest.approx(model.flops_per_token() * 1000 / 1e12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explicit_attention_matches_sdpa_with_gradients(dtype):
    """The explicit attention (cpu bf16 training) computes what SDPA does, forward and backward."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=32))
    idx = torch.randint(0, 50, (3, 24))
    results = []
    for kind in ("sdpa", "explicit"):
        model.set_attention(kind)
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((logits.float(), [p.grad.clone() for p in model.parameters()]))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(results[0][0], results[1][0], atol=tol, rtol=tol)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert all(block.attn.attention == "explicit" for block in model.transformer.h)
    with pytest.raises(AssertionError):
        model.set_attention("flash")


@pytest.mark.gpu
def test_on_cuda_sdpa_matches_the_explicit_attention():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=64)).cuda()
    idx = torch.randint(0, 50, (3, 24), device="cuda")
    results = []
    for kind in ("sdpa", "explicit"):  # bf16 on cuda: SDPA's flash or memory-efficient kernel
        model.set_attention(kind)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((logits.float(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=5e-2, rtol=5e-2)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------- the modern options

MODERN = dict(position="rope", norm="rmsnorm", qk_norm=True, embedding_norm=True, activation="relu2",
              tie_embeddings=False, logit_softcap=15.0, zero_init_proj=True, bias=False)


def test_the_defaults_are_gpt2():
    config = GPTConfig()
    assert (config.position, config.norm, config.activation, config.tie_embeddings, config.logit_softcap) == (
        "learned", "layernorm", "gelu_new", True, None)
    assert not (config.qk_norm or config.embedding_norm or config.zero_init_proj)
    names = {name for name, _ in tiny().named_parameters()}
    assert "transformer.wpe.weight" in names and "transformer.ln_e.weight" not in names


def attention_scores(attn, x, rotary):
    q, k, _ = attn.queries_keys_values(x, rotary)
    return q @ k.transpose(-2, -1)  # (B, nh, T, T)


def test_rotary_attention_scores_depend_only_on_relative_position():
    """The same token at every position: with rotary positions the score of query i and key j depends on
    i - j only (and so is the same wherever the window starts); with the learned table it does not."""
    model = tiny(position="rope", rope_base=100.0)
    assert "transformer.wpe.weight" not in dict(model.named_parameters())
    attn = model.transformer.h[0].attn
    x = torch.randn(1, 1, 16).expand(1, 12, 16)
    rotary = lambda start: (model.rope_cos[start:start + 12], model.rope_sin[start:start + 12])  # noqa: E731
    scores = attention_scores(attn, x, rotary(0))
    for shift in range(1, 4):
        torch.testing.assert_close(scores[..., shift:, shift:], scores[..., :-shift, :-shift], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_scores(attn, x, rotary(4)), scores, atol=1e-5, rtol=1e-5)
    assert (scores[..., 0, 0] - scores[..., 5, 0]).abs().max() > 1e-2  # positions do change the scores
    learned = tiny()
    h = learned.transformer.wte(torch.zeros(1, 12, dtype=torch.long)) + learned.transformer.wpe(torch.arange(12))
    plain = attention_scores(learned.transformer.h[0].attn, h, None)
    assert (plain[..., 1:, 1:] - plain[..., :-1, :-1]).abs().max() > 0.1 * plain.abs().max()


def test_qk_norm_gives_unit_rms_queries_and_keys():
    model = tiny(qk_norm=True, position="rope")
    attn = model.transformer.h[1].attn
    x = torch.randn(2, 10, 16) * 7
    q, k, v = attn.queries_keys_values(x, (model.rope_cos[:10], model.rope_sin[:10]))
    for t in (q, k):
        torch.testing.assert_close(t.pow(2).mean(-1).sqrt(), torch.ones(2, 2, 10), atol=1e-4, rtol=0)
    assert (v.pow(2).mean(-1).sqrt() - 1).abs().max() > 0.1  # values are left alone
    q, _, _ = tiny().transformer.h[1].attn.queries_keys_values(x)
    assert (q.pow(2).mean(-1).sqrt() - 1).abs().max() > 0.1


def test_logit_softcap_bounds_the_logits():
    x = torch.randint(50, (2, 16))
    capped, plain = tiny(logit_softcap=3.0), tiny()  # the same weights
    for model in (capped, plain):
        with torch.no_grad():
            model.lm_head.weight.mul_(200)  # logits far beyond the cap
    capped_logits, plain_logits = capped(x, all_logits=True)[0], plain(x, all_logits=True)[0]
    assert plain_logits.abs().max() > 30.0 and capped_logits.abs().max() <= 3.0
    torch.testing.assert_close(capped_logits, 3.0 * torch.tanh(plain_logits / 3.0))
    torch.testing.assert_close(capped(x, x)[0], capped_logits)  # training's logits (and loss) are the capped ones


def test_untied_embedding_and_head_are_separate_parameters():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert untied.transformer.wte.weight is not untied.lm_head.weight
    params = list(untied.parameters())
    assert any(p is untied.transformer.wte.weight for p in params) and any(p is untied.lm_head.weight for p in params)
    assert sum(p.numel() for p in params) == sum(p.numel() for p in tied.parameters()) + 50 * 16
    assert untied.get_num_params() == tied.get_num_params()  # the head counts, the looked-up table does not
    assert untied.flops_per_token() == tied.flops_per_token()
    assert "lm_head.weight" in untied.state_dict() and not torch.equal(untied.state_dict()["lm_head.weight"],
                                                                       untied.state_dict()["transformer.wte.weight"])


def test_zero_initialised_projections_make_each_fresh_block_the_identity():
    model = tiny(zero_init_proj=True, n_layer=3)
    x = torch.randn(2, 8, 16)
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        torch.testing.assert_close(block(x), x, atol=0, rtol=0)
    assert tiny().transformer.h[0].attn.c_proj.weight.any()


def test_relu2_and_the_norms():
    from nanogpt_cli.model import RMSNorm

    model = tiny(activation="relu2", norm="rmsnorm", embedding_norm=True)
    x = torch.linspace(-2, 2, 9)
    torch.testing.assert_close(model.transformer.h[0].mlp.act(x), torch.clamp(x, min=0) ** 2)
    assert isinstance(model.transformer.ln_e, RMSNorm) and isinstance(model.transformer.h[0].ln_1, RMSNorm)
    h = torch.randn(3, 16) * 5 + 2
    torch.testing.assert_close(model.transformer.ln_f(h), h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())


def test_flop_count_follows_the_options():
    """6N + 12 L H Q T with N the multiplied parameters: no position table with rotary (the learned table is
    left out too), the head once whether tied or not, RMSNorm without the LayerNorm biases."""
    modern, gpt2 = tiny(**MODERN), tiny()
    matrices = sum(p.numel() for name, p in modern.named_parameters() if name != "transformer.wte.weight")
    assert modern.get_num_params() == matrices
    assert modern.flops_per_token() == 6 * matrices + 12 * 2 * 2 * 8 * 16
    biases = sum(p.numel() for name, p in gpt2.named_parameters() if name.endswith(".bias"))
    ln_e = 16
    assert modern.get_num_params() == gpt2.get_num_params() - biases + ln_e


def test_every_option_together_trains_and_crops():
    model = tiny(**MODERN).train()
    x = torch.randint(50, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    assert abs(loss.item() - math.log(50)) < 0.3 and all(p.grad is not None for p in model.parameters())
    model.crop_block_size(8)
    assert model.rope_cos.shape == (8, 8)
    model(x[:, :8])
    with pytest.raises(ValueError, match="block_size"):
        model(x[:, :9])


@pytest.mark.parametrize("change, message", [
    (dict(position="alibi"), "position"), (dict(norm="batchnorm"), "norm"), (dict(activation="swish"), "activation"),
    (dict(position="rope", n_head=16), "even head size"), (dict(logit_softcap=0.0), "logit_softcap"),
    (dict(position="rope", rope_base=-1.0), "rope_base")])
def test_the_model_refuses_options_it_cannot_build(change, message):
    with pytest.raises(AssertionError, match=message):
        tiny(**change)


# ---------------------------------------------------------------- the decoding step


def decode_both(model, steps: int = 6, rows: int = 2, prompt: int = 5):
    """Logits of `steps` single-token steps after a prompt, through GPT.forward and through DecodingStep, each
    with its own KV cache; the same tokens are fed to both."""
    from nanogpt_cli.generate import KVCache

    torch.manual_seed(1)
    idx = torch.randint(model.config.vocab_size, (rows, prompt))
    caches = [KVCache(model.config, rows, "cpu") for _ in range(2)]
    step = DecodingStep(model)
    pairs = []
    with torch.inference_mode():
        for cache in caches:
            model(idx, kv_cache=cache)
        for _ in range(steps):
            token = torch.randint(model.config.vocab_size, (rows, 1))
            pairs.append((model(token, kv_cache=caches[0])[0], step(token, caches[1])))
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist() == [prompt + steps] * rows
    return pairs


DECODING_OPTIONS = {"gpt2": {}, "modern": {**MODERN, "zero_init_proj": False}, "no-bias": {"bias": False},
                    "rmsnorm-only": {"norm": "rmsnorm"}, "rope-only": {"position": "rope"},
                    "qk-norm-only": {"qk_norm": True}, "exact-gelu": {"activation": "gelu"}}


@pytest.mark.parametrize("options", DECODING_OPTIONS.values(), ids=DECODING_OPTIONS.keys())
def test_the_decoding_step_gives_the_forwards_logits_for_every_option(options):
    model = tiny(**options)
    for forward, step in decode_both(model):
        assert step.shape == forward.shape == (2, 1, model.config.vocab_size)
        torch.testing.assert_close(step, forward, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype,quantize", [("float32", "none"), ("bfloat16", "none"), ("float32", "int8")])
@pytest.mark.parametrize("kernel", ["mkl", "onednn"])
def test_the_decoding_step_binds_each_precisions_linears(monkeypatch, dtype, quantize, kernel):
    import nanogpt_cli.precision as precision

    monkeypatch.setattr(precision, "cpu_linear_kernel", lambda: kernel)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)  # bf16's one row through VectorLinear
    model = precision.for_inference(tiny(), torch.device("cpu"), dtype, quantize)
    kinds = {type(m) for m in model.modules() if isinstance(m, (nn.Linear, precision.Int8Linear))}
    expected = {("float32", "none"): {"mkl": nn.Linear, "onednn": precision.OneDNNLinear},
                ("bfloat16", "none"): {"mkl": precision.VectorLinear, "onednn": precision.OneDNNLinear},
                ("float32", "int8"): {"mkl": precision.Int8Linear, "onednn": precision.Int8Linear}}[dtype, quantize]
    assert kinds == {expected[kernel]}
    calls = []
    for cls in (precision.OneDNNLinear, precision.VectorLinear, precision.Int8Linear, nn.Linear):
        monkeypatch.setattr(cls, "__call__", lambda self, *a, calls=calls: calls.append(self) or nn.Module.__call__(
            self, *a), raising=False)
    for forward, step in decode_both(model):
        torch.testing.assert_close(step, forward, atol=0, rtol=0)  # the same kernels on the same inputs
    # the forward's module calls (2 prefills, 6 steps); none of the step's
    assert len(calls) == (2 + 6) * (4 * model.config.n_layer + 1)


def test_a_batchs_decoding_step_through_the_native_rows_gives_the_forwards_logits(monkeypatch):
    import nanogpt_cli.precision as precision
    from nanogpt_cli import native

    kernel = native.int8_kernel()
    if kernel is None:
        pytest.skip(f"no native kernel here: {native.int8_kernel_status()}")
    rows = []
    monkeypatch.setattr(precision, "cpu_linear_kernel", lambda: "mkl")
    monkeypatch.setattr(precision, "float_rows_native", lambda route: True)  # an Ice Lake Xeon's choice
    monkeypatch.setattr(type(kernel), "float_linear",
                        lambda self, *a, real=type(kernel).float_linear: rows.append(a[4]) or real(self, *a))
    model = precision.for_inference(tiny(), torch.device("cpu"), "float32", rows=3)
    assert {type(m) for m in model.modules() if isinstance(m, nn.Linear)} == {precision.RowsLinear}
    pairs = decode_both(model, rows=3, prompt=6)  # the prefills' 18 rows through MKL, each step's 3 the kernel
    for forward, step in pairs:
        torch.testing.assert_close(step, forward, atol=0, rtol=0)
    # every Linear of the 6 steps both ways, and each prefill's head (its rows' last positions only)
    assert set(rows) == {3} and len(rows) == 2 * 6 * (4 * model.config.n_layer + 1) + 2
    reference = decode_both(tiny(), rows=3, prompt=6)  # the same weights through torch's Linear
    for (forward, _), (expected, _) in zip(pairs, reference, strict=True):
        torch.testing.assert_close(forward, expected, atol=1e-5, rtol=1e-5)  # the kernel's float rounding


def test_the_decoding_step_calls_modules_it_cannot_bind_and_falls_back_to_the_forward(monkeypatch):
    from nanogpt_cli.generate import KVCache

    class Wrapped(nn.Module):  # a module bound() does not know (as a LoRA layer): called as it is
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    model = tiny(block_size=8)
    wrapped = model.transformer.h[0].mlp.c_fc = Wrapped(model.transformer.h[0].mlp.c_fc)
    forwards = []
    real = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, *a, **k: forwards.append(a[0].shape) or real(self, *a, **k))
    step = DecodingStep(model)
    cache = KVCache(model.config, 2, "cpu")
    with torch.inference_mode():
        model(torch.randint(50, (2, 3)), kv_cache=cache)  # a prefill: the forward's
        step(torch.randint(50, (2, 1)), cache)  # the step's, the wrapped Linear called
        assert len(forwards) == 1 and wrapped.calls == 2
        frozen = cache.rows(slice(0, 2), frozen=torch.tensor([False, True]))  # rows that differ
        step(torch.randint(50, (2, 1)), frozen)
        assert len(forwards) == 2 and cache.lengths.tolist() == [5, 4]
        full = KVCache(model.config, 1, "cpu")
        model(torch.randint(50, (1, 8)), kv_cache=full)
        with pytest.raises(ValueError, match="longer than block_size"):  # past the block: the forward's error
            step(torch.randint(50, (1, 1)), full)
        seen = []  # forward hooks anywhere, or global ones, which the loop would skip: every step the forward's
        for register in (model.transformer.h[1].register_forward_hook, nn.modules.module.register_module_forward_hook):
            handle = register(lambda module, args, out: seen.append(1))
            hooked = KVCache(model.config, 1, "cpu")
            model(torch.randint(50, (1, 3)), kv_cache=hooked)
            calls = len(forwards)
            for forward, decoded in decode_both(model, steps=2, rows=1):
                torch.testing.assert_close(decoded, forward, atol=0, rtol=0)
            DecodingStep(model)(torch.randint(50, (1, 1)), hooked)
            assert len(forwards) == calls + 2 + 2 * 2 + 1 and seen  # prefills, both sides' steps, this step
            handle.remove()
            seen.clear()
