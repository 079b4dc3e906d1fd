"""Where a distributed step's time goes: the job's own step (trainer/train/step.py), timed in N
plain processes joined by MultiWorkerMirroredStrategy on loopback (no Ray, no data loading), beside
the same step with no collective and the collective alone.

    python scripts/allreduce_profile.py                      # the variants below, 2 workers
    python scripts/allreduce_profile.py --variants step,step-threads2 --pin

Variants (each a fresh set of processes; every figure is per training step, median of --rounds):
  alone        1 process with every core: the step with no strategy (the floor for the arithmetic)
  nocomm       N processes side by side, each the step with no strategy: compute under the same
               sharing of cores, with no collective
  step         the job's step under the strategy as the job configures it
  reduce       the all-reduce of one gradient-sized vector (407,050 float32) alone, in the same
               tf.function loop of --steps-per-call
  step-*, reduce-*  the same with levers, each a suffix: -threads2 (inter-op threads 2), -bf16
               (gradients all-reduced in bfloat16, --allreduce-dtype), -pack256k (bytes_per_pack
               256 KiB), -auto (AUTO collectives), -pin (worker i on core i, taskset), -tiny (reduce:
               one float, the collective's fixed cost)
Prints wall ms and CPU ms per step of each process, and their ratios to `step`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from trainer.common.cli import script_parser
from trainer.common.net import loopback_port

PARAMETERS = 784 * 512 + 512 + 512 * 10 + 10  # the tutorial MLP's gradient, 1.6 MB in float32
DEFAULT_VARIANTS = ("alone", "nocomm", "step", "reduce", "step-threads2", "reduce-threads2", "step-bf16",
                    "reduce-bf16")


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--steps-per-call", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15, help="timed calls per variant, after 3 warm-up calls")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--repeat", type=int, default=3, help="passes over the variants, interleaved (the "
                        "machine's speed drifts); each figure is the median of the passes")
    parser.add_argument("--grpc-options", default="", help="TF_GRPC_DEFAULT_OPTIONS for every process, "
                        "e.g. grpc.http2.lookahead_bytes=4194304")
    parser.add_argument("--perf", metavar="VARIANT", help="instead of timing: sample rank 0 of VARIANT with "
                        "Linux perf for --perf-seconds while it steps, and print where its CPU time goes")
    parser.add_argument("--perf-seconds", type=float, default=8.0)
    parser.add_argument("--pin", action="store_true", help="pin worker i to core i (taskset)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one process's spec, as JSON
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that launch's cleanup runs
    if args.worker:
        return worker(json.loads(args.worker))
    cores = os.cpu_count() or 1
    if args.perf:
        return profile(args.perf, args, cores)
    variants = args.variants.split(",")
    passes = {variant: [] for variant in variants}
    for number in range(args.repeat):
        for variant in variants:
            passes[variant].append(launch(variant, args, cores))
        print(f"pass {number + 1} of {args.repeat}: "
              + ", ".join(f"{v} {p[-1]['wall_ms']:.2f}" for v, p in passes.items()) + " ms/step", flush=True)
    results = {variant: {key: statistics.median(p[key] for p in runs) for key in ("wall_ms", "cpu_ms")}
               for variant, runs in passes.items()}
    print(f"{args.workers} workers, global batch {args.batch}, {'pinned' if args.pin else 'not pinned'}; "
          f"median of {args.repeat} passes:")
    for variant in variants:
        print(format_row(variant, results[variant], results.get("step")), flush=True)
    for variant in variants:
        print(f"{variant}: collective ops in the traced step: {', '.join(passes[variant][0]['collectives']) or 'none'}")
    return 0


def launch(variant: str, args, cores: int, while_stepping=None) -> dict:
    """`variant` in fresh processes: its per-step figures, one dict per process. `while_stepping`,
    if given, is called with rank 0's process id once its timed steps begin."""
    n = 1 if variant == "alone" else args.workers
    ports = [loopback_port() for _ in range(n)]
    procs, logs = [], []
    for rank in range(n):
        spec = {"variant": variant, "rank": rank, "workers": n, "ports": ports, "batch": args.batch,
                "steps_per_call": args.steps_per_call, "rounds": args.rounds,
                "threads": cores if variant == "alone" else max(1, cores // n)}
        command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
        if (args.pin or "pin" in variant.split("-")) and n > 1:
            command = ["taskset", "-c", str(rank % cores), *command]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        if args.grpc_options:
            env["TF_GRPC_DEFAULT_OPTIONS"] = args.grpc_options
        log = tempfile.NamedTemporaryFile("w+", prefix=f"allreduce_{variant}_{rank}_", suffix=".log", delete=False)
        with log:
            procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env, text=True))
        logs.append(log.name)
    try:
        if while_stepping:
            for line in procs[0].stdout:
                if line.startswith("timing"):
                    while_stepping(procs[0].pid)
                    break
        outs = []
        for proc, log in zip(procs, logs):
            out, _ = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise SystemExit(f"error: variant {variant} failed with exit {proc.returncode}; its log: {log}")
            os.unlink(log)
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:  # a worker whose peer is gone waits in its collective for ever: none outlives this call
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"wall_ms": statistics.mean(o["wall_ms"] for o in outs), "cpu_ms": sum(o["cpu_ms"] for o in outs),
            "collectives": outs[0]["collectives"]}


