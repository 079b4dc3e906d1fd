"""Step 4 of a run: the model files, the report and plots, then metrics.json (with the timeline), into
--output, each atomically; then the same files into <run>/model in the storage path, metrics.json
last, since it marks them complete."""

from __future__ import annotations

import os
import time

from trainer.common import fs, timeline
from trainer.common.atomic import MODEL_FILES, copy_published, save_model_atomic
from trainer.config import Config
from trainer.model import export
from trainer.train.plan import PUBLISHED, Plan
from trainer.train.result import RunMetrics


def publish(cfg: Config, plan: Plan, model, metrics: RunMetrics, probs, marks: dict,
            worker_marks: list[dict]) -> tuple[RunMetrics, str]:
    """Step 4: model files, report and plots, then metrics.json (with the timeline), into --output
    (each atomically); then the same files into <run>/model in the storage path (metrics.json last:
    it marks them complete); then the report on the console. A place that fails gives a StorageError
    naming it; each file is the old one or the new one. Returns the completed metrics and where the
    copies went."""
    from trainer.model import report  # scikit-learn and matplotlib: only once there is a model to report on

    evaluation = report.evaluation_report(plan.test[1], probs)
    for place in filter(None, plan.places.values()):
        place.unchanged()
    with fs.writing(plan.places["output"], "writing the model and reports"):
        metrics = _write_local_outputs(cfg, model, metrics, plan.test, probs, evaluation, marks, worker_marks)
    published = fs.join(plan.run_dir, PUBLISHED)
    names = [*MODEL_FILES, *report.FILES] + ([export.DIRECTORY] if cfg.export_savedmodel else [])
    with fs.writing(plan.places["storage"], f"publishing the outputs to {published}"):
        copy_published([os.path.join(cfg.output, name) for name in (*names, "metrics.json")], published)
    print(report.format_report(evaluation), flush=True)
    return metrics, published


def _write_local_outputs(cfg: Config, model, metrics: RunMetrics, test: tuple, probs, evaluation: dict, marks: dict,
                         worker_marks: list[dict]) -> RunMetrics:
    from trainer.model import report

    for name in MODEL_FILES:
        save_model_atomic(model, os.path.join(cfg.output, name))
    savedmodel = (export.export_savedmodel(model, os.path.join(cfg.output, export.DIRECTORY))
                  if cfg.export_savedmodel else None)
    written = report.write_all(cfg.output, *test, probs, evaluation, metrics.epochs)
    marks["outputs_written"] = time.time()
    merged = timeline.merge(marks, worker_marks)
    metrics = metrics.complete(savedmodel=savedmodel, report=written, timeline=merged,
                               wall_seconds=merged["outputs_written"], driver_peak_rss_mb=timeline.peak_rss_mb())
    metrics.write(os.path.join(cfg.output, "metrics.json"))
    return metrics
