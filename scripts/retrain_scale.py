"""A retraining cycle as the data grows: its driver's peak memory, and the data checks' share of it.

    python scripts/make_big_mnist.py --rows 1000000 --output big/m1m        # and --rows 8100000 big/m8m
    python scripts/retrain_scale.py ../shared/data/mnist big/m1m big/m8m    # about 15 minutes on 2 cores

First a store is seeded with one version trained on the first data set (--seed-epochs). Then, for
each data set, a copy of that store runs one whole cycle as cron would:
`jobs/retrain.py --store COPY --data D --epochs 1 --num-workers 2 --accept-data-change --force`. Each
cycle is tested against the same current version. --accept-data-change is needed because the big
sets' distorted copies are a shift that BBSD sees. --force is needed because the first set is
unchanged since the seed.

Printed for each cycle:
- its wall time;
- the data checks' seconds, from the version record (`data_checks.seconds`): the survey is one pass
  over the data that profiles, hashes and samples it; the shift is BBSD on the current model;
- their share of the wall time;
- the driver's peak resident memory: the retrain process's own VmHWM, read from /proc every 0.2 s.
  Ray's processes and the training workers are not counted;
- the cycle's decision and BBSD's p-value.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from trainer.common.cli import script_parser
from trainer.common.errors import first_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXITS = {0: "promoted", 3: "rejected by the gate", 4: "refused", 5: "failed the canary"}


def vm_hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def cycle(store: str, data: str, epochs: int, log: str) -> dict:
    """One jobs/retrain.py cycle, watched: wall time, exit status, the process's peak RSS."""
    command = [sys.executable, os.path.join(ROOT, "jobs", "retrain.py"), "--store", store, "--data", data,
               "--epochs", str(epochs), "--num-workers", "2", "--accept-data-change", "--force"]
    started, peak = time.monotonic(), 0.0
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, vm_hwm_mb(proc.pid) or 0.0)
            time.sleep(0.2)
    if proc.returncode not in EXITS:
        raise SystemExit(f"error: the cycle on {data} exited {proc.returncode}; see {log}")
    return {"wall_s": time.monotonic() - started, "code": proc.returncode, "peak_mb": peak}


def newest_record(store: str) -> dict:
    versions = os.path.join(store, "versions")
    newest = max(os.listdir(versions))
    with open(os.path.join(versions, newest, "version.json")) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("data", nargs="+", help="data sets (the first also seeds the store)")
    parser.add_argument("--seed-epochs", type=int, default=2, help="epochs of the seed version")
    parser.add_argument("--output", default=None, help="where the stores and logs go (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="the rows as JSON too")
    args = parser.parse_args(argv)
    missing = [d for d in args.data if not os.path.exists(d)]
    if missing:
        parser.error(f"no such data: {', '.join(missing)}")
    work = args.output or tempfile.mkdtemp(prefix="retrain-scale-")
    os.makedirs(work, exist_ok=True)
    seed = os.path.join(work, "seed")
    print(f"seeding {seed} on {args.data[0]} ({args.seed_epochs} epochs); logs in {work}", flush=True)
    cycle(seed, os.path.abspath(args.data[0]), args.seed_epochs, os.path.join(work, "seed.log"))
    print(f"{'data':<28} {'rows':>10} {'cycle':>8} {'survey':>8} {'shift':>7} {'share':>6} {'peak MB':>8}  "
          "decision (BBSD p)", flush=True)
    rows = []
    for k, data in enumerate(args.data):
        store = os.path.join(work, f"store-{k}")
        shutil.copytree(seed, store)
        result = cycle(store, os.path.abspath(data), 1, os.path.join(work, f"cycle-{k}.log"))
        record = newest_record(store)
        seconds = record["data_checks"]["seconds"]
        checks = seconds["survey"] + seconds.get("shift", 0.0)
        row = {"data": data, "rows": record["data"]["train_rows"], **result, **seconds, "checks_s": checks,
               "share": checks / result["wall_s"], "decision": EXITS[result["code"]],
               "bbsd_p": record["data_checks"].get("shift", {}).get("p_value"),
               "reason": first_line(record.get("reason") or "", limit=200)}
        rows.append(row)
        print(f"{data[-28:]:<28} {row['rows']:>10,} {row['wall_s']:>7.1f}s {seconds['survey']:>7.1f}s "
              f"{seconds.get('shift', 0.0):>6.1f}s {row['share']:>6.1%} {row['peak_mb']:>8,.0f}  "
              f"{row['decision']} (p {'-' if row['bbsd_p'] is None else format(row['bbsd_p'], '.2g')})", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