# Where a sampled stack's CPU time goes: the first category, in this order, any of whose words
# appears in the stack (leaf first).
CATEGORIES = (
    ("thread hand-offs (futex, scheduler)", ("futex", "finish_task_switch", "schedule", "CondVar", "gpr_cv_wait")),
    ("serialization (protobuf)", ("google::protobuf", "_InternalSerialize", "ParseAndCallDone", "TcParser")),
    ("gRPC transport (HTTP/2, sockets)", ("grpc", "tcp_", "sock_", "Endpoint")),
    ("collective (ring, buffers)", ("RingReducer", "RingAlg", "BufRendezvous", "CollectiveRemoteAccess", "RecvBuf",
                                    "Collective")),
    ("memory (malloc, free)", ("malloc", "_int_free", "cfree", "unlink_chunk")),
    ("compute (oneDNN JIT code, Eigen kernels)", ("[JIT]", ".map)", "Eigen::", "dnnl", "MatMul",
                                                  "tensorflow::functor")),
    ("Python", ("_PyEval", "libpython")),
)
OTHER = "other (TensorFlow's executor, kernel)"


def profile(variant: str, args, cores: int) -> int:
    """Linux perf on rank 0 of `variant` while it steps: its on-CPU samples, by category."""
    import shutil

    if not shutil.which("perf"):
        raise SystemExit("error: --perf needs Linux perf (apt-get install linux-perf)")
    data = os.path.join(tempfile.mkdtemp(prefix="allreduce_perf_"), "perf.data")
    args.rounds = max(args.rounds, 400)  # still stepping when perf stops

    def record(pid: int) -> None:
        subprocess.run(["perf", "record", "-F", "999", "-g", "-o", data, "-p", str(pid), "--", "sleep",
                        str(args.perf_seconds)], check=True, capture_output=True)

    launch(variant, args, cores, while_stepping=record)
    script = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,dso"], check=True, capture_output=True,
                            text=True).stdout
    counts = dict.fromkeys([name for name, _ in CATEGORIES] + [OTHER], 0)
    for stack in script.split("\n\n"):
        if not stack.strip():
            continue
        name = next((name for name, words in CATEGORIES if any(w in stack for w in words)), OTHER)
        counts[name] += 1
    total = sum(counts.values()) or 1
    print(f"{variant}, rank 0: {total} on-CPU samples in {args.perf_seconds:.0f} s ({data})")
    for name, count in counts.items():
        print(f"  {count / total:6.1%}  {name}")
    return 0


def format_row(variant: str, result: dict, step: dict | None) -> str:
    ratio = f"  {result['wall_ms'] / step['wall_ms']:.2f}x wall, {result['cpu_ms'] / step['cpu_ms']:.2f}x CPU" \
        if step else ""
    return f"{variant:16s} {result['wall_ms']:6.2f} ms/step wall  {result['cpu_ms']:6.2f} CPU ms/step (all processes){ratio}"


def worker(spec: dict) -> int:
    base, *levers = spec["variant"].split("-")
    threads = 2 if "threads2" in levers else spec["threads"]
    if base in ("step", "reduce"):
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in spec["ports"]]},
                                              "task": {"type": "worker", "index": spec["rank"]}})
    import numpy as np
    import tensorflow as tf

    from trainer.config import Config
    from trainer.train import step as job_step

    tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    cfg = Config(cpus_per_worker=spec["threads"], steps_per_call=spec["steps_per_call"])
    if base in ("step", "reduce"):
        impl = tf.distribute.experimental.CommunicationImplementation
        options = tf.distribute.experimental.CommunicationOptions(
            bytes_per_pack=256 * 1024 if "pack256k" in levers else 0,
            implementation=impl.AUTO if "auto" in levers else impl.RING)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    else:
        strategy = tf.distribute.get_strategy()
    per_worker = spec["batch"] // spec["workers"]
    k = spec["steps_per_call"]
    rng = np.random.default_rng(spec["rank"])
    images = rng.integers(0, 256, (k, per_worker, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (k, per_worker), dtype=np.uint8)
    if base == "reduce":
        dtype = tf.bfloat16 if "bf16" in levers else tf.float32

        @tf.function
        def call(_images, _labels):
            total = tf.constant(0.0)
            for i in tf.range(k):
                def one():
                    vector = tf.fill((1 if "tiny" in levers else PARAMETERS,), tf.cast(i, dtype))
                    return tf.reduce_sum(tf.cast(tf.distribute.get_replica_context().all_reduce("sum", vector)[:1],
                                                 tf.float32))
                total += strategy.experimental_local_results(strategy.run(one))[0]
            return (total,)
    else:
        model = job_step.build(strategy, cfg, steps=469)
        call = job_step.make_train_steps(tf, strategy, model, spec["batch"],
                                         "bfloat16" if "bf16" in levers else "float32")
    for _ in range(3):
        [t.numpy() for t in call(images, labels)]
    walls, cpus = [], []
    print("timing", flush=True)
    for _ in range(spec["rounds"]):
        wall, cpu = time.perf_counter(), time.process_time()
        [t.numpy() for t in call(images, labels)]
        walls.append((time.perf_counter() - wall) / k * 1000)
        cpus.append((time.process_time() - cpu) / k * 1000)
    print(json.dumps({"wall_ms": statistics.median(walls), "cpu_ms": statistics.median(cpus),
                      "collectives": collectives(tf, call, images, labels)}), flush=True)
    return 0


def collectives(tf, function, *args) -> list[str]:
    """The collective ops in a traced function's loop body, with their types: how many all-reduces a
    step makes (Keras's optimizer makes the gradients' one; the step adds none)."""
    graph = function.get_concrete_function(*args).graph.as_graph_def()
    return sorted(f"{node.op} of {tf.as_dtype(node.attr['T'].type).name}" for fn in graph.library.function for node in fn.node_def
                  if node.op.startswith("Collective"))


if __name__ == "__main__":
    sys.exit(main())
