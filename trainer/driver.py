"""The driver: prepare data, start or join Ray, launch Ray Train, evaluate and save the model.

    source -> data.prepare (Parquet shards, once) -> pyarrow tables -> ray.data.from_arrow
    (or, past --data-path's size, only the manifest: each worker streams its share, trainer/stream.py)
    -> DataParallelTrainer (trainer/backend.py, trainer/worker.py) -> final checkpoint
    -> evaluate on the 10,000 test images -> mnist.keras, mnist.h5, metrics.json

A run lives at <storage>/<run name>. Rerunning the same name resumes it from Ray Train's latest
checkpoint (Ray Train V2 resumes a RunConfig(name, storage_path) that exists); a finished run is
not retrained unless --force moves it aside.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass

from trainer import checkpoint, cluster, data, elastic, errors, failures, quiet, storage, timeline, tracking
from trainer.config import WEIGHTS, Config, fields_shaping, rank_batch, steps_per_epoch
from trainer.outputs import MODEL_FILES, copy_published, save_model_atomic, write_json_atomic

DATA_DIR = "_prepared_data"  # under the storage path, beside the runs
PUBLISHED = "model"  # <storage>/<run>/model/: the final outputs, where a submitted job's user finds them
RESUME_KEYS = fields_shaping(WEIGHTS)  # a resumed run must share these with its checkpoint


class TrainingError(RuntimeError):
    """Ray Train gave up on the run (after --max-failures restarts). The message's first line is
    the cause; then the failing worker's last frame and exception, and the path of its full log."""


@dataclass(frozen=True)
class Plan:
    """What prepare() settles before Ray starts: where the run lives, its data (checked), the places
    it writes (checked), and the --init-from weights."""
    storage_path: str
    run_name: str
    parquet_dir: str
    test: tuple  # (images, labels) of the test split: all the rows the driver holds
    manifest: dict
    streaming: bool  # the workers stream the training rows (--data-path)
    places: dict  # "output" and "storage": storage.Place, or None for an object store's URI
    start: object = None  # trainer.warm's weights for --init-from, if given

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage_path, self.run_name)

    @property
    def train_rows(self) -> int:
        return self.manifest["splits"]["train"]["rows"]


def run(cfg: Config) -> dict:
    """Train with Ray Train, evaluate on the test split, write outputs; return the metrics dict.

    Four steps: prepare (checks, data), train (or resume, or find the run finished), evaluate,
    publish. Ray's settings (cluster.ray_settings) are in the environment for the run only: set
    before anything imports Ray (a resumed run's checkpoint lookup does), restored when it ends."""
    with cluster.environment(cfg):
        marks = {"process_start": timeline.process_start_time()}
        plan = prepare(cfg)
        latest = _previous_checkpoint(cfg, plan.run_dir)
        epochs_done = latest[1]["epochs_done"] if latest else 0
        if epochs_done >= cfg.epochs:
            done = _finished_outputs(plan.run_dir)
            if done is not None:
                print(f"run {plan.run_name} already finished (test accuracy {done['test_accuracy']:.4f}, outputs "
                      f"in {storage.join(plan.run_dir, PUBLISHED)}); nothing to do. Pass --force to retrain.",
                      flush=True)
                return done
        # MLflow's run opens (its import, a new store's tables: about 2 s) while Ray starts.
        opening = tracking.open_run_soon(cfg, plan.run_dir, plan.run_name, plan.manifest["content_sha256"], epochs_done)
        with tracking.ending_on_failure(opening):
            if epochs_done >= cfg.epochs:
                print(f"run {plan.run_name} finished training; evaluating its last checkpoint", flush=True)
                final = latest[0]
            else:
                print(f"run: {plan.run_name} in {plan.storage_path} (rerun with --run-name {plan.run_name} to resume)",
                      flush=True)
                final, points = train(cfg, plan, epochs_done, opening)
                marks.update(points)
            model, metrics, probs, workers = evaluate(cfg, plan, final)
            tracked = opening.result()
            metrics["tracking"] = tracked.describe() if tracked else None
            marks["evaluation_done"] = time.time()
            # The workers' points belong to this run only if it trained: a finished checkpoint's are an earlier process's.
            worker_marks = [w.get("timeline", {}) for w in workers] if "training_done" in marks else []
            published = publish(cfg, plan, model, metrics, probs, marks, worker_marks)
            if tracked:
                tracked.finish(cfg.output, model, metrics)
    first_step = metrics["timeline"].get("first_step")
    print(f"test accuracy: {metrics['test_accuracy']:.4f}", flush=True)
    print(f"model saved to {os.path.join(cfg.output, 'mnist.keras')} and mnist.h5 "
          f"(copies with metrics.json in {published})", flush=True)
    print(f"done in {metrics['wall_seconds']:.1f}s" + (f"; the first training step came at {first_step:.1f}s"
          if first_step is not None else "") + " (timeline in metrics.json)", flush=True)
    return metrics


