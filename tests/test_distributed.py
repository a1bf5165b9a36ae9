"""Several processes on the CPU (gloo): DDP and FSDP match one process, checkpoints move between
them, multi-node rendezvous, failures end the whole job, bench reports per rank.

Each multi-process test starts real processes through PyTorch's launcher (torch.distributed.run),
so they take seconds each; the heavier ones are marked slow (CI still runs them).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from nanogpt_cli import distributed as D
from nanogpt_cli.checkpoint import load_checkpoint
from nanogpt_cli.config import TrainConfig, build
from nanogpt_cli.data import BatchLoader, SyntheticLoader, load_meta
from nanogpt_cli.errors import UsageError
from nanogpt_cli.metrics import read_jsonl
from nanogpt_cli.model import GPT, GPTConfig
from nanogpt_cli.train import train
from tests.conftest import TINY, write_char_dataset

# Global batch 4 micro-batches: 1 process x 4, or 2 processes x 2.
ACCUM = "--gradient_accumulation_steps=4"
REL = 1e-4  # loss curves of 2 processes vs 1: the same numbers up to float summation order
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# A worker for plain torchrun that records each rank's evaluations and can make one rank fail.
WORKER = textwrap.dedent("""
    import json, os, sys
    from nanogpt_cli import train as T

    rank = int(os.environ["RANK"])
    evaluate = T.Trainer.evaluate

    def recorded(self):
        losses = evaluate(self)
        with open(os.path.join(os.environ["TEST_DUMP"], f"eval-rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps({"iter": self.iter_num, **losses}) + "\\n")
        return losses

    T.Trainer.evaluate = recorded
    save = T.Trainer.save

    def saved(self):  # every rank saves (a collective); each leaves its own copy of the weights here
        save(self)
        import torch
        torch.save(self.model.state_dict(), os.path.join(os.environ["TEST_DUMP"], f"weights-rank{rank}.pt"))

    T.Trainer.save = saved
    if os.environ.get("TEST_FAIL_RANK") == str(rank):
        step = T.Trainer.train_step

        def failing(self, lr):
            if self.iter_num == 2:
                raise RuntimeError(f"injected failure on rank {rank}")
            return step(self, lr)

        T.Trainer.train_step = failing
    from nanogpt_cli.cli import main

    sys.argv = ["ngpt", *sys.argv[1:]]
    main()
""")


# A worker for plain torchrun that records the threads still alive as the interpreter shuts down.
THREADS_AT_EXIT_WORKER = textwrap.dedent("""
    import atexit, json, os, sys

    def record_threads():
        names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
        with open(os.path.join(os.environ["TEST_DUMP"], f"threads-rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(names, f)

    atexit.register(record_threads)
    from nanogpt_cli.cli import main

    sys.argv = ["ngpt", *sys.argv[1:]]
    main()
""")


def losses(out_dir: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_jsonl(Path(out_dir) / "metrics.jsonl") if "loss" in r}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) for k in a)


def env_for_children(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")}
    env.update(NO_COLOR="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    return env


def run(cmd: list[str], timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env_for_children(**extra))


def show(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The dataset, the common arguments, and the one-process reference run (accumulation 4, 6 iterations)."""
    root = tmp_path_factory.mktemp("dist")
    data_dir = root / "data"
    write_char_dataset(data_dir)
    args = [*TINY, f"--data_dir={data_dir}", ACCUM]
    ref = root / "ref"
    train(build(TrainConfig, None, [*args, f"--out_dir={ref}"]))
    return root, args, ref


# ---------------------------------------------------------------- in-process: the pieces


def test_ranks_share_one_stream_of_micro_batches(data_dir):
    """Rank r of W gets micro-batches r, r+W, ... of the one-process stream: 2x2 sees what 1x4 sees."""
    folder = data_dir / "tiny_char"
    meta = load_meta(folder)
    cpu = torch.device("cpu")
    one = BatchLoader(folder, meta, 4, 16, cpu, seed=5)
    ranks = [BatchLoader(folder, meta, 4, 16, cpu, seed=5, rank=r, world_size=2) for r in range(2)]
    stream = [one.get_batch("train")[0] for _ in range(8)]
    for m in range(4):
        for r in range(2):
            assert torch.equal(ranks[r].get_batch("train")[0], stream[2 * m + r])
    assert not torch.equal(stream[0], stream[1])  # ranks do see different data
    assert torch.equal(ranks[0].state_dict()["generator"], ranks[1].state_dict()["generator"])
    syn = [SyntheticLoader(50, 2, 8, cpu, seed=1, rank=r, world_size=2).get_batch("train")[0] for r in range(2)]
    syn_one = SyntheticLoader(50, 2, 8, cpu, seed=1)
    assert torch.equal(syn[0], syn_one.get_batch("train")[0]) and torch.equal(syn[1], syn_one.get_batch("train")[0])


def test_launcher_arguments():
    assert D.launcher_args(2) == ["--nproc-per-node=2", "--standalone"]
    assert D.launcher_args(1, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=1234) == [
        "--nproc-per-node=1", "--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=1234"]
    with pytest.raises(UsageError, match="master-addr"):
        D.launcher_args(8, nnodes=2)
    with pytest.raises(UsageError, match="node-rank"):
        D.launcher_args(8, nnodes=2, node_rank=2, master_addr="a")
    assert D.threads_per_process(1) >= 1 and D.threads_per_process(10_000) == 1


def test_launcher_options_are_refused_inside_a_worker(monkeypatch):
    from typer.testing import CliRunner

    from nanogpt_cli.cli import app

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["train", "--nproc-per-node", "2", "--device=cpu"])
    assert result.exit_code == 2 and "already is a torchrun worker" in result.output


def test_failed_workers_are_reported_once_per_different_line(capsys):
    from types import SimpleNamespace

    same = {r: SimpleNamespace(message="error: no such dataset", exitcode=1) for r in (1, 0)}
    D.report_failures(same)
    assert capsys.readouterr().err == "error: no such dataset\n"  # every rank failed alike: one line
    D.report_failures({0: SimpleNamespace(message="error: out of memory", exitcode=1),
                       1: SimpleNamespace(message="Signal 9 (SIGKILL) received by PID 7", exitcode=-9),
                       2: SimpleNamespace(message="To enable traceback see: https://...", exitcode=1)})
    assert capsys.readouterr().err.splitlines() == [
        "error: out of memory (rank 0)",
        "error: process 1 failed (Signal 9 (SIGKILL) received by PID 7); rerun with --verbose for torchrun's report "
        "(rank 1)",
        "error: process 2 failed (exit code 1); rerun with --verbose for torchrun's report (rank 2)"]


def test_workers_the_launcher_stopped_after_a_failure_are_not_reported(capsys):
    from types import SimpleNamespace

    stopped = SimpleNamespace(message="Signal 15 (SIGTERM) received by PID 8", exitcode=-15)
    D.report_failures({0: SimpleNamespace(message="error: dataset 'x' is not prepared", exitcode=2), 1: stopped})
    assert capsys.readouterr().err == "error: dataset 'x' is not prepared\n"  # rank 1 was only stopped
    failed = SimpleNamespace(message="error: dataset 'x' is not prepared", exitcode=2)
    for caught in ("", "error: stopped by SIGTERM; nothing was left half-written"):  # caught it, exited 128 + 15
        D.report_failures({0: SimpleNamespace(message=caught, exitcode=143), 1: failed})
        assert capsys.readouterr().err == "error: dataset 'x' is not prepared\n"
    D.report_failures({1: stopped})  # nothing else failed: the SIGTERM is the news
    assert capsys.readouterr().err == ("error: process 1 failed (Signal 15 (SIGTERM) received by PID 8); rerun with "
                                       "--verbose for torchrun's report\n")


def test_bad_input_under_the_launcher_is_one_line_not_one_per_rank(tmp_path):
    """Both workers refuse the run alike: the launcher prints the line once, without torchrun's report."""
    proc = run([sys.executable, "-m", "nanogpt_cli", "train", "--nproc-per-node", "2", "--device=cpu",
                "--dataset=nonexistent", f"--data_dir={tmp_path}", "--gradient_accumulation_steps=2"], timeout=90)
    assert proc.returncode == 2, show(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset 'nonexistent' is not prepared"), show(proc)


def test_grad_sync_and_state_dicts_without_a_process_group():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    with D.grad_sync(model, False):  # one process: nothing to skip, no error
        pass
    wrapper = torch.nn.Module()
    wrapper.module = model  # as DDP holds it
    assert D.unwrap(wrapper) is model and D.unwrap(model) is model and not D.is_fsdp(wrapper)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert D.full_model_state_dict(model).keys() == model.state_dict().keys()
    assert D.full_optimizer_state_dict(model, opt) == opt.state_dict()


# ---------------------------------------------------------------- several processes


def test_ddp_two_processes_match_one_process(setup):
    """`ngpt train --nproc-per-node 2` (torchrun -m nanogpt_cli underneath): 2 ranks x accumulation 2 give
    the loss curve of 1 process x accumulation 4; only rank 0 logs and writes."""
    root, args, ref = setup
    out = root / "ddp"
    proc = run([sys.executable, "-m", "nanogpt_cli", "train", "--nproc-per-node", "2", *args, f"--out_dir={out}"])
    assert proc.returncode == 0, show(proc)
    two, one = losses(out), losses(ref)
    assert two == pytest.approx(one, rel=REL), (two, one, max_diff(two, one))
    print(f"DDP 2x2 vs 1x4: max abs loss difference {max_diff(two, one):.3g}")
    assert [r["iter"] for r in read_jsonl(out / "metrics.jsonl") if "val_loss" in r] == [0, 3, 6]  # once each
    assert proc.stderr.count("step 0: train loss") == 1  # rank 0 prints, rank 1 does not
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "config.toml", "metrics.jsonl"]
    ckpt, ref_ckpt = load_checkpoint(out), load_checkpoint(ref)
    assert ckpt["world_size"] == 2 and ckpt["iter_num"] == 6
    for k, v in ref_ckpt["model"].items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-4, atol=1e-6)


def test_fsdp_matches_and_its_checkpoint_resumes_in_one_process(setup):
    """--strategy=fsdp under plain torchrun: the same losses, eval equal on every rank, a full checkpoint
    (tied weights one tensor) that a single process resumes exactly."""
    root, args, ref = setup
    out, dump = root / "fsdp", root / "fsdp-dump"
    dump.mkdir()
    worker = root / "worker.py"
    worker.write_text(WORKER, encoding="utf-8")
    proc = run([*TORCHRUN, "--standalone", "--nproc-per-node=2", str(worker), "train", *args, "--strategy=fsdp",
                "--max_iters=3", f"--out_dir={out}"], TEST_DUMP=str(dump))
    assert proc.returncode == 0, show(proc)
    one = losses(ref)
    assert losses(out) == pytest.approx({k: v for k, v in one.items() if k <= 3}, rel=REL)
    evals = [read_jsonl(dump / f"eval-rank{r}.jsonl") for r in range(2)]
    assert evals[0] == evals[1] and [e["iter"] for e in evals[0]] == [0, 3]  # all ranks evaluate, one result
    ckpt = load_checkpoint(out)
    ref_keys = load_checkpoint(ref)["model"].keys()
    assert ckpt["model"].keys() == ref_keys and ckpt["iter_num"] == 3
    assert ckpt["model"]["lm_head.weight"] is ckpt["model"]["transformer.wte.weight"]  # tied, saved once
    assert isinstance(next(iter(ckpt["optimizer"]["state"])), int)  # torch's usual optimizer format
    result = train(build(TrainConfig, None, [*args, f"--out_dir={out}", "--init_from=resume"]))  # 1 process
    assert result.iter_num == 7
    assert losses(out) == pytest.approx(one, rel=REL), (losses(out), one)


def test_fsdp_evaluates_an_uneven_number_of_batches_like_one_process(setup):
    """eval_iters=3 on 2 ranks: rank 0 evaluates batches 0 and 2, rank 1 batch 1 and, to keep FSDP's
    collectives in step, a forward it does not count. No hang; the evaluations and the losses are one
    process's."""
    root, args, _ = setup
    ref, out = root / "uneven-ref", root / "uneven-fsdp"
    extra = ["--eval_iters=3", "--max_iters=3"]
    train(build(TrainConfig, None, [*args, *extra, f"--out_dir={ref}"]))
    proc = run([sys.executable, "-m", "nanogpt_cli", "train", "--nproc-per-node", "2", *args, *extra,
                "--strategy=fsdp", f"--out_dir={out}"], timeout=120)
    assert proc.returncode == 0, show(proc)
    assert losses(out) == pytest.approx(losses(ref), rel=REL)
    evals = [{(r["iter"], split): r[f"{split}_loss"] for r in read_jsonl(d / "metrics.jsonl") if "val_loss" in r
              for split in ("train", "val")} for d in (out, ref)]
    assert {it for it, _ in evals[0]} == {0, 3} and evals[0] == pytest.approx(evals[1], rel=REL)


def test_ddp_with_muon_keeps_every_rank_identical_and_matches_one_process(setup):
    """Muon orthogonalises the all-reduced gradient's momentum: every rank takes the same step (identical
    weights, bit for bit), and 2 processes give the losses and weights of 1."""
    root, args, _ = setup
    muon = ["--optimizer=muon", "--learning_rate=0.01", "--muon_lr=0.02", "--position=rope"]
    ref, out, dump = root / "muon-ref", root / "muon-ddp", root / "muon-dump"
    dump.mkdir()
    train(build(TrainConfig, None, [*args, *muon, f"--out_dir={ref}"]))
    worker = root / "worker.py"
    worker.write_text(WORKER, encoding="utf-8")
    proc = run([*TORCHRUN, "--standalone", "--nproc-per-node=2", str(worker), "train", *args, *muon,
                f"--out_dir={out}"], TEST_DUMP=str(dump))
    assert proc.returncode == 0, show(proc)
    ranks = [torch.load(dump / f"weights-rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    two, one = losses(out), losses(ref)
    assert two == pytest.approx(one, rel=REL), (two, one, max_diff(two, one))
    # The two summation orders' last bits reach Muon's Newton-Schulz, which runs in bfloat16: its rounding (3
    # digits) leaves the Muon matrices about 1% of their 6 steps' movement apart (AdamW's parameters 0.06%).
    torch.manual_seed(1337)
    init = GPT(GPTConfig(**load_checkpoint(ref)["model_args"])).state_dict()
    for k, v in load_checkpoint(ref)["model"].items():
        assert (ranks[0][k] - v).norm() < 0.03 * (v - init[k]).norm(), k


def test_fsdp_trains_every_model_option_like_one_process(setup):
    """Rotary positions (buffers FSDP leaves whole), RMSNorm, QK-norm, the embedding norm, ReLU², an untied head
    (in the root's shard group), soft-capping and zero-initialised projections, sharded over 2 processes."""
    root, args, _ = setup
    modern = ["--position=rope", "--norm=rmsnorm", "--qk_norm", "--embedding_norm", "--activation=relu2",
              "--no-tie_embeddings", "--logit_softcap=15", "--zero_init_proj", "--max_iters=3"]
    ref, out = root / "modern-ref", root / "modern-fsdp"
    train(build(TrainConfig, None, [*args, *modern, f"--out_dir={ref}"]))
    proc = run([sys.executable, "-m", "nanogpt_cli", "train", "--nproc-per-node", "2", *args, *modern,
                "--strategy=fsdp", f"--out_dir={out}"])
    assert proc.returncode == 0, show(proc)
    assert losses(out) == pytest.approx(losses(ref), rel=REL)
    ckpt = load_checkpoint(out)
    assert ckpt["model_args"]["tie_embeddings"] is False and "lm_head.weight" in ckpt["model"]
    for k, v in load_checkpoint(ref)["model"].items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_ddp_resume_is_exact_with_dropout(setup):
    """Each rank's RNG state (its dropout masks) is in the checkpoint: 2 processes x 3 iterations, stop,
    resume to 6 give the losses of 6 in one go, bit for bit."""
    root, args, _ = setup
    full, half = root / "ddp-dropout-full", root / "ddp-dropout-half"
    for extra in ([f"--out_dir={full}"], [f"--out_dir={half}", "--max_iters=3"],
                  [f"--out_dir={half}", "--init_from=resume"]):
        proc = run([sys.executable, "-m", "nanogpt_cli", "train", "--nproc-per-node", "2", *args, "--dropout=0.2",
                    *extra])
        assert proc.returncode == 0, show(proc)
    assert "resuming from iteration 3" in proc.stderr
    assert sorted(losses(full)) == list(range(7))
    assert losses(half) == losses(full)
    rngs = load_checkpoint(half)["rng_ranks"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # one state per rank


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_fsdp(setup):
    root, args, ref = setup
    out = root / "single-then-fsdp"
    train(build(TrainConfig, None, [*args, f"--out_dir={out}", "--max_iters=3"]))
    proc = run([sys.executable, "-m", "nanogpt_cli", "train", "--nproc-per-node", "2", *args, "--strategy=fsdp",
                f"--out_dir={out}", "--init_from=resume"])
    assert proc.returncode == 0, show(proc)
    assert "resuming from iteration 3" in proc.stderr
    assert losses(out) == pytest.approx(losses(ref), rel=REL)
    assert load_checkpoint(out)["iter_num"] == 6


def test_a_failing_rank_ends_the_whole_job(setup):
    """Rank 1 raises at iteration 2 while rank 0 waits in a collective: the job exits non-zero, promptly."""
    root, args, _ = setup
    dump = root / "fail-dump"
    dump.mkdir()
    worker = root / "worker.py"
    worker.write_text(WORKER, encoding="utf-8")
    start = time.monotonic()
    proc = run([*TORCHRUN, "--standalone", "--nproc-per-node=2", str(worker), "train", *args, "--max_iters=50",
                f"--out_dir={root / 'fail'}"], timeout=90, TEST_DUMP=str(dump), TEST_FAIL_RANK="1")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, show(proc)
    assert "injected failure on rank 1" in proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f}s"


@pytest.mark.slow
def test_two_nodes_on_one_machine(setup):
    """--nnodes 2 --node-rank 0/1 with a rendezvous on 127.0.0.1: two launchers of one process each."""
    root, args, ref = setup
    out, port = root / "nodes", free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "nanogpt_cli", "train", "--nproc-per-node", "1", "--nnodes", "2",
                               "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               *args, f"--out_dir={out}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for_children())
             for r in range(2)]
    try:
        outputs = [node.communicate(timeout=150) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [n.returncode for n in nodes] == [0, 0], outputs
    assert losses(out) == pytest.approx(losses(ref), rel=REL)
    assert load_checkpoint(out)["world_size"] == 2


@pytest.mark.slow
def test_bench_reports_each_rank(setup):
    """Per-rank tokens/s on rank 0's stdout; and every rank leaves its process group whole: no gloo thread
    outlives the run into interpreter shutdown, where one aborted a rank on a loaded machine."""
    root, args, _ = setup
    dump = root / "bench-threads"
    dump.mkdir()
    worker = root / "threads_worker.py"
    worker.write_text(THREADS_AT_EXIT_WORKER)
    proc = run([*TORCHRUN, "--standalone", "--nproc-per-node=2", str(worker), "bench", "--json",
                "--iters", "2", "--warmup", "1", *args], TEST_DUMP=str(dump))
    assert proc.returncode == 0, show(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 only
    result = json.loads(lines[0])
    assert result["world_size"] == 2 and len(result["per_rank_tokens_per_second"]) == 2
    assert result["tokens_per_second"] == pytest.approx(sum(result["per_rank_tokens_per_second"]))
    if Path("/proc/self/task").is_dir():
        for rank in range(2):
            threads = json.loads((dump / f"threads-rank{rank}.json").read_text())
            assert not [name for name in threads if "gloo" in name], (rank, threads)
