"""Loss curves from runs' metrics.jsonl, drawn to a PNG with matplotlib (the `plot` extra).

    ngpt plot out/run-a out/run-b --output loss.png
    ngpt plot out/char out/gpt2 out/bpe2k --metric bpb -o bpb.png   # runs with different tokenizers

Each run gets one colour: its per-step training loss as a thin line, and its evaluations
(train and val loss at each eval_interval) as markers joined by lines, labelled by run folder.
`--metric bpb` draws the evaluations' bits per byte instead, which compare across tokenizers.
"""

from __future__ import annotations

import math
from pathlib import Path

from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.metrics import read_jsonl

METRICS = {"loss": "loss (cross-entropy, nats)", "bpb": "bits per byte"}


def load_run(out_dir: str | Path, metric: str = "loss") -> dict:
    """{'steps': [(iter, loss)], 'train': [(iter, train_loss)], 'val': [(iter, val_loss)]} from metrics.jsonl;
    for metric "bpb", the evaluations' train_bpb and val_bpb (and no steps: those log only their loss)."""
    folder = Path(out_dir).expanduser()
    path = folder / "metrics.jsonl" if folder.is_dir() or not folder.name.endswith(".jsonl") else folder
    if not path.is_file():
        raise NgptError(f"{out_dir}: no metrics.jsonl there (is it an ngpt out_dir? `ngpt train` writes one)")
    records = read_jsonl(path)
    run = {"steps": [], "train": [], "val": []}
    for record in records:
        if "iter" not in record:
            continue
        if metric == "loss" and _finite(record.get("loss")):
            run["steps"].append((record["iter"], record["loss"]))
        for split in ("train", "val"):
            if _finite(record.get(f"{split}_{metric}")):
                run[split].append((record["iter"], record[f"{split}_{metric}"]))
    if not any(run.values()):
        raise NgptError(f"{path}: no losses logged yet" if metric == "loss" else
                        f"{path}: no bits per byte logged (evaluations write them when the dataset's tokenizer "
                        "can be loaded; runs of older ngpt versions have none)")
    return run


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _iters_and_losses(points: list[tuple]) -> tuple[list, list]:
    return [point[0] for point in points], [point[1] for point in points]


def run_labels(out_dirs: list[str | Path]) -> list[str]:
    """Each run's folder name; when two share a name, enough of their parent folders to tell them apart."""
    paths = [Path(out_dir).expanduser().resolve() for out_dir in out_dirs]
    paths = [path.parent if path.name.endswith(".jsonl") else path for path in paths]
    for depth in range(1, max((len(path.parts) for path in paths), default=1) + 1):
        labels = ["/".join(path.parts[-depth:]) for path in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(path) for path in paths]


def plot_runs(out_dirs: list[str | Path], output: str | Path = "loss.png", title: str | None = None,
              log_scale: bool = False, metric: str = "loss") -> Path:
    """Draw the loss (or bits per byte, metric "bpb") curves of one or more runs to `output` (PNG, or any
    format matplotlib knows by suffix)."""
    if not out_dirs:
        raise UsageError("give at least one run folder (an out_dir with metrics.jsonl)")
    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    runs = [load_run(out_dir, metric) for out_dir in out_dirs]  # every folder checked before anything is drawn
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise NgptError("ngpt plot needs matplotlib: pip install 'nanogpt-cli[plot]'") from None

    # The Figure API with the Agg canvas: no pyplot, no GUI backend, no global state.
    fig = Figure(figsize=(9, 5.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, label, color in zip(runs, run_labels(out_dirs), colors, strict=True):
        if run["steps"]:
            x, y = _iters_and_losses(run["steps"])
            ax.plot(x, y, color=color, alpha=0.35, linewidth=1, label=f"{label} train (step)")
        if run["train"]:
            x, y = _iters_and_losses(run["train"])
            ax.plot(x, y, color=color, linestyle="--", marker="o", markersize=3, linewidth=1.2,
                    label=f"{label} train (eval)")
        if run["val"]:
            x, y = _iters_and_losses(run["val"])
            ax.plot(x, y, color=color, linestyle="-", marker="s", markersize=4, linewidth=2, label=f"{label} val")
    ax.set_xlabel("iteration")
    ax.set_ylabel(METRICS[metric])
    if log_scale:
        ax.set_yscale("log")
    name = METRICS[metric].split(" (")[0]
    ax.set_title(title or (name if len(runs) == 1 else f"{name}, {len(runs)} runs"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    target = Path(output).expanduser()
    if target.parent and not target.parent.is_dir():
        raise NgptError(f"cannot write {output}: folder {target.parent} does not exist")
    try:
        fig.savefig(target)
    except (OSError, ValueError) as e:
        raise NgptError(f"cannot write {output}: {e}") from None
    return target
