"""What a failure looks like: a worker's error in a few lines, the restart line, and its record.

A worker raises WorkerFailure in place of whatever it caught: a plain exception, so unpickling it on
Ray Train's controller and on the driver imports nothing (a TensorFlow error there imported
TensorFlow, whose C++ start-up notices then reached the console), carrying the last frame of the
traceback, the exception in a few lines, and the path of the worker's full log.

Ray Train calls backend.Restarts (a UserCallback, on its controller) after every report and every
worker failure. Within --max-failures it prints one line per restart

    restarted after a worker failure (heartbeat timeout on rank 1): continuing from epoch 3, restart 1 of 3

and appends the same facts to <run>/restarts.json in the run's storage, which the driver copies into
metrics.json["restarts"]. Past --max-failures it prints nothing: the driver says the run failed.
"""

from __future__ import annotations

import os
import re
import traceback

RECORD = "restarts.json"  # in <storage>/<run>/, beside Ray Train's checkpoints
MESSAGE_LINES = 6  # of an exception's message, after dropping TensorFlow's op-definition stack


class WorkerFailure(RuntimeError):
    """A worker's error, summarized where it happened (message: the summary, then the log line)."""


def summarize(exc: BaseException, log_path: str | None) -> str:
    """The last frame of `exc`'s traceback in this project's code (else the last frame), and the
    exception, in at most about 10 lines, then the log's path."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f"{os.sep}trainer{os.sep}" in f.filename]  # TensorFlow's re-raise frames say little
    lines = []
    if frames:
        last = (ours or frames)[-1]
        lines.append(f'  File "{last.filename}", line {last.lineno}, in {last.name}')
        if last.line:
            lines.append(f"    {last.line.strip()}")
    lines += _message_lines(exc)
    if log_path:
        lines.append(f"full worker log: {log_path}")
    return "\n".join(lines)


def _message_lines(exc: BaseException) -> list[str]:
    """`Type: message`, the message without TensorFlow's 'Detected at node ... defined at' stack,
    blank lines and repeats, cut to MESSAGE_LINES lines of at most 300 characters."""
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
    head = f"{type(exc).__module__}.{type(exc).__name__}".removeprefix("builtins.")
    return [f"{head}: {kept[0] if kept else ''}", *kept[1:MESSAGE_LINES]]


def worker_summaries(worker_failures: dict) -> dict[int, str]:
    """{rank: summary} from Ray Train's worker failures: a WorkerFailure's summary, else (a process
    or node that died) the error's type and the line that says why."""
    found = {}
    for rank, error in sorted(worker_failures.items()):
        if isinstance(error, WorkerFailure):  # Ray Train hands on the exception the loop raised
            found[rank] = str(error)
        else:
            failure = getattr(error, "health_check_failure", None) or error  # Ray Train's wrapper, unwrapped
            lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
            why = next((line for line in lines if "because" in line), lines[0] if lines else "")
            found[rank] = f"{type(failure).__name__}: {why[:300]}"
    return found


def cause(worker_failures: dict) -> tuple[int, str]:
    """(rank, one phrase) for why the group failed, the root cause first: a worker whose node went or
    whose process died (Ray says so), a peer whose heartbeats stopped (the coordination service
    names its task, which is its rank), a peer that never reached ray.train.report (Ray Train names
    its rank), the watchdog, else the first worker's exception."""
    summaries = worker_summaries(worker_failures)
    dead = {rank: s for rank, s in summaries.items() if not isinstance(worker_failures[rank], WorkerFailure)}
    for rank, summary in dead.items():
        if re.search(r"its node (has )?died|node has died|NodeDied", summary):
            return rank, f"the node of rank {rank} was lost"
    for rank, summary in dead.items():
        if re.search(r"ActorDied|worker process has died|actor (is|has) dead|actor died", summary, re.IGNORECASE):
            return rank, f"rank {rank}'s process died"
    for rank, summary in summaries.items():
        frozen = re.search(r"task:(\d+) heartbeat timeout|stopped sending heartbeats\):\s*/job:worker/replica:0/task:(\d+)",
                           summary)
        if frozen:
            peer = int(frozen.group(1) or frozen.group(2))
            return (peer if peer in summaries else rank), f"heartbeat timeout on rank {peer}"
    for rank, summary in summaries.items():  # a peer's process or node gone: its connection dropped
        lost = re.search(r"(Connection reset by peer|Socket closed|Connection refused|failed to connect)[\s\S]*?"
                         r"remote target /job:worker/replica:0/task:(\d+)", summary)
        if lost:
            peer = int(lost.group(2))
            return (peer if peer in summaries else rank), f"lost the connection to rank {peer}"
    for rank, summary in summaries.items():  # Ray Train's report barrier timed out (RAY_TRAIN_COLLECTIVE_TIMEOUT_S)
        late = re.search(r"ranks have not joined the collective operation: \[(\d+)[\s\S]*?current value: ([\d.]+) s",
                         summary)
        if late:
            peer = int(late.group(1))
            return (peer if peer in summaries else rank), f"no progress for {float(late.group(2)):g}s on rank {peer}"
    for rank, summary in summaries.items():
        silent = re.search(r"no progress for ([\d.]+)s", summary)
        if silent:
            return rank, f"no progress for {silent.group(1)}s on rank {rank}"
    rank, summary = next(iter(summaries.items()))
    lines = summary.splitlines()
    exception = next((line for line in lines if re.match(r"[\w.]+(Error|Exception|Failure)\b", line)),
                     lines[-1] if lines else "unknown error")
    return rank, f"{exception[:200]} on rank {rank}"


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
    from trainer.storage import write_json

    write_json(path, [*read_records(path), {**entry, "workers": {str(k): v for k, v in entry["workers"].items()}}])


def read_records(path: str) -> list[dict]:
    """The restarts recorded at `path`; none if it is missing or unreadable."""
    from trainer.storage import read_json

    return read_json(path, default=[])
