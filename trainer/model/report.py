"""What users look at after training: per-class metrics and three plots, written beside the model.

    evaluation.json        accuracy, per-digit precision/recall/F1/support, macro and weighted
                           averages, the 10x10 confusion matrix (rows: true digit, columns: predicted)
    training_curves.png    loss and accuracy per epoch (restarted epochs marked)
    confusion_matrix.png   counts in every cell, coloured by the share of the true digit's images
    misclassified.png      the test digits the model got wrong with the most confidence

Pure functions of numpy, scikit-learn and Matplotlib; nothing here knows about Ray or Keras.
Figures are drawn on Matplotlib's Agg canvas directly (no pyplot), so no display is needed and
no global backend or figure state is touched.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import classification_report, confusion_matrix

from trainer.common.atomic import write_bytes_atomic, write_json_atomic
from trainer.data.mnist import label_problem

NUM_CLASSES = 10
DIGITS = list(range(NUM_CLASSES))
DPI = 110
FILES = ("evaluation.json", "training_curves.png", "confusion_matrix.png", "misclassified.png")


# ---------------------------------------------------------------------------- metrics

def evaluation_report(y_true, probs) -> dict:
    """Labels (n,) in 0..9 and softmax outputs (n, 10) -> a JSON-ready dict of test metrics."""
    y_true, probs = _check_predictions(y_true, probs)
    y_pred = probs.argmax(axis=1)
    per_class = classification_report(y_true, y_pred, labels=DIGITS, target_names=[str(d) for d in DIGITS],
                                       output_dict=True, zero_division=0)
    return {
        "accuracy": float(np.mean(y_pred == y_true)),
        "examples": int(len(y_true)),
        "errors": int(np.sum(y_pred != y_true)),
        "classes": {str(d): _scores(per_class[str(d)]) for d in DIGITS},
        "macro_avg": _scores(per_class["macro avg"]),
        "weighted_avg": _scores(per_class["weighted avg"]),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=DIGITS).tolist(),
        "confusion_matrix_axes": "rows: true digit, columns: predicted digit",
    }


def _scores(row: dict) -> dict:
    return {"precision": float(row["precision"]), "recall": float(row["recall"]),
            "f1": float(row["f1-score"]), "support": int(row["support"])}


def _check_predictions(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    problem = label_problem(y_true)
    if problem:
        raise ValueError(problem)
    if probs.shape != (len(y_true), NUM_CLASSES):
        raise ValueError(f"probs must have shape ({len(y_true)}, {NUM_CLASSES}), got {probs.shape}")
    if len(y_true) == 0:
        raise ValueError("no predictions to evaluate")
    return y_true.astype(np.int64), probs


def format_report(report: dict) -> str:
    """The report (from evaluation_report or evaluation.json) as a text table for the job's log."""
    def row(name: str, s: dict) -> str:
        return f"{name:>12}  {s['precision']:>9.4f}  {s['recall']:>6.4f}  {s['f1']:>6.4f}  {s['support']:>7d}"

    lines = [f"{'digit':>12}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'support':>7}"]
    lines += [row(digit, report["classes"][digit]) for digit in map(str, DIGITS)]
    lines += ["", row("macro avg", report["macro_avg"]), row("weighted avg", report["weighted_avg"])]
    correct = report["examples"] - report["errors"]
    lines += ["", f"{'accuracy':>12}  {report['accuracy']:.4f}  ({correct} of {report['examples']} "
              f"test images, {report['errors']} wrong)"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots

def plot_training_curves(history: list[dict], path: str, test_accuracy: float | None = None) -> None:
    """Loss and accuracy per epoch, side by side; epochs after a worker-group restart are marked."""
    fig = _figure((10, 4.2))
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [int(h["epoch"]) for h in history]
    for ax, key, title, ylabel in ((loss_ax, "loss", "Training loss", "categorical cross-entropy"),
                                   (acc_ax, "accuracy", "Training accuracy", "accuracy")):
        ax.plot(epochs, [h[key] for h in history], marker="o", color="tab:blue", label=f"training {key}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs only
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)  # one epoch still gets a visible point
        if all("world_size" in h for h in history):  # each epoch's worker count under its number
            ax.set_xticks(epochs, [f"{e}\n{h['world_size']}w" for e, h in zip(epochs, history)])
            ax.set_xlabel("epoch (and workers)")
        for i, (epoch, h) in enumerate((e, h) for e, h in zip(epochs, history) if h.get("restarted")):
            ax.axvline(epoch - 0.5, color="tab:red", linestyle=":", label="restarted" if i == 0 else None)
            if "resized_from" in h:
                ax.annotate(f"{h['resized_from']}\u2192{h['world_size']} workers", (epoch - 0.5, 1),
                            xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points",
                            color="tab:red", fontsize=8)
    if test_accuracy is not None:
        acc_ax.axhline(test_accuracy, color="tab:green", linestyle="--",
                       label=f"test accuracy {test_accuracy:.4f}")
    if not history:
        for ax in (loss_ax, acc_ax):
            ax.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax.transAxes)
    for ax in (loss_ax, acc_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=9)
    seconds = sum(h.get("seconds", 0.0) for h in history)
    speed = [h["samples_per_second"] for h in history if "samples_per_second" in h]
    subtitle = f"{len(history)} epoch{'' if len(history) == 1 else 's'}, {seconds:.1f} s"
    subtitle += f", median {np.median(speed):,.0f} samples/s" if speed else ""
    fig.suptitle(f"Training curves ({subtitle})")
    _save_png_atomic(fig, path)


