"""Write MNIST (npz, IDX directory, or keras download) as Parquet shards plus manifest.json.

    python scripts/prepare_data.py --data ../shared/data/mnist --out data/mnist-parquet

The job does this itself (once per data content) when given a raw source; run it to prepare a
shared copy (a local path or a URI such as s3://bucket/mnist) that every run then reads in place.
"""

from __future__ import annotations

import sys

from trainer.common.cli import script_parser
from trainer.data import shards


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--data", help="source; default $MNIST_DATA, else the keras download")
    parser.add_argument("--out", required=True, help="destination directory or URI (must not exist)")
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    args = parser.parse_args(argv)
    try:
        manifest = shards.write_parquet(shards.load(shards.resolve_source(args.data)), args.out, args.rows_per_file)
    except shards.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = {split: info.rows for split, info in manifest.splits.items()}
    print(f"wrote {args.out}: {rows}, sha256 {manifest.content_sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
