"""Run metrics, always on: metrics.jsonl in out_dir, and Weights & Biases when asked.

Each line of metrics.jsonl is one JSON object: training steps carry iter, loss, lr,
tokens_per_s, mfu and ms; evaluations carry iter, train_loss and val_loss, and train_bpb and val_bpb
(bits per byte, evaluate.py) when the dataset's tokenizer says how many bytes each token stands for.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nanogpt_cli.atomic import atomic_file, open_append_nofollow
from nanogpt_cli.config import TrainConfig, to_dict
from nanogpt_cli.errors import NgptError, one_line
from nanogpt_cli.progress import console, debug, is_verbose


class MetricsLog:
    def __init__(self, out_dir: Path, cfg: TrainConfig, enabled: bool = True, resume_from: int = 0,
                 run_id: str | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.run_id = run_id
        self.wandb = None
        self.records: list[dict] = []
        self.file = None
        if not enabled:
            return
        if cfg.wandb_log:  # first: a wandb that cannot start fails the run before any file changes
            self.wandb = start_wandb(cfg, run_id)
            self.run_id = self.wandb.id
        if resume_from > 0 and self.path.is_file():
            # A resumed run repeats the steps after its checkpoint: drop the ones logged past it.
            kept = [record for record in read_jsonl(self.path) if record.get("iter", 0) < resume_from
                    or (record.get("iter") == resume_from and "val_loss" in record)]
            with atomic_file(self.path) as f:
                f.write("".join(json.dumps(record) + "\n" for record in kept).encode())
            self.records = kept
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.path):
                pass  # a new, empty log (replacing a link at its name, never writing through it)
        try:
            self.file = open_append_nofollow(self.path)
        except OSError as e:
            raise NgptError(f"cannot write {self.path}: {e.strerror or e}") from None
        debug(f"metrics: {self.path}")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record["time"] = round(time.time(), 3)
        self.records.append(record)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.wandb is not None:
            self.wandb.log({key: value for key, value in record.items()
                            if key not in ("iter", "time") and value is not None}, step=record["iter"])

    def step(self, it: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None, ms: float) -> None:
        self.write({"iter": it, "loss": loss, "lr": lr, "tokens_per_s": round(tokens_per_s, 1),
                    "mfu": None if mfu is None else round(mfu, 5), "ms": round(ms, 2)})

    def eval(self, it: int, losses: dict, lr: float) -> None:
        bpb = {f"{split}_bpb": losses[f"{split}_bpb"] for split in ("train", "val") if f"{split}_bpb" in losses}
        self.write({"iter": it, "train_loss": losses["train"], "val_loss": losses["val"], **bpb, "lr": lr})

    def history(self) -> list[dict]:
        return self.records

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file, one a line; lines that are not one are skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash (or garbage)
        if isinstance(record, dict):
            records.append(record)
    return records


def start_wandb(cfg: TrainConfig, run_id: str | None):
    """A wandb run with the resolved config, its files under out_dir/wandb; a resumed training run
    continues the same wandb run. WANDB_MODE=offline (and wandb's other WANDB_* variables) apply."""
    try:
        import wandb
    except ImportError:
        raise NgptError("--wandb_log=True needs wandb: pip install 'nanogpt-cli[wandb]' "
                        "(or run without --wandb_log; metrics.jsonl is always written)") from None
    out_dir = Path(cfg.out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"id": run_id, "resume": "allow"} if run_id else {}
    settings = {}
    if not is_verbose() and not any(os.environ.get(name) for name in ("WANDB_QUIET", "WANDB_SILENT")):
        settings["silent"] = True  # wandb's banners and run summary stay out of our output: one line below
    try:
        run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=to_dict(cfg),
                         dir=str(out_dir), settings=wandb.Settings(**settings), **kwargs)
    except Exception as e:
        message = one_line(e).rstrip(".")
        if os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "disabled"):  # the advice is taken
            raise NgptError(f"wandb could not start in WANDB_MODE={os.environ['WANDB_MODE']}: {message}; check "
                            f"--wandb_project and that {out_dir} is writable, or run without --wandb_log") from None
        raise NgptError(f"wandb could not start: {message} (to log without an account or network, "
                        "set WANDB_MODE=offline and upload later with `wandb sync`)") from None
    mode = getattr(getattr(run, "settings", None), "mode", None) or os.environ.get("WANDB_MODE", "")
    if mode == "disabled":
        debug("wandb: disabled (WANDB_MODE=disabled)")
    elif mode in ("offline", "dryrun"):
        folder = Path(run.dir).parent  # out_dir/wandb/offline-run-<date>-<id>
        console.print(f"wandb: offline run {run.id} in {folder}; upload it with `wandb sync {folder}`", markup=False)
    else:
        console.print(f"wandb: {run.url or run.id}", markup=False)
    return run
