"""The two TensorFlow internals the worker needs, looked up in one place and checked at start.

TensorFlow has no public name for either:
- configuring the coordination service's heartbeat timeout. MultiWorkerMirroredStrategy configures
  the service only when none is configured yet, with `heartbeat_timeout_in_ms=0`: the service's own
  default, 10 s, after which a peer that sent no heartbeat is declared dead and every worker's
  collectives are aborted. A worker frozen for 10 s (a paused VM, steal time) then kills the run.
- aborting this process's collectives (what TensorFlow's own peer health check calls), for the
  worker's watchdog.

`resolve()` finds both when the worker starts, so an upgrade that moves either fails the run at
once with a clear message, not silently when a peer is gone. tests/test_worker.py checks both
against the installed TensorFlow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable


class TensorFlowInternalsError(RuntimeError):
    """An internal TensorFlow API this job relies on is gone (a TensorFlow upgrade)."""


@dataclass(frozen=True)
class Internals:
    configure_coordination: Callable[[float], None]  # heartbeat timeout in seconds; before the strategy
    abort_collectives: Callable[[str], None]  # fail every pending and future collective with this message


def resolve(tf) -> Internals:
    """The internals, looked up now; a TensorFlowInternalsError naming what moved, if anything did."""
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.eager import context
    except ImportError as exc:
        raise TensorFlowInternalsError(f"{exc} in TensorFlow {tf.__version__}; trainer/train/tf_internals.py "
                                       "needs updating") from None
    ctx = context.context()
    missing = [name for name in ("configure_coordination_service", "coordination_service", "abort_collective_ops")
               if not hasattr(ctx, name)]
    if missing:
        raise TensorFlowInternalsError(f"TensorFlow {tf.__version__}'s eager context has no {', '.join(missing)}; "
                                       "trainer/train/tf_internals.py needs updating")

    def configure_coordination(heartbeat_timeout_s: float) -> None:
        """What MultiWorkerMirroredStrategy would configure, with our heartbeat timeout; it keeps a
        configuration that is already there (collective_all_reduce_strategy.py)."""
        workers = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]  # set by trainer/train/backend.py
        ctx.configure_coordination_service(
            service_type="standalone", service_leader="/job:worker/replica:0/task:0",
            heartbeat_timeout_in_ms=int(heartbeat_timeout_s * 1000),
            coordinated_jobs=[coordination_config_pb2.CoordinatedJob(
                name="worker", num_tasks=len(workers))])

    def abort_collectives(message: str) -> None:
        ctx.abort_collective_ops(tf.errors.UNAVAILABLE, message)

    return Internals(configure_coordination, abort_collectives)


def heartbeat_timeout_s() -> float | None:
    """The coordination service's heartbeat timeout configured in this process (None: none configured)."""
    from tensorflow.python.eager import context

    config = context.context().coordination_service
    return None if config is None else config.heartbeat_timeout_in_ms / 1000

