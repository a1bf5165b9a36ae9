"""Loss curves from runs' metrics.jsonl, drawn to a PNG with matplotlib (the `plot` extra).

    ngpt plot out/run-a out/run-b --output loss.png

Each run gets one colour: its per-step training loss as a thin line, and its evaluations
(train and val loss at each eval_interval) as markers joined by lines, labelled by run folder.
"""

from __future__ import annotations

import math
from pathlib import Path

from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.metrics import read_jsonl


def load_run(out_dir: str | Path) -> dict:
    """{'steps': [(iter, loss)], 'train': [(iter, train_loss)], 'val': [(iter, val_loss)]} from metrics.jsonl."""
    folder = Path(out_dir).expanduser()
    path = folder / "metrics.jsonl" if folder.is_dir() or not folder.name.endswith(".jsonl") else folder
    if not path.is_file():
        raise NgptError(f"{out_dir}: no metrics.jsonl there (is it an ngpt out_dir? `ngpt train` writes one)")
    records = read_jsonl(path)
    run = {"steps": [], "train": [], "val": []}
    for r in records:
        if "iter" not in r:
            continue
        if _finite(r.get("loss")):
            run["steps"].append((r["iter"], r["loss"]))
        if _finite(r.get("train_loss")):
            run["train"].append((r["iter"], r["train_loss"]))
        if _finite(r.get("val_loss")):
            run["val"].append((r["iter"], r["val_loss"]))
    if not any(run.values()):
        raise NgptError(f"{path}: no losses logged yet")
    return run


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _xy(points: list[tuple]) -> tuple[list, list]:
    return [p[0] for p in points], [p[1] for p in points]


def run_labels(out_dirs: list[str | Path]) -> list[str]:
    """Each run's folder name; when two share a name, enough of their parent folders to tell them apart."""
    paths = [Path(d).expanduser().resolve() for d in out_dirs]
    paths = [p.parent if p.name.endswith(".jsonl") else p for p in paths]
    for depth in range(1, max((len(p.parts) for p in paths), default=1) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def plot_runs(out_dirs: list[str | Path], output: str | Path = "loss.png", title: str | None = None,
              log_scale: bool = False) -> Path:
    """Draw the loss curves of one or more runs to `output` (PNG, or any format matplotlib knows by suffix)."""
    if not out_dirs:
        raise UsageError("give at least one run folder (an out_dir with metrics.jsonl)")
    runs = [load_run(d) for d in out_dirs]  # every folder checked before anything is drawn
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
            x, y = _xy(run["steps"])
            ax.plot(x, y, color=color, alpha=0.35, linewidth=1, label=f"{label} train (step)")
        if run["train"]:
            x, y = _xy(run["train"])
            ax.plot(x, y, color=color, linestyle="--", marker="o", markersize=3, linewidth=1.2,
                    label=f"{label} train (eval)")
        if run["val"]:
            x, y = _xy(run["val"])
            ax.plot(x, y, color=color, linestyle="-", marker="s", markersize=4, linewidth=2, label=f"{label} val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (cross-entropy, nats)")
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title or ("loss" if len(runs) == 1 else f"loss, {len(runs)} runs"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    out = Path(output).expanduser()
    if out.parent and not out.parent.is_dir():
        raise NgptError(f"cannot write {output}: folder {out.parent} does not exist")
    try:
        fig.savefig(out)
    except (OSError, ValueError) as e:
        raise NgptError(f"cannot write {output}: {e}") from None
    return out
