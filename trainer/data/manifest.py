"""A Parquet directory's `manifest.json`: the data's content hash, and each split's rows, files and
label counts. Written last by trainer/data/shards.py (it marks the directory complete); read by the
driver, which plans from it alone on the streaming path, and by the workers' share planner."""

from __future__ import annotations

from dataclasses import dataclass

FORMAT = "mnist-parquet/1"  # the schema; every manifest this project wrote says it


@dataclass(frozen=True)
class Split:
    rows: int
    files: tuple[dict, ...]  # {"path": "<split>/part-00000.parquet", "rows": N}, in row order
    label_counts: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    content_sha256: str
    splits: dict[str, Split]  # "train" and "test"

    def rows(self, split: str) -> int:
        return self.splits[split].rows

    def files(self, split: str) -> list[dict]:
        return list(self.splits[split].files)

    def to_json(self) -> dict:
        return {"format": FORMAT, "content_sha256": self.content_sha256,
                "splits": {name: {"rows": s.rows, "files": list(s.files), "label_counts": list(s.label_counts)}
                           for name, s in self.splits.items()}}

    @classmethod
    def from_json(cls, value) -> Manifest:
        """A manifest from manifest.json's content; ValueError naming what is wrong if it is not one."""
        if not isinstance(value, dict) or value.get("format") != FORMAT:
            found = value.get("format") if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"format {found!r}, expected {FORMAT!r}")
        try:
            splits = {name: Split(int(s["rows"]), tuple(s["files"]), tuple(s.get("label_counts", ())))
                      for name, s in value["splits"].items()}
            return cls(str(value["content_sha256"]), splits)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed ({type(exc).__name__}: {exc})") from None
