"""The driver: prepare data, start or join Ray, launch Ray Train, evaluate and save the model.

    source -> data.prepare (Parquet shards, once) -> ray.data.read_parquet -> TensorflowTrainer
    -> final checkpoint -> evaluate on the 10,000 test images -> mnist.keras, mnist.h5, metrics.json

A run lives at <storage>/<run name>. Rerunning the same name resumes it from Ray Train's latest
checkpoint (Ray Train V2 resumes a RunConfig(name, storage_path) that exists); a finished run is
not retrained unless --force moves it aside.
"""

from __future__ import annotations

import json
import os
import signal
import time

from trainer import checkpoint, data, export, report
from trainer.config import Config
from trainer.outputs import publish, save_model_atomic, write_json_atomic

DATA_CPUS = 1  # kept free for Ray Data's read tasks: with every CPU held by workers they never run
DATA_DIR = "_prepared_data"  # under the storage path, beside the runs
# Settings a resumed run must share with its checkpoint (they shape the weights or the optimizer).
RESUME_KEYS = ("model", "batch_size", "learning_rate", "lr_scaling", "warmup_epochs", "seed", "augment")
MODEL_FILES = ("mnist.keras", "mnist.h5")
PUBLISHED = "model"  # <storage>/<run>/model/: the final outputs, where a submitted job's user finds them


class ClusterError(RuntimeError):
    """The cluster cannot run what was asked. The message says what was asked and what it has."""


class TrainingError(RuntimeError):
    """Ray Train gave up on the run (after --max-failures restarts); the message is the cause."""


def run(cfg: Config) -> dict:
    """Train with Ray Train, evaluate on the test split, write outputs; return the metrics dict."""
    started = time.time()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if _on_loopback(address):
        # Ray resolves 127.0.0.1 to the host's address unless it runs as a single-machine Ray
        # (read when ray is imported); this keeps a local Ray, and the driver joining one, on loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address:
        _check_reachable(address)
    storage = cfg.storage_path or os.path.abspath(os.path.join(cfg.output, "ray_results"))
    run_name = cfg.run_name or time.strftime("mnist-%Y%m%d-%H%M%S")
    run_dir = data.join(storage, run_name)
    parquet_dir, mnist, manifest = data.prepare(data.resolve_source(cfg.data), data.join(storage, DATA_DIR))
    train_rows = manifest["splits"]["train"]["rows"]
    if train_rows // cfg.num_workers < cfg.per_worker_batch:
        raise ValueError(f"{train_rows} training rows split over {cfg.num_workers} workers is less "
                         f"than one batch of {cfg.per_worker_batch} per worker; use a smaller --batch-size")
    print(f"data: {parquet_dir} ({train_rows} train / {manifest['splits']['test']['rows']} test rows, "
          f"sha256 {manifest['content_sha256'][:12]})", flush=True)

    latest = _previous_checkpoint(cfg, run_dir)
    if latest is not None and latest[1]["epochs_done"] >= cfg.epochs:
        done = _finished_outputs(run_dir)
        if done is not None:
            print(f"run {run_name} already finished (test accuracy {done['test_accuracy']:.4f}, "
                  f"outputs in {data.join(run_dir, PUBLISHED)}); nothing to do. Pass --force to retrain.",
                  flush=True)
            return done
        print(f"run {run_name} finished training; evaluating its last checkpoint", flush=True)
        final = latest[0]
    else:
        print(f"run: {run_name} in {storage} (rerun with --run-name {run_name} to resume)", flush=True)
        final = _train(cfg, parquet_dir, train_rows, storage, run_name).checkpoint

    with final.as_directory() as directory:
        model, meta = _restore_model(cfg, directory, train_rows)
        workers = checkpoint.read_worker_info(directory)
    test_loss, test_accuracy, probs = evaluate(model, mnist.x_test, mnist.y_test)
    metrics = {
        "test_accuracy": test_accuracy, "test_loss": test_loss, "num_workers": cfg.num_workers,
        "epochs": meta["history"], "config": cfg.to_dict(), "workers": workers,
        "data": {"path": parquet_dir, "content_sha256": manifest["content_sha256"], "train_rows": train_rows},
        "run": {"name": run_name, "storage_path": storage, "checkpoint": final.path},
        "wall_seconds": time.time() - started,
    }
    evaluation = report.evaluation_report(mnist.y_test, probs)
    published = _write_outputs(cfg, model, metrics, mnist, probs, evaluation, data.join(run_dir, PUBLISHED))
    print(report.format_report(evaluation), flush=True)
    print(f"test accuracy: {test_accuracy:.4f}", flush=True)
    print(f"model saved to {os.path.join(cfg.output, 'mnist.keras')} and mnist.h5 "
          f"(copies with metrics.json in {published})", flush=True)
    return metrics