def plot_confusion_matrix(matrix, path: str) -> None:
    """10x10 counts; colour is the share of the row (true digit), so rare mistakes still show."""
    counts = np.asarray(matrix, dtype=np.int64)
    if counts.shape != (NUM_CLASSES, NUM_CLASSES):
        raise ValueError(f"confusion matrix must be 10x10, got {counts.shape}")
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = _figure((7.6, 6.6))
    ax = fig.subplots()
    norm = PowerNorm(gamma=0.5, vmin=0, vmax=1)  # square root: a 2% confusion is visibly tinted
    image = ax.imshow(shares, cmap="Blues", norm=norm)
    fig.colorbar(image, ax=ax, label="share of the true digit's test images", shrink=0.85)
    for (row, col), count in np.ndenumerate(counts):
        dark_cell = norm(shares[row, col]) > 0.55
        ax.text(col, row, str(count), ha="center", va="center", fontsize=9 if count < 1000 else 8,
                color="white" if dark_cell else ("#bbbbbb" if count == 0 else "black"))
    ax.set_xticks(DIGITS)
    ax.set_yticks(DIGITS)
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    total, correct = int(counts.sum()), int(np.trace(counts))
    ax.set_title(f"Confusion matrix: {total:,} test images, accuracy {correct / max(total, 1):.4f}")
    _save_png_atomic(fig, path)


def plot_misclassified(images, y_true, probs, path: str, count: int = 25) -> None:
    """A grid of the `count` wrong predictions made with the highest confidence, each titled
    "true 3 / pred 5 (0.97)"."""
    y_true, probs = _check_predictions(y_true, probs)
    images = np.asarray(images)
    if len(images) != len(y_true) or images[0].size != 28 * 28:
        raise ValueError(f"images must be {len(y_true)} 28x28 digits, got shape {images.shape}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    y_pred, confidence = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    columns = 5  # always the full width, so the title fits however few errors there are
    rows = max(math.ceil(len(shown) / columns), 1)
    fig = _figure((1.75 * columns + 0.4, 1.95 * rows + 0.6))
    errors = f"{len(wrong)} error{'' if len(wrong) == 1 else 's'}"
    fig.suptitle(f"Most confidently misclassified test digits ({len(shown)} of {errors})"
                 if len(shown) else "No misclassified test digits: every one was classified correctly")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    for ax, i in zip(axes, shown):
        ax.imshow(images[i].reshape(28, 28), cmap="gray_r", interpolation="nearest")  # dark ink on white
        ax.set_title(f"true {y_true[i]} / pred {y_pred[i]} ({confidence[i]:.2f})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():  # a light frame shows the 28x28 field the model saw
            spine.set_color("#cccccc")
    _save_png_atomic(fig, path)


# ---------------------------------------------------------------------------- all outputs

def write_all(output_dir: str, images, y_true, probs, report: dict, history: list[dict]) -> dict[str, str]:
    """Write `report` (from evaluation_report(y_true, probs)) as evaluation.json and the three PNGs
    into `output_dir`, each atomically; name -> path."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name) for name in FILES}
    write_json_atomic(paths["evaluation.json"], report)
    plot_training_curves(history, paths["training_curves.png"], test_accuracy=report["accuracy"])
    plot_confusion_matrix(report["confusion_matrix"], paths["confusion_matrix.png"])
    plot_misclassified(images, y_true, probs, paths["misclassified.png"])
    return paths


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")  # constrained: titles never overlap
    FigureCanvasAgg(fig)
    return fig


def _save_png_atomic(fig: Figure, path: str) -> None:
    """Render to memory, write to a temporary sibling, then rename: never half a PNG on disk."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white")
    write_bytes_atomic(path, buffer.getvalue())
