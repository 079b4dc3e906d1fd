"""What a failure looks like: a worker's error as data, the cause of a group's failure, the restart
line, and its record.

A worker raises a WorkerFailure in place of whatever it caught (trainer/train/worker.py): a plain
exception of this project's, so unpickling it on Ray Train's controller and on the driver imports
nothing (a TensorFlow error there imported TensorFlow, whose C++ start-up notices then reached the
console). It carries fields: the kind of failure, the rank, the exception's type and message, the
last frame in this project's code, the worker's log, and the peer or the seconds where the kind has
them. `classify` decides the kind where the exception is, from fields where they exist;
`read_words` is the one place that reads a third party's message text, for what no field says
(TensorFlow's and gRPC's collective errors, Ray's word that a node died).

Ray Train calls backend.Console (a UserCallback, on its controller) after every report and every
worker failure. Within --max-failures it prints one line per restart

    restarted after a worker failure (heartbeat timeout on rank 1): continuing from epoch 3, restart 1 of 3

and appends the same facts to <run>/restarts.json in the run's storage, which the driver copies into
metrics.json's restarts. Past --max-failures it prints nothing: the driver says the run failed.
"""

from __future__ import annotations

import os
import re
import traceback

from trainer.common.fs import read_json, write_json

RECORD = "restarts.json"  # in <storage>/<run>/, beside Ray Train's checkpoints
MESSAGE_LINES = 6  # of an exception's message, after dropping TensorFlow's op-definition stack

# The kinds, most telling first: what `cause` names when several ranks failed together.
NODE_LOST = "node lost"  # Ray: the worker's node died
PROCESS_DIED = "process died"  # Ray: the worker's process died (SIGKILL, OOM)
PEER_FROZEN = "peer frozen"  # TensorFlow's coordination service: a peer stopped sending heartbeats
PEER_LOST = "peer lost"  # gRPC: the connection to a peer dropped
PEER_LATE = "peer late"  # Ray Train: a peer never reached ray.train.report's barrier
STALLED = "stalled"  # this worker's watchdog: no progress for --stall-timeout-s
ERROR = "error"  # any other exception
KINDS = (NODE_LOST, PROCESS_DIED, PEER_FROZEN, PEER_LOST, PEER_LATE, STALLED, ERROR)
PEER_KINDS = (PEER_FROZEN, PEER_LOST, PEER_LATE)  # a failure that names another rank as its cause
CAUSES = {  # the restart line's phrase for each kind but ERROR; {rank} is the rank to blame
    NODE_LOST: "the node of rank {rank} was lost",
    PROCESS_DIED: "rank {rank}'s process died",
    PEER_FROZEN: "heartbeat timeout on rank {rank}",
    PEER_LOST: "lost the connection to rank {rank}",
    PEER_LATE: "no progress for {seconds:g}s on rank {rank}",
    STALLED: "no progress for {seconds:g}s on rank {rank}",
}

# TensorFlow's and gRPC's words, where no field names the peer (its task index is its rank):
_HEARTBEATS = re.compile(r"task:(\d+) heartbeat timeout|stopped sending heartbeats\):\s*/job:worker/replica:0/task:(\d+)")
_CONNECTION = re.compile(r"(Connection reset by peer|Socket closed|Connection refused|failed to connect)[\s\S]*?"
                         r"remote target /job:worker/replica:0/task:(\d+)")
_NODE_DIED = re.compile(r"its node (has )?died|node has died|NodeDied")  # Ray's ActorDiedError has no field for it


class WorkerFailure(RuntimeError):
    """A worker's error as data; its text (`str`) is the summary a person reads: the last frame in
    this project's code, the exception in a few lines, and the log's path."""

    def __init__(self, kind: str, rank: int | None, exception: str, message: list[str],
                 frame: list[str] | None = None, log: str | None = None, peer: int | None = None,
                 seconds: float | None = None):
        self.kind, self.rank, self.exception, self.message = kind, rank, exception, list(message)
        self.frame, self.log, self.peer, self.seconds = list(frame or []), log, peer, seconds
        super().__init__("\n".join([*self.frame, f"{exception}: {self.message[0] if self.message else ''}",
                                    *self.message[1:], *([f"full worker log: {log}"] if log else [])]))

    def __reduce__(self):  # crosses processes by its fields
        return type(self), (self.kind, self.rank, self.exception, self.message, self.frame, self.log, self.peer,
                            self.seconds)

    @classmethod
    def of(cls, exc: BaseException, rank: int | None, log: str | None, stalled_after: float | None = None):
        """The failure of `exc`, caught on a worker; `stalled_after`: the watchdog's timeout if it fired."""
        kind, peer, seconds = classify(exc, stalled_after)
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if f"{os.sep}trainer{os.sep}" in f.filename]  # TensorFlow's re-raise frames say little
        frame = []
        if frames:
            last = (ours or frames)[-1]
            frame = [f'  File "{last.filename}", line {last.lineno}, in {last.name}'] + (
                [f"    {last.line.strip()}"] if last.line else [])
        name = f"{type(exc).__module__}.{type(exc).__name__}".removeprefix("builtins.")
        return cls(kind, rank, name, message_lines(exc), frame, log, peer, seconds)

    @classmethod
    def from_ray(cls, rank: int, error: BaseException) -> WorkerFailure:
        """What Ray Train hands the controller for `rank`: the worker's own WorkerFailure, or Ray's error
        for a worker whose process or node died (its health check failed with Ray's ActorDiedError)."""
        if isinstance(error, cls):
            return error
        from ray.exceptions import RayActorError

        failure = getattr(error, "health_check_failure", None) or error  # Ray Train's wrapper, unwrapped
        lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
        why = next((line for line in lines if "because" in line), lines[0] if lines else "")
        kind = ERROR
        if isinstance(failure, RayActorError):
            kind = NODE_LOST if read_words(str(failure))[0] == NODE_LOST else PROCESS_DIED
        return cls(kind, rank, type(failure).__name__, [why[:300]])


