"""The driver: prepare data, start or join Ray, launch Ray Train, evaluate and save the model.

    source -> shards.prepare (Parquet shards, once) -> pyarrow tables -> ray.data.from_arrow
    (or, past --data-path's size, only the manifest: each worker streams its share, trainer/data/stream.py)
    -> DataParallelTrainer (trainer/train/backend.py, trainer/train/worker.py) -> final checkpoint
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

from trainer.common import errors, fs, provenance, quiet, timeline
from trainer.config import WEIGHTS, Config, default_of, fields_shaping, rank_batch, steps_per_epoch
from trainer.data import shards
from trainer.data.mnist import DataError
from trainer.track import connection, run as tracked_run
from trainer.train import checkpoint, cluster, elastic, failures, warm
from trainer.train.loop_config import LoopConfig
from trainer.train.plan import DATA_DIR, PUBLISHED, Plan
from trainer.train.publish import publish
from trainer.train.result import RunMetrics

RESUME_KEYS = fields_shaping(WEIGHTS)  # a resumed run must share these with its checkpoint


class TrainingError(errors.TrainingError):
    """Ray Train gave up on the run (after --max-failures restarts). The message's first line is
    the cause; then the failing worker's last frame and exception, and the path of its full log."""


def run(cfg: Config, started: float | None = None) -> RunMetrics:
    """Train with Ray Train, evaluate on the test split, write outputs; return what metrics.json holds.

    Four steps: prepare (checks, data), train (or resume, or find the run finished), evaluate,
    publish. Ray's settings (cluster.ray_settings) are in the environment for the run only: set
    before anything imports Ray (a resumed run's checkpoint lookup does), restored when it ends.
    The timeline counts from `started` (a caller that runs the job after work of its own: a search's
    winner), else from this process's start."""
    with cluster.environment(cfg):
        marks = {"process_start": started or timeline.process_start_time()}
        plan = prepare(cfg)
        latest = _previous_checkpoint(cfg, plan.run_dir)
        epochs_done = latest[1]["epochs_done"] if latest else 0
        if epochs_done >= cfg.epochs:
            done = _finished_outputs(plan.run_dir)
            if done is not None:
                print(f"run {plan.run_name} already finished (test accuracy {done.test_accuracy:.4f}, outputs "
                      f"in {fs.join(plan.run_dir, PUBLISHED)}); nothing to do. Pass --force to retrain.",
                      flush=True)
                return done
        # MLflow's run opens (its import, a new store's tables: about 2 s) while Ray starts.
        opening = tracked_run.open_run_soon(cfg, plan.run_dir, plan.run_name, plan.manifest.content_sha256, epochs_done)
        with tracked_run.ending_on_failure(opening):
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
            metrics = metrics.complete(tracking=tracked.describe() if tracked else None)
            marks["evaluation_done"] = time.time()
            # The workers' points belong to this run only if it trained: a finished checkpoint's are an earlier process's.
            worker_marks = [w.get("timeline", {}) for w in workers] if "training_done" in marks else []
            metrics, published = publish(cfg, plan, model, metrics, probs, marks, worker_marks)
            if tracked:
                tracked.finish(cfg.output, model, metrics.to_json())
    first_step = metrics.timeline.get("first_step")
    print(f"test accuracy: {metrics.test_accuracy:.4f}", flush=True)
    print(f"model saved to {os.path.join(cfg.output, 'mnist.keras')} and mnist.h5 "
          f"(copies with metrics.json in {published})", flush=True)
    print(f"done in {metrics.wall_seconds:.1f}s" + (f"; the first training step came at {first_step:.1f}s"
          if first_step is not None else "") + " (timeline in metrics.json)", flush=True)
    return metrics


