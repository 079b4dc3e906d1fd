"""What runs on each Ray Train worker: open this worker's share, start TensorFlow, build the model,
then each epoch run the distributed step (trainer/train/step.py) over the share
(trainer/train/share.py), report metrics and a checkpoint, and let the watchdog
(trainer/train/watchdog.py) bound every wait on a peer.

TensorFlow is imported inside the loop, not at the top of this module: the worker starts pulling
its Ray Data shard first, and the import (seconds) overlaps with it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray.train

from trainer.common import quiet
from trainer.common.timeline import peak_rss_mb, process_start_time
from trainer.config import Config, rank_batch, steps_per_epoch
from trainer.data import validation
from trainer.data.shards import read_parquet_split
from trainer.train import checkpoint, warm
from trainer.train.failures import WorkerFailure
from trainer.train.loop_config import LoopConfig
from trainer.train.share import open_share
from trainer.train.step import (
    build,
    make_all_reduce_sum,
    make_train_steps,
    make_validation,
    pin_to_cores,
    run_epoch,
    start_tensorflow,
)
from trainer.train.tensorboard import EpochWriter  # imports TensorFlow only when a writer is made
from trainer.train.watchdog import Watchdog


def train_loop_per_worker(loop_config: dict) -> None:
    loop = LoopConfig.from_dict(loop_config)
    if not loop.config.verbose:
        quiet.quiet_ray_train_console()
    try:
        _train(loop.config, loop)
    except WorkerFailure:
        raise
    except Exception as exc:  # crosses to the controller and driver as data: a WorkerFailure
        raise failure(exc) from None


def failure(exc: BaseException, watchdog: Watchdog | None = None) -> WorkerFailure:
    """`exc` as this worker's WorkerFailure; its full traceback goes to the worker's log."""
    log = quiet.log_file()
    with open(log, "a") as f:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
    return WorkerFailure.of(exc, ray.train.get_context().get_world_rank(), log, watchdog.fired if watchdog else None)


def _train(cfg: Config, loop: LoopConfig) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    marks = {"worker_started": process_start_time(), "loop_started": time.time()}
    shard = None if loop.stream else ray.train.get_dataset_shard("train")
    with ThreadPoolExecutor(1) as pool:  # the shard is read (or planned) while TensorFlow imports
        opening = pool.submit(open_share, cfg, loop.stream or shard, world, rank)
        held_out = pool.submit(read_parquet_split, loop.validation, validation.SPLIT) if loop.validation else None
        tf, strategy, internals = start_tensorflow(cfg)
        marks["tensorflow_imported"] = time.time()
        index, epoch_data = opening.result()
        held_out = held_out.result() if held_out else None
    marks["shard_in_memory"] = time.time()
    # Once the shard is read (its reader had both cores while TensorFlow imported): every thread
    # there is now, TensorFlow's and its collectives' among them, and every later one, on this
    # worker's cores.
    cores = pin_to_cores(ctx.get_local_rank(), ctx.get_local_world_size(), cfg.cpus_per_worker) if loop.pin else None
    # The global batch is the same at every world size; this rank's share, and the steps all ranks run:
    batch, steps = rank_batch(cfg.batch_size, world, rank), steps_per_epoch(len(index), cfg.batch_size, world)
    model = build(strategy, cfg, steps)
    if loop.init:  # --init-from: a trained model's weights; a checkpoint, if any, overrides
        warm.apply(model, **loop.init)
    epochs_done, history = _restore(model)  # restores optimizer.iterations, which drives the LR warm-up
    train_steps = make_train_steps(tf, strategy, model, cfg.batch_size, cfg.allreduce_dtype)
    all_reduce_sum = make_all_reduce_sum(tf, strategy)
    validate = make_validation(tf, model, *held_out, rank, world, all_reduce_sum) if held_out else None
    board = EpochWriter(cfg.tensorboard_dir) if cfg.tensorboard_dir and rank == 0 else None
    previous_world = history[-1].get("world_size", world) if history else world  # != world: a resize
    launched = [h["first_step_unix"] for h in history if h.get("launch") == loop.launch]
    if launched:  # a restart within this launch: its first step was an earlier group's
        marks["first_step"] = min(launched)
    watchdog = Watchdog(cfg.stall_timeout_s, internals.abort_collectives)
    try:
        info = {**shard_info(all_reduce_sum, index, loop.train_rows), "rank": rank, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "batch": batch, "cores": cores}
        marks["collectives_ready"] = time.time()
        for epoch in range(epochs_done, cfg.epochs):
            with epoch_data(batch, steps, seed=(cfg.seed, rank, epoch)) as chunks:
                record = run_epoch(train_steps, all_reduce_sum, chunks, batch, steps, progress=watchdog.beat)
            if validate:  # a search's trial: scored on its validation split every epoch
                record.update(validate())
            record.update(epoch=epoch + 1, restarted=epoch == epochs_done and epoch > 0, world_size=world,
                          launch=loop.launch,
                          learning_rate=float(tf.convert_to_tensor(model.optimizer.learning_rate)),
                          **{k: info[k] for k in ("global_rows_seen", "global_rows_duplicated")})
            if epoch == epochs_done and previous_world != world:
                record["resized_from"] = previous_world
            history.append(record)
            marks.setdefault("first_step", record["first_step_unix"])
            marks["last_step"] = record["first_step_unix"] + record["seconds"]
            if board:  # rank 0's; the epoch's console line comes from the controller (trainer/train/console.py)
                board.write(record, model.optimizer)
            with watchdog.paused():  # a slow checkpoint upload is no stall of a peer
                _report(model, cfg, epoch, history, {**info, "timeline": marks, "peak_rss_mb": peak_rss_mb()}, rank)
    except Exception as exc:
        raise failure(exc, watchdog) from None  # the watchdog says whether it cut the step short
    finally:
        watchdog.stop()
        if board:
            board.close()


def shard_info(all_reduce_sum, index: np.ndarray, train_rows: int) -> dict:
    """What this worker trains on, plus a global check that shards are disjoint and cover the data."""
    counts = all_reduce_sum(np.bincount(index, minlength=train_rows)[:train_rows])
    return {"rows": int(len(index)), "index_sha256": hashlib.sha256(np.sort(index).tobytes()).hexdigest(),
            "global_rows_seen": int((counts > 0).sum()), "global_rows_duplicated": int((counts > 1).sum())}


def _restore(model) -> tuple[int, list[dict]]:
    """Continue from Ray's latest checkpoint, if the run has one (a restart or a resumed run)."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return 0, []
    with latest.as_directory() as directory:
        meta = checkpoint.load(directory, model)
    return meta["epochs_done"], meta["history"]


def _report(model, cfg: Config, epoch: int, history: list[dict], info: dict, rank: int) -> None:
    """Every rank adds its own worker file to the epoch's checkpoint (Ray merges them); rank 0 the state."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.write_worker_info(tmp, rank, info)
        if rank == 0:
            checkpoint.save(tmp, model, epoch + 1, cfg.to_dict(), history)
        ray.train.report({**history[-1], "global_rows_seen": info["global_rows_seen"],
                          "global_rows_duplicated": info["global_rows_duplicated"]},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))
