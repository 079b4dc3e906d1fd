"""What every record file shares: a schema field written first, the fields a dataclass names, and
keys another tool added (`extra`) kept as they were. Files written before the schema field existed
load too (their schema is None)."""

from __future__ import annotations

import dataclasses


def fields_of(record) -> dict:
    """A record's fields, but its `extra`, in field order."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != "extra"}


def dump(record, schema: str, values: dict) -> dict:
    """The JSON document of `record`: its schema, `values` (its fields, as it chooses to write them),
    then its extra keys."""
    return {"schema": schema, **values, **record.extra}


def load(cls, value: dict, schemas: tuple, what: str):
    """A `cls` from a JSON document of one of `schemas`; a ValueError naming `what` for any other."""
    if value.get("schema") not in schemas:
        raise ValueError(f"{what} of schema {value.get('schema')!r}, which this code does not know "
                         f"(it reads {', '.join(s for s in schemas if s)})")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return cls(**{k: v for k, v in value.items() if k in names},
               extra={k: v for k, v in value.items() if k not in names and k != "schema"})
