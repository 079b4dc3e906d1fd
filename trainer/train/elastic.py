"""What an elastic run's epoch history says: where the world size changed, and why.

Each epoch's record (trainer/train/checkpoint.py) holds its world size, the launch of Ray Train that ran
it, and its first step's time; metrics.json["resizes"] comes from here, and the console's resize
line (trainer/train/console.py) gives the same reasons.
"""

from __future__ import annotations

GREW = "room for more workers at Ray Train's resize check"
SHRANK = "a worker failed and fewer fit: Ray Train restarted with the workers it could place"
RERUN = "a rerun with another --num-workers resumed the run"


def reason(old: int, new: int, same_launch: bool) -> str:
    """Why the world size went from `old` to `new`: within one launch of Ray Train an elastic run
    grew or shrank; across launches a rerun chose another size."""
    return RERUN if not same_launch else GREW if new > old else SHRANK


def resizes(history: list[dict]) -> list[dict]:
    """Each change of world size between consecutive epochs: after which epoch, from and to how many
    workers, why (within one launch of Ray Train, an elastic run grew or shrank; across launches, a
    rerun chose another size), and the seconds from the last step before it to the first step after
    (the partial epoch lost, noticing the change, and the restart)."""
    found = []
    for before, after in zip(history, history[1:]):
        old, new = before.get("world_size"), after.get("world_size")
        if old is None or new is None or old == new:
            continue
        found.append({
            "after_epoch": before["epoch"], "from": old, "to": new,
            "reason": reason(old, new, before.get("launch") == after.get("launch")),
            "at_unix": after["first_step_unix"],
            "gap_seconds": round(after["first_step_unix"] - before["first_step_unix"] - before["seconds"], 3)})
    return found