def prepare(cfg: Config) -> Plan:
    """Step 1, before Ray: the cluster reachable, --init-from's model fits, --output and
    --storage-path writable, the data validated and written as Parquet shards (once per content)."""
    if cluster.address(cfg):
        cluster.check_reachable(cluster.address(cfg))
    uri = connection.tracking_uri(cfg, cfg.output)
    if uri:  # MLflow missing: one line, before any data work
        connection.check_installed(uri)
    start = _warm_start(cfg) if cfg.init_from else None  # a model that does not fit: before any data work
    storage_path = cfg.storage_path or os.path.abspath(os.path.join(cfg.output, "ray_results"))
    # A read-only or full disk fails here, in a second; a lost mount before the outputs are written.
    places = {"output": fs.Place.check("--output", cfg.output),
              "storage": fs.Place.check("--storage-path", storage_path) if fs.local(storage_path) else None}
    with fs.writing(places["storage"], "writing the prepared data"):
        parquet_dir, mnist, manifest = shards.prepare(shards.resolve_source(cfg.data), fs.join(storage_path, DATA_DIR),
                                                    whole=False)
    streaming = cfg.streams(manifest.rows("train"))
    if mnist is None and not streaming:  # a Parquet source for the in-memory path: read and hash-checked
        mnist = shards.load_parquet(parquet_dir)
    test = mnist.split("test") if mnist else shards.read_parquet_split(parquet_dir, "test", manifest)
    if fs.local(parquet_dir):  # the workers' working directory is not ours
        parquet_dir = os.path.abspath(parquet_dir)
    plan = Plan(storage_path, cfg.run_name or time.strftime("mnist-%Y%m%d-%H%M%S"), parquet_dir, test, manifest,
                streaming, places, start)
    if steps_per_epoch(plan.train_rows // cfg.max_workers, cfg.batch_size, cfg.max_workers) < 1:
        raise DataError(f"{plan.train_rows} training rows split over {cfg.max_workers} workers is less than one "
                         f"batch of {rank_batch(cfg.batch_size, cfg.max_workers, 0)} per worker; use a smaller --batch-size")
    print(f"data: {parquet_dir} ({plan.train_rows} train / {manifest.rows('test')} test rows, "
          f"sha256 {manifest.content_sha256[:12]}); " + ("each worker streams its share from the files" if streaming
          else "in memory, the shards handed over by Ray Data") + f" (--data-path {cfg.data_path})", flush=True)
    return plan


def evaluate(cfg: Config, plan: Plan, final) -> tuple:
    """Step 3: the final checkpoint's model on the 10,000 test images: (model, metrics, softmax
    outputs, each worker's record)."""
    quiet.import_tensorflow(cfg.verbose)  # once training is over (the workers need the cores before): the
    # import that train() started as Ray went down, or a whole one
    from trainer.model.network import evaluate as score

    with final.as_directory() as directory:
        model, meta = _restore_model(cfg, directory, plan.train_rows)
        workers = checkpoint.read_worker_info(directory)
    test_loss, test_accuracy, probs = score(model, *plan.test)
    metrics = RunMetrics(
        test_accuracy=test_accuracy, test_loss=test_loss, num_workers=cfg.num_workers,
        epochs=meta["history"], config=cfg.to_dict(),
        workers=[{k: v for k, v in w.items() if k != "timeline"} for w in workers],
        init=plan.start.describe() if plan.start else None,
        world_sizes=[h.get("world_size") for h in meta["history"]], resizes=elastic.resizes(meta["history"]),
        data={"path": plan.parquet_dir, "content_sha256": plan.manifest.content_sha256,
              "train_rows": plan.train_rows, "streamed": plan.streaming},
        run={"name": plan.run_name, "storage_path": plan.storage_path, "checkpoint": final.path},
        restarts=failures.read_records(fs.join(plan.run_dir, failures.RECORD)))
    return model, metrics, probs, workers


def _warm_start(cfg: Config):
    """--init-from's weights, checked against the job's model (imports TensorFlow). A checkpoint of
    the run, if there is one, still overrides them: a resumed run continues where it stopped."""
    start = warm.load(cfg)
    print(f"init: weights from {start.path}" + (f" (store version {start.version})" if start.version else "")
          + (" with its optimizer state" if start.slots is not None else ""), flush=True)
    return start


def train(cfg: Config, plan: Plan, epochs_done: int, opening=None):
    """Step 2: start or join Ray, check the workers fit and the storage is shared, and run Ray Train
    from `epochs_done`, each epoch to MLflow if `opening` (tracked_run.open_run_soon) gives a run;
    (the final checkpoint, the timeline's points on the way)."""
    import ray
    from ray.train import TrainingFailedError

    points = {}
    state_api = cluster.connect(ray, cfg)
    points["ray_up"] = time.time()
    signal.signal(signal.SIGTERM, errors.interrupt)  # after ray.init, whose native handler would abort
    try:  # on Ctrl-C / SIGTERM too: a local Ray goes down with its workers; checkpoints stay
        cluster.check_fits(ray, cfg)
        cluster.check_storage_shared(ray, plan.storage_path)
        tracked = opening.result() if opening else None
        if tracked:
            tracked.set_tags(provenance.job_tags())
        result = _fit(ray, cfg, plan, epochs_done, points, tracked, state_api)
        points["training_done"] = time.time()
        # The evaluation's TensorFlow imports while the local Ray goes down (docs/performance.md, levers).
        quiet.import_tensorflow_soon(cfg.verbose)
        return result.checkpoint, points
    except TrainingFailedError as exc:
        used = len(failures.read_records(fs.join(plan.run_dir, failures.RECORD)))
        raise TrainingError(failures.explain(exc, used)) from None
    finally:
        ray.shutdown()
        points["ray_down"] = time.time()


def _fit(ray, cfg: Config, plan: Plan, epochs_done: int, points: dict, tracked, state_api: bool):
    from trainer.train.backend import Console, EpochMetrics, quiet_start_retries

    points["driver_imports_done"] = time.time()
    trainer = make_trainer(ray, cfg, plan, cleaner=state_api, callbacks=[
        Console(fs.join(plan.run_dir, failures.RECORD), cfg.max_failures, epochs_done, cfg.epochs),
        *([EpochMetrics(tracked.uri, tracked.run_id)] if tracked else []),
        *(quiet_start_retries() if cfg.elastic and not cfg.verbose else [])])
    points["training_launched"] = time.time()
    return trainer.fit()


def make_trainer(ray, cfg: Config, plan: Plan, cleaner: bool, callbacks: list, validation: str | None = None):
    """The job's Ray Train trainer for `plan`: its workers (trainer/train/worker.py), data, scaling,
    checkpoints and failure handling, with the controller's `callbacks`. A search's trial
    (trainer/tune/) runs this same trainer, scoring each epoch on `validation`'s held-out rows."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from trainer.train.backend import TFConfigSetup, trainer_class
    from trainer.train.worker import train_loop_per_worker

    start = plan.start
    local = not cluster.address(cfg)
    # --pin-cpus auto: CPU workers on the job's own Ray, where nothing else runs (docs/performance.md)
    pin = cfg.pin_cpus == "yes" or (cfg.pin_cpus == "auto" and local and not cfg.use_gpu)
    return trainer_class(cleaner=cleaner)(
        train_loop_per_worker,
        train_loop_config=LoopConfig(
            cfg, plan.train_rows, launch=uuid.uuid4().hex[:8],
            init={"weights": start.weights, "slots": start.slots} if start else None,
            stream={"path": plan.parquet_dir, "files": plan.manifest.files("train")} if plan.streaming
            else None,
            validation=validation, pin=pin).to_dict(),
        backend_config=TFConfigSetup(tf_log_level="0" if cfg.verbose else "3"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,  # (MIN, MAX): elastic
                                     elastic_resize_monitor_interval_s=cfg.resize_interval_s,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     placement_strategy=cfg.placement_strategy),
        datasets=None if plan.streaming else  # a block a file:
        {"train": ray.data.from_arrow(shards.read_parquet_tables(plan.parquet_dir, "train"))},
        # preserve_order: blocks reach the split in file order and go to the emptiest worker, so the
        # same seed gives the same shards and the same run (locality-based dispatch varies run to run).
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=plan.run_name, storage_path=plan.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING")),
    )


def _previous_checkpoint(cfg: Config, run_dir: str):
    """(checkpoint, meta) of the run's latest checkpoint per Ray Train, verified; None if new.

    With --force an existing run folder is moved aside (never deleted) and training starts over.
    """
    filesystem, path = fs.filesystem(run_dir)
    if filesystem.get_file_info(path).type.name == "NotFound":
        return None
    if cfg.force:
        print(f"--force: moved the previous run to {fs.move_aside(run_dir)}", flush=True)
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
    changed = [k for k in RESUME_KEYS if meta["config"].get(k, default_of(k)) != getattr(cfg, k)]
    if changed:
        raise checkpoint.CheckpointError(
            f"run {os.path.basename(path)} was trained with "
            + ", ".join(f"{k}={meta['config'].get(k)!r}" for k in changed)
            + "; use those settings, another --run-name, or --force")
    print(f"resuming from {latest.path} (epoch {meta['epochs_done']}/{cfg.epochs} done)", flush=True)
    return latest, meta


def _finished_outputs(run_dir: str) -> RunMetrics | None:
    """The published metrics of a run that finished (metrics.json is published last), else None."""
    return RunMetrics.read(fs.join(run_dir, PUBLISHED, "metrics.json"))


def _restore_model(cfg: Config, directory: str, train_rows: int):
    from trainer.model.network import build_model

    # The warm-up's length in steps at MAX workers: an elastic run may have ended at another size,
    # but the saved schedule is read only past the warm-up, where the rate is the same.
    world = cfg.max_workers
    model = build_model(cfg, steps_per_epoch=steps_per_epoch(train_rows // world, cfg.batch_size, world))
    model.optimizer.build(model.trainable_variables)
    return model, checkpoint.load(directory, model)