def _write_outputs(cfg: Config, model, metrics: dict, mnist, probs, evaluation: dict, published: str) -> str:
    """Model files, report and plots, then metrics.json, into --output (each atomically), then the
    same files into <run>/model in the storage path (metrics.json last: it marks them complete)."""
    os.makedirs(cfg.output, exist_ok=True)
    names = [*MODEL_FILES, *report.FILES] + ([export.DIRECTORY] if cfg.export_savedmodel else [])
    for name in MODEL_FILES:
        save_model_atomic(model, os.path.join(cfg.output, name))
    if cfg.export_savedmodel:
        metrics["savedmodel"] = export.export_savedmodel(model, os.path.join(cfg.output, export.DIRECTORY))
    metrics["report"] = report.write_all(cfg.output, mnist.x_test, mnist.y_test, probs, evaluation,
                                         metrics["epochs"])
    write_json_atomic(os.path.join(cfg.output, "metrics.json"), metrics)
    publish([os.path.join(cfg.output, name) for name in (*names, "metrics.json")], published)
    return published


def _on_loopback(address: str | None) -> bool:
    """No address (a local Ray) or one on this machine's loopback (ray://, http:// or host:port)."""
    return not address or _host_port(address)[0] in ("127.0.0.1", "localhost", "::1")


def _host_port(address: str) -> tuple[str, str | None]:
    """'ray://h:p', 'http://h:p', 'h:p' or 'auto' -> (host, port or None)."""
    target = address.split("://")[-1]
    if ":" not in target:
        return target, None
    host, port = target.rsplit(":", 1)
    return host.strip("[]"), port


def _train(cfg: Config, parquet_dir: str, train_rows: int, storage: str, run_name: str):
    import ray
    from ray.train import TrainingFailedError

    _connect(ray, cfg)
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, whose native handler would abort
    try:  # on Ctrl-C / SIGTERM too: a local Ray goes down with its workers; checkpoints stay
        _check_fits(ray, cfg)
        _check_storage_shared(ray, storage)
        return _fit(ray, cfg, parquet_dir, train_rows, storage, run_name)
    except TrainingFailedError as exc:
        raise TrainingError(f"training failed: {_root_cause(exc)} (worker logs above)") from None
    finally:
        ray.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the job like Ctrl-C: Ray shuts down, checkpoints stay


def _root_cause(exc: BaseException) -> str:
    """The last 'SomeError: message' line of a worker traceback, else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if "Error:" in line or "Exception:" in line]
    return (causes or lines or [type(exc).__name__])[-1][:300]


def _connect(ray, cfg: Config) -> None:
    """Join --address / $RAY_ADDRESS, or start a local Ray bound to loopback."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # inherited by the workers
    # One logical CPU beyond the cores for Ray Data: its read tasks run before training starts.
    ray.init(address="local", num_cpus=cfg.local_cpus or (os.cpu_count() or 1) + DATA_CPUS,
             num_gpus=None if cfg.use_gpu else 0, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", log_to_driver=True)


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """ray.init retries an unreachable cluster address for ever; fail in seconds instead."""
    import socket

    host, port = _host_port(address)
    if port is None:  # "auto": Ray looks the address up itself
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({exc}); is it running? "
                           "check --address / $RAY_ADDRESS") from None


