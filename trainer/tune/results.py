"""What a search leaves: one `Trial` record per trial, its console line, the table of the best, and
results.json, results.csv and the plot in --output. Pure but for the files (matplotlib for the plot).

    trial 4a1c2_00003  mlp 1024 drop 0.31 lr 1.9e-03 batch 256  val_accuracy 0.9790  5/5 epochs  finished
    trial 4a1c2_00005  mlp 128 lr 2.4e-04 batch 512  val_accuracy 0.9183  1/5 epochs  stopped by ASHA
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field

from trainer.common.atomic import write_bytes_atomic, write_json_atomic
from trainer.tune.space import describe

SCHEMA = "mnist-tune/1"
FINISHED, STOPPED, FAILED = "finished", "stopped by ASHA", "failed"
CSV_FIELDS = ("trial_id", "status", "epochs", "val_accuracy", "model", "learning_rate", "batch_size",
              "hidden_units", "dropout", "val_accuracy_by_epoch", "checkpoint", "error")
SEARCHED = ("model", "learning_rate", "batch_size", "hidden_units", "dropout")


@dataclass(frozen=True)
class Trial:
    trial_id: str
    config: dict  # the searched settings (SEARCHED)
    status: str  # FINISHED, STOPPED or FAILED
    val_accuracy: list[float] = field(default_factory=list)  # per epoch, on the validation split
    val_loss: list[float] = field(default_factory=list)
    checkpoint: str | None = None  # its last checkpoint (Ray Train's), if it reported one
    error: str | None = None  # a failed trial's one line

    @property
    def epochs(self) -> int:
        return len(self.val_accuracy)

    @property
    def score(self) -> float:
        """The last epoch's validation accuracy (what its last checkpoint scores); -inf with none."""
        return self.val_accuracy[-1] if self.val_accuracy else -math.inf

    def to_json(self) -> dict:
        return {**asdict(self), "epochs": self.epochs}


def status_of(error: str | None, epochs: int, budget: int) -> str:
    """An ended trial's status (an unfinished search raises before any trial is recorded)."""
    if error:
        return FAILED
    return FINISHED if epochs >= budget else STOPPED


def line(trial_id: str, config: dict, score: float | None, epochs: int, status: str, budget: int,
         error: str | None = None) -> str:
    """A trial's console line, printed as it ends (from what Tune knows of it then)."""
    accuracy = f"val_accuracy {score:.4f}" if score is not None else "val_accuracy -"
    text = f"trial {trial_id}  {describe(config)}  {accuracy}  {epochs}/{budget} epochs  {status}"
    return text + (f": {error}" if error else "")


def best(trials: list[Trial]) -> list[Trial]:
    """The trials that may win, best first (ties: fewer epochs, then the earlier trial): those with a
    score that did not fail. A failed trial's settings may be why it failed (a batch too big for the
    memory, a rate that diverged); it stays in the files, with its epochs, not in the running."""
    return sorted((t for t in trials if t.val_accuracy and t.status != FAILED),
                  key=lambda t: (-t.score, t.epochs, t.trial_id))


def table(trials: list[Trial], budget: int, top: int = 5) -> str:
    """The best `top` trials as a table, with a count of the rest."""
    rows = [("RANK", "TRIAL", "VAL ACC", "EPOCHS", "STATUS", "CONFIG")]
    ranked = best(trials)
    for rank, trial in enumerate(ranked[:top], 1):
        rows.append((str(rank), trial.trial_id, f"{trial.score:.4f}", f"{trial.epochs}/{budget}", trial.status,
                     describe(trial.config)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)
    counts = {s: sum(t.status == s for t in trials) for s in (FINISHED, STOPPED, FAILED)}
    return text + "\n" + f"{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def to_csv(trials: list[Trial]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for t in trials:
        writer.writerow({"trial_id": t.trial_id, "status": t.status, "epochs": t.epochs,
                         "val_accuracy": f"{t.score:.6f}" if t.val_accuracy else "",
                         **{k: t.config.get(k) for k in SEARCHED},
                         "val_accuracy_by_epoch": ";".join(f"{a:.6f}" for a in t.val_accuracy),
                         "checkpoint": t.checkpoint or "", "error": t.error or ""})
    return out.getvalue()


def write(output: str, summary: dict, trials: list[Trial]) -> dict[str, str]:
    """results.json (the summary and every trial), results.csv and tuning.png in `output`, each
    written to a temp name and renamed. Returns their paths."""
    import os

    paths = {name: os.path.join(output, name) for name in ("results.json", "results.csv", "tuning.png")}
    write_json_atomic(paths["results.json"], {"schema": SCHEMA, **summary, "trials": [t.to_json() for t in trials]})
    write_bytes_atomic(paths["results.csv"], to_csv(trials).encode())
    write_bytes_atomic(paths["tuning.png"], plot(trials, summary.get("winner", {}).get("trial_id")))
    return paths


def plot(trials: list[Trial], winner: str | None) -> bytes:
    """Validation accuracy against epochs, a line a trial: finished ones solid, those ASHA stopped
    dashed and ending in an x, the winner thick. PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for t in trials:
        if not t.val_accuracy:
            continue
        epochs = range(1, t.epochs + 1)
        stopped = t.status == STOPPED
        axes.plot(epochs, t.val_accuracy, linestyle="--" if stopped else "-", marker="x" if stopped else "o",
                  markevery=[t.epochs - 1] if stopped else None, linewidth=3 if t.trial_id == winner else 1,
                  alpha=0.5 if stopped else 0.9, label=f"{t.trial_id} (winner)" if t.trial_id == winner else None)
    axes.plot([], [], "k--x", alpha=0.5, label="stopped by ASHA")
    axes.plot([], [], "k-", label="ran its budget")
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation accuracy")
    axes.set_title(f"{len(trials)} trials")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
