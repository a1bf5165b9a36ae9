"""Config resolution: defaults < preset < command line, coercion, errors, every preset."""

import pytest

from nanogpt_cli.config import (
    EVAL_KEYS,
    SampleConfig,
    TrainConfig,
    build,
    coerce,
    field_types,
    help_epilog,
    list_presets,
    load_preset,
    parse_overrides,
    resolve_preset,
    to_toml,
)
from nanogpt_cli.errors import UsageError


def test_nanogpt_spelling_and_dashes_and_spaces():
    cfg = build(TrainConfig, "shakespeare-char",
                ["--n_layer=4", "--n-head", "4", "--learning_rate=1", "--compile=False", "--batch-size", "12"])
    assert (cfg.n_layer, cfg.n_head, cfg.batch_size) == (4, 4, 12)
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.compile is False
    assert cfg.n_embd == 384  # from the preset
    assert cfg.max_iters == 5000


def test_precedence_defaults_preset_command_line():
    assert build(TrainConfig).dropout == 0.0
    assert build(TrainConfig, "shakespeare-char").dropout == 0.2
    assert build(TrainConfig, "shakespeare-char", ["--dropout=0.0"]).dropout == 0.0


def test_booleans_every_way():
    assert build(TrainConfig, None, ["--no-compile"]).compile is False
    assert build(TrainConfig, None, ["--compile"]).compile is True
    assert build(TrainConfig, None, ["--compile", "false"]).compile is False
    assert build(TrainConfig, None, ["--compile=auto"]).compile is None
    assert build(TrainConfig, None, ["--no_decay_lr"]).decay_lr is False


def test_unknown_key_suggests_the_closest():
    with pytest.raises(UsageError, match="did you mean --n_layer"):
        build(TrainConfig, None, ["--n_layr=4"])


@pytest.mark.parametrize("args,message", [
    (["--n_layer=four"], "expects int"),
    (["--batch_size=0"], "must be positive"),
    (["--batch_size=-3"], "must be positive"),
    (["--n_embd=100", "--n_head=3"], "divisible"),
    (["--device=tpu"], "unknown device"),
    (["--dtype=float8"], "must be one of"),
    (["--learning_rate"], "needs a value"),
    (["positional"], "unexpected argument"),
    (["--no-n_layer"], "only applies"),
    (["--out_dir="], "--out_dir is empty"),
    (["--dataset", " "], "--dataset is empty"),
    (["--init_from="], "--init_from is empty"),
    (["--seed=99999999999999999999999"], "--seed must be between"),
    (["--backend=mpi"], "--backend must be one of"),
    (["--backend=nccl", "--device=cpu"], "needs CUDA GPUs"),
])
def test_bad_values_are_usage_errors(args, message):
    with pytest.raises(UsageError, match=message):
        build(TrainConfig, None, args)


def test_coercion():
    assert coerce("1e3", int, "k") == 1000
    assert coerce("6e-4", float, "k") == 6e-4
    assert coerce(3, float, "k") == 3.0
    assert coerce("none", int | None, "k") is None
    with pytest.raises(UsageError):
        coerce(True, int, "k")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UsageError, match="shakespeare-char"):
        load_preset("no-such-preset")


def test_preset_file_path_and_bad_key(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('n_layer = 3\n[optimizer]\nlearning_rate = 0.01\n')
    cfg = build(TrainConfig, str(good))
    assert cfg.n_layer == 3 and cfg.learning_rate == 0.01
    bad = tmp_path / "bad.toml"
    bad.write_text("n_layers = 3\n")
    with pytest.raises(UsageError, match="did you mean --n_layer"):
        build(TrainConfig, str(bad))
    broken = tmp_path / "broken.toml"
    broken.write_text("n_layer = = 3\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        build(TrainConfig, str(broken))


def test_every_nanogpt_preset_exists():
    assert {"shakespeare-char", "gpt2-124m", "finetune-shakespeare", "eval-gpt2", "eval-gpt2-medium",
            "eval-gpt2-large", "eval-gpt2-xl"} <= set(list_presets())


def test_toml_round_trip(tmp_path):
    import dataclasses

    cfg = build(TrainConfig, "finetune-shakespeare")
    assert cfg.preset == "finetune-shakespeare"  # where the keys started, kept in the run's config
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert build(TrainConfig, str(path)) == dataclasses.replace(cfg, preset=str(path))


def test_sample_config_validation():
    assert build(SampleConfig, None, ["--top_p=0.9"]).top_p == 0.9
    for args in (["--top_p=0"], ["--top_p=1.5"], ["--temperature=-1"], ["--max_new_tokens=0"], ["--out_dir="],
                 ["--init_from="], ["--seed=-99999999999999999999"]):
        with pytest.raises(UsageError):
            build(SampleConfig, None, args)


def test_parse_overrides_keeps_negative_numbers_as_values():
    assert parse_overrides(["--seed", "-5"], TrainConfig) == {"seed": "-5"}


def test_model_config_is_the_scratch_architecture():
    from nanogpt_cli.model import GPTConfig

    cfg = build(TrainConfig, "shakespeare-char", ["--bias=True", "--dropout=0.1"])
    assert cfg.model_config(65) == GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, bias=True,
                                             dropout=0.1, vocab_size=65, activation="gelu")


def test_resolve_preset_picks_the_config_its_keys_belong_to(tmp_path):
    assert resolve_preset("shakespeare-char") == build(TrainConfig, "shakespeare-char")
    sampling = tmp_path / "sampling.toml"
    sampling.write_text("num_samples = 2\ntop_p = 0.9\n")
    cfg = resolve_preset(str(sampling))
    assert isinstance(cfg, SampleConfig) and (cfg.num_samples, cfg.top_p) == (2, 0.9)
    assert field_types(SampleConfig)["top_p"] == float | None


def test_help_epilog_lists_only_the_keys_asked_for():
    everything, some = help_epilog(TrainConfig), help_epilog(TrainConfig, EVAL_KEYS)
    assert "--learning_rate" in everything and "--learning_rate" not in some and "--n_layer" not in some
    assert all(f"--{key} (" in some for key in EVAL_KEYS) and "other config keys are accepted" in some
    assert "other config keys" not in everything


def test_the_cpu_quickstart_preset_is_nanogpts_cpu_recipe():
    """presets/shakespeare-char-cpu.toml is nanoGPT's README command for a CPU: train_shakespeare_char.py with
    --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
    --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 (logging every 10 steps)."""
    import dataclasses

    recipe = build(TrainConfig, "shakespeare-char", ["--device=cpu", "--compile=False", "--eval_iters=20",
                                                     "--log_interval=10", "--block_size=64", "--batch_size=12",
                                                     "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                                                     "--lr_decay_iters=2000", "--dropout=0.0"])
    preset = build(TrainConfig, "shakespeare-char-cpu")
    ignored = ("preset", "out_dir", "wandb_project", "wandb_run_name")
    assert dataclasses.replace(preset, **{k: getattr(recipe, k) for k in ignored}) == recipe