def _check_fits(ray, cfg: Config) -> None:
    """Fail in seconds, not hang, when the cluster cannot hold the worker group. With
    --resource-wait-s (an autoscaling cluster) ask the autoscaler for room and wait that long."""
    deadline = time.monotonic() + cfg.resource_wait_s
    problem = _shortfall(ray.cluster_resources(), cfg)
    if problem and cfg.resource_wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        worker = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
        request_resources(bundles=[worker] * cfg.num_workers + [{"CPU": DATA_CPUS}])
        print(f"waiting up to {cfg.resource_wait_s:g}s for the autoscaler: {problem}", flush=True)
        while problem and time.monotonic() < deadline:
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0.1)))
            problem = _shortfall(ray.cluster_resources(), cfg)
        if problem:
            problem += f" (after waiting {cfg.resource_wait_s:g}s)"
    if problem:
        raise ClusterError(problem)


def _shortfall(total: dict, cfg: Config) -> str | None:
    """Why `total` cannot hold the workers plus Ray Data's CPU, or None when it can."""
    asked = (f"{cfg.num_workers} workers x {cfg.cpus_per_worker} CPU"
             + (" + 1 GPU" if cfg.use_gpu else "") + f" (+{DATA_CPUS} CPU for Ray Data)")
    has = f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs"
    if cfg.use_gpu and total.get("GPU", 0) < 1:
        return f"--use-gpu asked for {asked}, but the cluster has no GPUs ({has})"
    if cfg.use_gpu and total.get("GPU", 0) < cfg.num_workers:
        return f"asked for {asked}; the cluster has {has}"
    if total.get("CPU", 0) < cfg.num_workers * cfg.cpus_per_worker + DATA_CPUS:
        return (f"asked for {asked}; the cluster has {has}. Use fewer --num-workers "
                "or --cpus-per-worker, or a bigger cluster")
    return None


def _check_storage_shared(ray, storage: str) -> None:
    """On a multi-node cluster a local --storage-path must be one folder every node sees (NFS, or
    nodes on this host): Ray Train writes checkpoints from each worker's node. URIs always are."""
    alive = [n for n in ray.nodes() if n["Alive"]]
    if "://" in storage or len(alive) < 2:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    os.makedirs(storage, exist_ok=True)
    marker = os.path.join(storage, f".shared-check-{os.getpid()}-{time.time_ns()}")
    open(marker, "w").close()
    try:
        sees = ray.remote(num_cpus=0, max_retries=0)(os.path.exists)
        checks = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker)
            for n in alive}
        blind = [node for node, ok in zip(checks, ray.get(list(checks.values()), timeout=60)) if not ok]
    finally:
        os.remove(marker)
    if blind:
        raise ClusterError(
            f"--storage-path {storage} is local to this machine, but {len(blind)} of {len(alive)} nodes "
            f"cannot see it ({', '.join(blind)}); Ray Train needs storage every node shares on a "
            "multi-node cluster: use s3://..., gs://..., or a shared (NFS) mount")


def _fit(ray, cfg: Config, parquet_dir: str, train_rows: int, storage: str, run_name: str):
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from trainer.worker import train_loop_per_worker

    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "train_rows": train_rows},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     placement_strategy=cfg.placement_strategy),
        datasets={"train": ray.data.read_parquet(data.join(parquet_dir, "train"))},
        # preserve_order: blocks reach the split in file order and go to the emptiest worker, so the
        # same seed gives the same shards and the same run (locality-based dispatch varies run to run).
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    return trainer.fit()


def _previous_checkpoint(cfg: Config, run_dir: str):
    """(checkpoint, meta) of the run's latest checkpoint per Ray Train, verified; None if new.

    With --force an existing run folder is moved aside (never deleted) and training starts over.
    """
    fs, path = data.filesystem(run_dir)
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
    fs, path = data.filesystem(data.join(run_dir, PUBLISHED, "metrics.json"))
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def _restore_model(cfg: Config, directory: str, train_rows: int):
    from trainer.lr_schedule import steps_per_epoch
    from trainer.model import build_model

    model = build_model(cfg, steps_per_epoch=steps_per_epoch(train_rows, cfg))  # the real warm-up length
    model.optimizer.build(model.trainable_variables)
    return model, checkpoint.load(directory, model)


def evaluate(model, images, labels):
    """(test loss, test accuracy, softmax outputs (n, 10)) on uint8 images and 0..9 labels."""
    from trainer.model import preprocess

    x, y = preprocess(images, labels)
    loss, accuracy = model.evaluate(x, y, batch_size=1000, verbose=0)
    return float(loss), float(accuracy), model.predict(x, batch_size=1000, verbose=0)
