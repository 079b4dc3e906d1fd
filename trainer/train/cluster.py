"""Joining or starting Ray, and checking the cluster can run the job before training starts.

Loopback for a local Ray, a reachability check in seconds (ray.init would retry for ever), whether
the workers fit (with an optional wait for the autoscaler), and whether every node sees a local
storage path. Each failure is a ClusterError whose message says what was asked and what is there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import stat
import sys
import time
from pathlib import Path

from trainer.common import errors, quiet
from trainer.config import Config

QUIET_ENV = {  # library chatter off the console (it stays in Ray's log files); --verbose keeps it
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOG_LEVEL": "ERROR",  # not even its "progress bars disabled" notice
    "RAY_DISABLE_WORKER_LOG_PREFIX": "1",  # the controller's epoch lines read as the job's own
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


ELASTIC_START_TIMEOUT_S = 5  # an elastic run's placement group wait, per try (see ray_settings)


class ClusterError(errors.ClusterError):
    """The cluster cannot run what was asked. The message says what was asked and what it has."""


def address(cfg: Config) -> str | None:
    """The cluster to join: --address, else $RAY_ADDRESS (set by `ray job submit`), else None (local)."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def ray_settings(cfg: Config) -> dict[str, str]:
    """Environment Ray reads when it is imported or started: loopback for a local Ray, and a quiet
    console. A local Ray's processes inherit it."""
    settings = {}
    if on_loopback(address(cfg)):
        # Ray resolves 127.0.0.1 to the host's address unless it runs as a single-machine Ray
        # (read when ray is imported); this keeps a local Ray, and the driver joining one, on loopback.
        settings["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if not cfg.verbose:
        settings.update(QUIET_ENV)  # inherited by a local Ray's processes
    if not sys.stdout.isatty():
        # The driver colours the prefix of lines it relays from the cluster, "(raylet)" among them,
        # whether or not a terminal reads them; Ray reads this at each line.
        settings["RAY_COLOR_PREFIX"] = "0"
    # Ray Train's controller polls the workers this often (default 2 s), and notices the end of
    # training only at a poll: 5.9 s from the last step to fit() returning at 2 s, 0.9 s at 0.5 s
    # (measured on the sample); the controller's CPU stays under 0.1 s per epoch (the benchmark).
    settings["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    # Ray Train 2.60's preemption watcher is one more actor whose creation logs a core_worker error
    # line; a preempted node is handled like any lost node (restart from the latest checkpoint).
    settings["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    # ray.train.report first agrees on the checkpoint's name across the ranks, in a barrier where
    # the workers' watchdog is paused (a slow upload, after it, is no stall) and Ray Train waits
    # for ever by default: a peer frozen for good there hung the group until Ray's health check,
    # 7 minutes later (a CI run). The ranks reach it together, a checkpoint write apart, so the same
    # bound as every other silence: --stall-timeout-s. Ray Train passes this to its controller and
    # workers on any cluster.
    settings["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] = f"{cfg.stall_timeout_s:g}"
    if cfg.elastic:
        # After a lost node an elastic run restarts at the size its resource view allows, and that
        # view (Ray's autoscaling coordinator) refreshes every 20 s: until then Ray Train may ask
        # for the lost node's workers again and wait out the placement group's start timeout (60 s:
        # 78.5 s from the last step to the next, measured). An elastic size is chosen from nodes
        # that exist (the wait for autoscaled nodes happens before it), so a short timeout only
        # retries that choice sooner. Ray Train passes this to its controller on any cluster.
        settings["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(ELASTIC_START_TIMEOUT_S)
    if not address(cfg):  # a Ray of this process's own: nobody scraping its metrics
        settings["RAY_TRAIN_METRICS_ENABLED"] = "0"
        # Ray starts its workers at niceness 15, so that on a shared node its raylet keeps the CPU.
        # On a Ray of this process's own the workers are the work: at 15, a CPU hog at normal
        # priority on both cores left them about 3% of a core each (a sample run: no epoch in 6
        # minutes, against 61 s at niceness 0 and 30 s with no hog; docs/operations.md).
        settings["RAY_worker_niceness"] = "0"
    return settings


@contextlib.contextmanager
def environment(cfg: Config):
    """ray_settings(cfg) in this process's environment (where the user has not set one already), and
    the driver's Ray Train logger at WARNING unless --verbose, for the block only: a caller that
    runs the job in-process (a test, a notebook, benchmark.py) gets its own settings back after it."""
    added = {name: value for name, value in ray_settings(cfg).items() if name not in os.environ}
    logger = logging.getLogger("ray.train")
    level = logger.level
    os.environ.update(added)
    if not cfg.verbose:
        logger.setLevel(logging.WARNING)  # the driver's side of Ray Train
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
        logger.setLevel(level)


def connect(ray, cfg: Config, dashboard: bool = False) -> bool:
    """Join the cluster, or start a local Ray bound to loopback, with a dashboard if `dashboard` (a
    search's: its stopped trials' placement groups need the cleaner). True where the cluster has a
    dashboard, and with it the state API that Ray Train's placement group cleaner polls."""
    level = logging.INFO if cfg.verbose else logging.WARNING
    joined = address(cfg)
    if joined:
        context = ray.init(address=joined, log_to_driver=True, logging_level=level,
                           runtime_env=None if cfg.verbose else {"env_vars": forwarded_env()})
        if not cfg.verbose:
            quiet.route_node_notices()
        return bool(context.dashboard_url)
    if not cfg.verbose:  # Ray 2.60 turns token auth on for a local Ray and says so, as a WARNING
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    notice = owner_only_token()
    if notice:
        print(notice, file=sys.stderr, flush=True)
    # No CPU kept back for Ray Data: the driver hands it tables already in the object store
    # (ray.data.from_arrow), so splitting them runs no tasks, even with every CPU held by a worker.
    ray.init(address="local", num_cpus=cfg.local_cpus or os.cpu_count() or 1,
             num_gpus=None if cfg.use_gpu else 0, include_dashboard=dashboard, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", log_to_driver=True, logging_level=level,
             runtime_env=None if cfg.verbose else {"worker_process_setup_hook": "trainer.common.quiet.route_unraisable"})
    if not cfg.verbose:
        quiet.route_node_notices()
    return dashboard


def forwarded_env() -> dict[str, str]:
    """QUIET_ENV for a joined cluster's workers and actors, as the job's runtime env: their raylets
    were started without it, so Ray Data's split coordinator printed its four execution lines at
    every worker-group start (a real three-host cluster). The value in this process's environment
    wins (a user's own setting); a variable that `ray job submit`'s runtime env already sets is
    left to it (ray.init may not set it twice)."""
    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    taken = submitted.get("env_vars") or {}
    return {name: os.environ.get(name, value) for name, value in QUIET_ENV.items() if name not in taken}


def owner_only_token() -> str | None:
    """Before a local Ray starts: the token file it will use, owner-only from the start.

    Ray 2.60 turns token auth on for a local Ray and, finding no token, writes ~/.ray/auth_token
    with the process's umask (0644 on most machines: readable by every local user); a later `ray
    start` on the machine reuses that file as its cluster's only lock. So the job writes the file
    first, created with mode 0600 (the same 256-bit hex token Ray would make), and Ray reuses it. A
    file that others can already read is made owner-only, and the returned line says so. Nothing is
    done where the user chose otherwise: $RAY_AUTH_MODE other than token, or $RAY_AUTH_TOKEN set."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if not mode & 0o077:
            return None
        path.chmod(mode & 0o700)
        return (f"note: Ray's token file {path} could be read by others (mode {mode:o}); it is owner-only now "
                "(600). Anyone who read it holds the token: remove the file for a new one")
    except OSError as exc:
        raise ClusterError(f"cannot write Ray's token file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return None


def on_loopback(joined: str | None) -> bool:
    """No address (a local Ray) or one on this machine's loopback (ray://, http:// or host:port)."""
    return not joined or host_port(joined)[0] in ("127.0.0.1", "localhost", "::1")


def host_port(joined: str) -> tuple[str, str | None]:
    """'ray://h:p', 'http://h:p', 'h:p' or 'auto' -> (host, port or None)."""
    target = joined.split("://")[-1]
    if ":" not in target:
        return target, None
    host, port = target.rsplit(":", 1)
    return host.strip("[]"), port


def check_reachable(joined: str, timeout_s: float = 10.0) -> None:
    """ray.init retries an unreachable cluster address for ever; fail in seconds instead."""
    host, port = host_port(joined)
    if port is None:  # "auto": Ray looks the address up itself
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {joined} ({exc}); is it running? "
                           "check --address / $RAY_ADDRESS") from None


def check_fits(ray, cfg: Config) -> None:
    """Fail in seconds, not hang, when the cluster cannot hold the worker group. With
    --resource-wait-s (an autoscaling cluster) ask the autoscaler for room and wait that long."""
    deadline = time.monotonic() + cfg.resource_wait_s
    problem = shortfall(ray.cluster_resources(), cfg)
    if problem and cfg.resource_wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        worker = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
        request_resources(bundles=[worker] * cfg.max_workers)
        print(f"waiting up to {cfg.resource_wait_s:g}s for the autoscaler: {problem}", flush=True)
        while problem and time.monotonic() < deadline:
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0.1)))
            problem = shortfall(ray.cluster_resources(), cfg)
        if problem:
            problem += f" (after waiting {cfg.resource_wait_s:g}s)"
    if problem:
        raise ClusterError(problem)


def shortfall(total: dict, cfg: Config) -> str | None:
    """Why `total` cannot hold the workers (an elastic run's minimum), or None when it can."""
    need = cfg.min_workers
    asked = (f"{'at least ' if cfg.elastic else ''}{need} workers x {cfg.cpus_per_worker} CPU"
             + (" + 1 GPU" if cfg.use_gpu else ""))
    has = f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs"
    if cfg.use_gpu and total.get("GPU", 0) < 1:
        return f"--use-gpu asked for {asked}, but the cluster has no GPUs ({has})"
    if cfg.use_gpu and total.get("GPU", 0) < need:
        return f"asked for {asked}; the cluster has {has}"
    if total.get("CPU", 0) < need * cfg.cpus_per_worker:
        return (f"asked for {asked}; the cluster has {has}. Use fewer --num-workers "
                "or --cpus-per-worker, or a bigger cluster")
    return None


def check_storage_shared(ray, storage: str) -> None:
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
