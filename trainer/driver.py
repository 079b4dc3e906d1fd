"""The driver: prepare data, start or join Ray, launch Ray Train, evaluate and save the model.

    source -> data.prepare (Parquet shards, once) -> ray.data.read_parquet -> TensorflowTrainer
    -> final checkpoint -> evaluate on the 10,000 test images -> mnist.keras, mnist.h5, metrics.json
"""

from __future__ import annotations

import os
import time

from trainer import checkpoint, data
from trainer.config import Config
from trainer.outputs import write_json_atomic, save_model_atomic

DATA_CPUS = 1  # kept free for Ray Data's read tasks: with every CPU held by workers they never run


class ClusterError(RuntimeError):
    """The cluster cannot run what was asked. The message says what was asked and what it has."""


def run(cfg: Config) -> dict:
    """Train with Ray Train, evaluate on the test split, write outputs; return the metrics dict."""
    started = time.time()
    storage = cfg.storage_path or os.path.abspath(os.path.join(cfg.output, "ray_results"))
    run_name = cfg.run_name or time.strftime("mnist-%Y%m%d-%H%M%S")
    parquet_dir, mnist, manifest = data.prepare(data.resolve_source(cfg.data), os.path.join(storage, "data"))
    train_rows = manifest["splits"]["train"]["rows"]
    if train_rows // cfg.num_workers < cfg.per_worker_batch:
        raise ValueError(f"{train_rows} training rows split over {cfg.num_workers} workers is less "
                         f"than one batch of {cfg.per_worker_batch} per worker; use a smaller --batch-size")
    print(f"data: {parquet_dir} ({train_rows} train / {manifest['splits']['test']['rows']} test rows, "
          f"sha256 {manifest['content_sha256'][:12]})", flush=True)

    if not (cfg.address or os.environ.get("RAY_ADDRESS")):
        # Ray resolves 127.0.0.1 to the host's address unless it runs as a single-machine Ray
        # (read when ray is imported); this keeps the local Ray and TensorFlow's ports on loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    _connect(ray, cfg)
    _check_fits(ray, cfg)
    result = _fit(ray, cfg, parquet_dir, train_rows, storage, run_name)
    with result.checkpoint.as_directory() as directory:
        model, meta = _restore_model(cfg, directory)
        workers = checkpoint.read_worker_info(directory)
    test_loss, test_accuracy = evaluate(model, mnist.x_test, mnist.y_test)
    metrics = {
        "test_accuracy": test_accuracy, "test_loss": test_loss, "num_workers": cfg.num_workers,
        "epochs": meta["history"], "config": cfg.to_dict(), "workers": workers,
        "data": {"path": parquet_dir, "content_sha256": manifest["content_sha256"], "train_rows": train_rows},
        "run": {"name": run_name, "storage_path": storage, "checkpoint": result.checkpoint.path},
        "wall_seconds": time.time() - started,
    }
    os.makedirs(cfg.output, exist_ok=True)
    save_model_atomic(model, os.path.join(cfg.output, "mnist.keras"))
    save_model_atomic(model, os.path.join(cfg.output, "mnist.h5"))
    write_json_atomic(os.path.join(cfg.output, "metrics.json"), metrics)
    print(f"test accuracy: {test_accuracy:.4f}", flush=True)
    print(f"model saved to {os.path.join(cfg.output, 'mnist.keras')} and mnist.h5; "
          f"metrics in {os.path.join(cfg.output, 'metrics.json')}", flush=True)
    return metrics


def _connect(ray, cfg: Config) -> None:
    """Join --address / $RAY_ADDRESS, or start a local Ray bound to loopback."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # One logical CPU beyond the cores for Ray Data: its read tasks run before training starts.
    ray.init(address="local", num_cpus=cfg.local_cpus or (os.cpu_count() or 1) + DATA_CPUS,
             num_gpus=None if cfg.use_gpu else 0, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", log_to_driver=True)


def _check_fits(ray, cfg: Config) -> None:
    """Fail in seconds, not hang, when the cluster can never hold the worker group."""
    total = ray.cluster_resources()
    asked = (f"{cfg.num_workers} workers x {cfg.cpus_per_worker} CPU"
             + (" + 1 GPU" if cfg.use_gpu else "") + f" (+{DATA_CPUS} CPU for Ray Data)")
    has = f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs"
    if cfg.use_gpu and total.get("GPU", 0) < 1:
        raise ClusterError(f"--use-gpu asked for {asked}, but the cluster has no GPUs ({has})")
    if cfg.use_gpu and total.get("GPU", 0) < cfg.num_workers:
        raise ClusterError(f"asked for {asked}; the cluster has {has}")
    if total.get("CPU", 0) < cfg.num_workers * cfg.cpus_per_worker + DATA_CPUS:
        raise ClusterError(f"asked for {asked}; the cluster has {has}. Use fewer --num-workers "
                           "or --cpus-per-worker, or a bigger cluster")


def _fit(ray, cfg: Config, parquet_dir: str, train_rows: int, storage: str, run_name: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from trainer.worker import train_loop_per_worker

    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "train_rows": train_rows},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        datasets={"train": ray.data.read_parquet(os.path.join(parquet_dir, "train"))},
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    return trainer.fit()


def _restore_model(cfg: Config, directory: str):
    from trainer.model import build_model

    model = build_model(cfg)
    model.optimizer.build(model.trainable_variables)
    return model, checkpoint.load(directory, model)


def evaluate(model, images, labels) -> tuple[float, float]:
    from trainer.model import preprocess

    x, y = preprocess(images, labels)
    loss, accuracy = model.evaluate(x, y, batch_size=1000, verbose=0)
    return float(loss), float(accuracy)