def prepare(cfg: Config) -> Plan:
    """Step 1, before Ray: the cluster reachable, --init-from's model fits, --output and
    --storage-path writable, the data validated and written as Parquet shards (once per content)."""
    if cluster.address(cfg):
        cluster.check_reachable(cluster.address(cfg))
    uri = tracking.tracking_uri(cfg, cfg.output)
    if uri:  # MLflow missing: one line, before any data work
        tracking.check_installed(uri)
    start = _warm_start(cfg) if cfg.init_from else None  # a model that does not fit: before any data work
    storage_path = cfg.storage_path or os.path.abspath(os.path.join(cfg.output, "ray_results"))
    # A read-only or full disk fails here, in a second; a lost mount before the outputs are written.
    places = {"output": storage.Place.check("--output", cfg.output),
              "storage": storage.Place.check("--storage-path", storage_path) if storage.local(storage_path) else None}
    with storage.writing(places["storage"], "writing the prepared data"):
        parquet_dir, mnist, manifest = data.prepare(data.resolve_source(cfg.data), storage.join(storage_path, DATA_DIR),
                                                    whole=False)
    streaming = cfg.streams(manifest["splits"]["train"]["rows"])
    if mnist is None and not streaming:  # a Parquet source for the in-memory path: read and hash-checked
        mnist = data.load_parquet(parquet_dir)
    test = mnist.split("test") if mnist else data.read_parquet_split(parquet_dir, "test", manifest)
    if storage.local(parquet_dir):  # the workers' working directory is not ours
        parquet_dir = os.path.abspath(parquet_dir)
    plan = Plan(storage_path, cfg.run_name or time.strftime("mnist-%Y%m%d-%H%M%S"), parquet_dir, test, manifest,
                streaming, places, start)
    if steps_per_epoch(plan.train_rows // cfg.max_workers, cfg.batch_size, cfg.max_workers) < 1:
        raise ValueError(f"{plan.train_rows} training rows split over {cfg.max_workers} workers is less than one "
                         f"batch of {rank_batch(cfg.batch_size, cfg.max_workers, 0)} per worker; use a smaller --batch-size")
    print(f"data: {parquet_dir} ({plan.train_rows} train / {manifest['splits']['test']['rows']} test rows, "
          f"sha256 {manifest['content_sha256'][:12]}); " + ("each worker streams its share from the files" if streaming
          else "in memory, the shards handed over by Ray Data") + f" (--data-path {cfg.data_path})", flush=True)
    return plan


def evaluate(cfg: Config, plan: Plan, final) -> tuple:
    """Step 3: the final checkpoint's model on the 10,000 test images: (model, metrics, softmax
    outputs, each worker's record)."""
    quiet.import_tensorflow(cfg.verbose)  # once training is over: the workers need the cores before
    from trainer.model import evaluate as score

    with final.as_directory() as directory:
        model, meta = _restore_model(cfg, directory, plan.train_rows)
        workers = checkpoint.read_worker_info(directory)
    test_loss, test_accuracy, probs = score(model, *plan.test)
    metrics = {
        "test_accuracy": test_accuracy, "test_loss": test_loss, "num_workers": cfg.num_workers,
        "epochs": meta["history"], "config": cfg.to_dict(),
        "workers": [{k: v for k, v in w.items() if k != "timeline"} for w in workers],
        "init": plan.start.describe() if plan.start else None,
        "world_sizes": [h.get("world_size") for h in meta["history"]], "resizes": elastic.resizes(meta["history"]),
        "data": {"path": plan.parquet_dir, "content_sha256": plan.manifest["content_sha256"],
                 "train_rows": plan.train_rows, "streamed": plan.streaming},
        "run": {"name": plan.run_name, "storage_path": plan.storage_path, "checkpoint": final.path},
        "restarts": failures.read_records(storage.join(plan.run_dir, failures.RECORD)),
    }
    return model, metrics, probs, workers


def publish(cfg: Config, plan: Plan, model, metrics: dict, probs, marks: dict, worker_marks: list[dict]) -> str:
    """Step 4: model files, report and plots, then metrics.json (with the timeline), into --output
    (each atomically); then the same files into <run>/model in the storage path (metrics.json last:
    it marks them complete); then the report on the console. A place that fails gives a StorageError
    naming it; each file is the old one or the new one. Returns where the copies went."""
    from trainer import export, report

    evaluation = report.evaluation_report(plan.test[1], probs)
    for place in filter(None, plan.places.values()):
        place.unchanged()
    with storage.writing(plan.places["output"], "writing the model and reports"):
        _write_local_outputs(cfg, model, metrics, plan.test, probs, evaluation, marks, worker_marks)
    published = storage.join(plan.run_dir, PUBLISHED)
    names = [*MODEL_FILES, *report.FILES] + ([export.DIRECTORY] if cfg.export_savedmodel else [])
    with storage.writing(plan.places["storage"], f"publishing the outputs to {published}"):
        copy_published([os.path.join(cfg.output, name) for name in (*names, "metrics.json")], published)
    print(report.format_report(evaluation), flush=True)
    return published


def _write_local_outputs(cfg: Config, model, metrics: dict, test: tuple, probs, evaluation: dict, marks: dict,
                         worker_marks: list[dict]) -> None:
    from trainer import export, report

    for name in MODEL_FILES:
        save_model_atomic(model, os.path.join(cfg.output, name))
    if cfg.export_savedmodel:
        metrics["savedmodel"] = export.export_savedmodel(model, os.path.join(cfg.output, export.DIRECTORY))
    metrics["report"] = report.write_all(cfg.output, *test, probs, evaluation,
                                         metrics["epochs"])
    marks["outputs_written"] = time.time()
    metrics["timeline"] = timeline.merge(marks, worker_marks)
    metrics["wall_seconds"] = metrics["timeline"]["outputs_written"]
    metrics["driver_peak_rss_mb"] = timeline.peak_rss_mb()
    write_json_atomic(os.path.join(cfg.output, "metrics.json"), metrics)


def _warm_start(cfg: Config):
    """--init-from's weights, checked against the job's model (imports TensorFlow). A checkpoint of
    the run, if there is one, still overrides them: a resumed run continues where it stopped."""
    from trainer import warm

    start = warm.load(cfg)
    print(f"init: weights from {start.path}" + (f" (store version {start.version})" if start.version else "")
          + (" with its optimizer state" if start.slots is not None else ""), flush=True)
    return start


def train(cfg: Config, plan: Plan, epochs_done: int, opening=None):
    """Step 2: start or join Ray, check the workers fit and the storage is shared, and run Ray Train
    from `epochs_done`, each epoch to MLflow if `opening` (tracking.open_run_soon) gives a run;
    (the final checkpoint, the timeline's points on the way)."""
    import ray
    from ray.train import TrainingFailedError

    points = {}
    cluster.connect(ray, cfg)
    points["ray_up"] = time.time()
    signal.signal(signal.SIGTERM, errors.interrupt)  # after ray.init, whose native handler would abort
    try:  # on Ctrl-C / SIGTERM too: a local Ray goes down with its workers; checkpoints stay
        cluster.check_fits(ray, cfg)
        cluster.check_storage_shared(ray, plan.storage_path)
        tracked = opening.result() if opening else None
        if tracked:
            tracked.set_tags(tracking.job_tags())
        result = _fit(ray, cfg, plan, epochs_done, points, tracked)
        points["training_done"] = time.time()
        return result.checkpoint, points
    except TrainingFailedError as exc:
        used = len(failures.read_records(storage.join(plan.run_dir, failures.RECORD)))
        raise TrainingError(failures.explain(exc, used)) from None
    finally:
        ray.shutdown()
        points["ray_down"] = time.time()


def _fit(ray, cfg: Config, plan: Plan, epochs_done: int, points: dict, tracked):
    from ray.data import ExecutionOptions
    from ray.train import (CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig,
                           ScalingConfig)

    from trainer.backend import EpochMetrics, Restarts, TFConfigSetup, trainer_class
    from trainer.worker import train_loop_per_worker

    points["driver_imports_done"] = time.time()
    start = plan.start
    trainer = trainer_class(local=not cluster.address(cfg))(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "train_rows": plan.train_rows, "launch": uuid.uuid4().hex[:8],
                           "init": start and {"weights": start.weights, "slots": start.slots},
                           "stream": plan.streaming and {"path": plan.parquet_dir,
                                                         "files": plan.manifest["splits"]["train"]["files"]}},
        backend_config=TFConfigSetup(tf_log_level="0" if cfg.verbose else "3"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,  # (MIN, MAX): elastic
                                     elastic_resize_monitor_interval_s=cfg.resize_interval_s,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     placement_strategy=cfg.placement_strategy),
        datasets=None if plan.streaming else  # a block a file:
        {"train": ray.data.from_arrow(data.read_parquet_tables(plan.parquet_dir, "train"))},
        # preserve_order: blocks reach the split in file order and go to the emptiest worker, so the
        # same seed gives the same shards and the same run (locality-based dispatch varies run to run).
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=plan.run_name, storage_path=plan.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=[Restarts(storage.join(plan.run_dir, failures.RECORD), cfg.max_failures, epochs_done),
                       *([EpochMetrics(tracked.uri, tracked.run_id)] if tracked else [])],
            logging_config=LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING")),
    )
    points["training_launched"] = time.time()
    return trainer.fit()