def classify(exc: BaseException, stalled_after: float | None = None) -> tuple[str, int | None, float | None]:
    """(kind, peer, seconds) of an exception a worker caught, the root cause first: a frozen or lost
    peer (TensorFlow's and gRPC's words: no field carries them), a peer late to Ray Train's report
    barrier (its error's fields), this worker's watchdog (its own record), else an error."""
    kind, peer = read_words(str(exc))
    if kind in (PEER_FROZEN, PEER_LOST):
        return kind, peer, None
    missing = getattr(exc, "_missing_ranks", None)  # ray.train's BroadcastCollectiveTimeoutError
    if missing:
        return PEER_LATE, int(missing[0]), float(getattr(exc, "_timeout_s", 0) or 0)
    if stalled_after is not None:
        return STALLED, None, stalled_after
    return ERROR, None, None


def read_words(text: str) -> tuple[str | None, int | None]:
    """(kind, peer) from a third party's message text, for what no field says: TensorFlow's
    coordination service (a peer's heartbeats stopped), gRPC (a peer's connection dropped; its task
    index is its rank), Ray's ActorDiedError (its node died, not only its process). The one place
    that reads such text; (None, None) if it says none of these."""
    frozen = _HEARTBEATS.search(text)
    if frozen:
        return PEER_FROZEN, int(frozen.group(1) or frozen.group(2))
    lost = _CONNECTION.search(text)
    if lost:
        return PEER_LOST, int(lost.group(2))
    if _NODE_DIED.search(text):
        return NODE_LOST, None
    return None, None


def message_lines(exc: BaseException) -> list[str]:
    """The exception's message without TensorFlow's 'Detected at node ... defined at' stack, blank
    lines and repeats, cut to MESSAGE_LINES lines of at most 300 characters."""
    kept, skipping = [], False
    for line in str(exc).splitlines():
        text = line.strip()
        if text.startswith("Detected at node"):
            skipping = True
            continue
        if skipping and (text.startswith("File ") or not text):
            continue
        skipping = False
        if text and text not in kept:
            kept.append(text[:300])
    return kept[:MESSAGE_LINES] or [""]


def worker_summaries(worker_failures: dict) -> dict[int, str]:
    """{rank: summary} of Ray Train's worker failures, as a person reads them."""
    return {rank: str(WorkerFailure.from_ray(rank, error)) for rank, error in sorted(worker_failures.items())}


def cause(worker_failures: dict) -> tuple[int, str]:
    """(rank, one phrase) for why the group failed, the root cause first: a worker whose node went or
    whose process died, a peer whose heartbeats stopped, whose connection dropped or that never
    reached ray.train.report (the peer is named), the watchdog, else the first worker's exception."""
    if not worker_failures:
        raise ValueError("no worker failures to explain")
    found = {rank: WorkerFailure.from_ray(rank, error) for rank, error in sorted(worker_failures.items())}
    # The most telling kind (KINDS' order), the lowest rank among those of that kind.
    rank, failure = min(found.items(), key=lambda item: KINDS.index(item[1].kind))
    if failure.kind == ERROR:
        return rank, f"{failure.exception}: {failure.message[0]}"[:200] + f" on rank {rank}"
    named = failure.peer if failure.kind in PEER_KINDS else rank  # the phrase names the peer
    blamed = named if named in found else rank  # the rank returned: the peer, when it failed too
    return blamed, CAUSES[failure.kind].format(rank=named, seconds=failure.seconds)


def explain(error: BaseException, restarts: int) -> str:
    """The driver's message when Ray Train gives up: one line with the cause and the restarts used,
    then the failing worker's summary (last frame, exception, log path)."""
    used = f" after {restarts} restart{'s' if restarts != 1 else ''}" if restarts else ""
    worker_failures = getattr(error, "worker_failures", None)
    if worker_failures:
        rank, phrase = cause(worker_failures)
        return f"training failed{used}: {phrase}\n" + worker_summaries(worker_failures)[rank]
    inner = getattr(error, "controller_failure", None) or error
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"training failed{used}: " + (lines[0][:300] if lines else type(inner).__name__)


def append_record(path: str, entry: dict) -> None:
    """Add `entry` to the JSON list at `path` (local or URI), replacing the file whole."""
    write_json(path, [*read_records(path), {**entry, "workers": {str(k): v for k, v in entry["workers"].items()}}])


def read_records(path: str) -> list[dict]:
    """The restarts recorded at `path`; none if it is missing or unreadable."""
    return read_json(path, default=[])