def _previous_checkpoint(cfg: Config, run_dir: str):
    """(checkpoint, meta) of the run's latest checkpoint per Ray Train, verified; None if new.

    With --force an existing run folder is moved aside (never deleted) and training starts over.
    """
    fs, path = storage.filesystem(run_dir)
    if fs.get_file_info(path).type.name == "NotFound":
        return None
    if cfg.force:
        aside = f"{path}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        fs.move(path, aside)
        print(f"--force: moved the previous run to {aside}", flush=True)
        return None
    from ray.train import Result

    try:
        latest = Result.from_path(run_dir).checkpoint
    except RuntimeError:  # a folder with no completed checkpoint yet: Ray starts it afresh
        return None
    if latest is None:
        return None
    with latest.as_directory() as directory:
        meta = checkpoint.verify(directory)
    changed = [k for k in RESUME_KEYS if meta["config"].get(k) != getattr(cfg, k)]
    if changed:
        raise checkpoint.CheckpointError(
            f"run {os.path.basename(path)} was trained with "
            + ", ".join(f"{k}={meta['config'].get(k)!r}" for k in changed)
            + "; use those settings, another --run-name, or --force")
    print(f"resuming from {latest.path} (epoch {meta['epochs_done']}/{cfg.epochs} done)", flush=True)
    return latest, meta


def _finished_outputs(run_dir: str) -> dict | None:
    """The published metrics of a run that finished (metrics.json is published last), else None."""
    return storage.read_json(storage.join(run_dir, PUBLISHED, "metrics.json"))


def _restore_model(cfg: Config, directory: str, train_rows: int):
    from trainer.model import build_model

    # The warm-up's length in steps at MAX workers: an elastic run may have ended at another size,
    # but the saved schedule is read only past the warm-up, where the rate is the same.
    world = cfg.max_workers
    model = build_model(cfg, steps_per_epoch=steps_per_epoch(train_rows // world, cfg.batch_size, world))
    model.optimizer.build(model.trainable_variables)
    return model, checkpoint.load(directory, model)
