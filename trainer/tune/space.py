"""The search space: what a search may change of the job's recipe, from the defaults below, a small
YAML file (--space) and the command line, in that order; refused in one line when it cannot be
searched. Pure: Ray Tune's distributions are made only in `param_space`.

    learning_rate: [0.0001, 0.01]   # log-uniform between the two
    batch_size: [64, 128, 256, 512] # the global batch, one of these
    hidden_units: [128, 256, 512, 1024]
    dropout: [0.0, 0.5]             # uniform between the two
    model: [mlp]                    # mlp, cnn or both
    epochs: 5                       # every trial's budget; ASHA may stop one sooner

The defaults, and why: the tutorial's recipe (RMSprop at 0.001, batch 128, Dense(512), no dropout,
5 epochs) sits inside each range, a decade of learning rate either side of it, half and double its
batch and width around it. The model is the tutorial's MLP: a CNN epoch costs about 10x an MLP's on
a CPU (docs/performance.md), so a search over both is asked for (`--models mlp,cnn`); hidden_units
and dropout shape the MLP only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from trainer.common.errors import UsageError
from trainer.config import MODELS


@dataclass(frozen=True)
class Space:
    learning_rate: tuple[float, float] = (1e-4, 1e-2)
    batch_size: tuple[int, ...] = (64, 128, 256, 512)
    hidden_units: tuple[int, ...] = (128, 256, 512, 1024)
    dropout: tuple[float, float] = (0.0, 0.5)
    model: tuple[str, ...] = ("mlp",)
    epochs: int = 5

    def __post_init__(self):
        low, high = self.learning_rate
        if not 0 < low < high:
            raise UsageError(f"learning_rate range {low:g}:{high:g} must be positive and increasing (LOW:HIGH)")
        low, high = self.dropout
        if not 0 <= low <= high < 1:
            raise UsageError(f"dropout range {low:g}:{high:g} must lie in 0..1 and not decrease (LOW:HIGH)")
        for name in ("batch_size", "hidden_units", "model"):
            if not getattr(self, name):
                raise UsageError(f"{name}: the choices are empty; give at least one")
        for name in ("batch_size", "hidden_units"):
            if any(type(v) is not int or v < 1 for v in getattr(self, name)):
                raise UsageError(f"{name} choices must be positive whole numbers, got {list(getattr(self, name))}")
        unknown = [m for m in self.model if m not in MODELS]
        if unknown:
            raise UsageError(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
        if type(self.epochs) is not int or self.epochs < 1:
            raise UsageError(f"epochs (the budget) must be a whole number of at least 1, got {self.epochs!r}")

    def param_space(self) -> dict:
        """Ray Tune's param_space: each choice a distribution, a single value as itself."""
        from ray import tune

        def choice(values: tuple):
            return values[0] if len(values) == 1 else tune.choice(list(values))

        def between(low: float, high: float, sample):
            return low if low == high else sample(low, high)

        return {"learning_rate": tune.loguniform(*self.learning_rate),
                "batch_size": choice(self.batch_size), "hidden_units": choice(self.hidden_units),
                "dropout": between(*self.dropout, tune.uniform), "model": choice(self.model)}

    def to_json(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}


def describe(config: dict) -> str:
    """A trial's config in short: `mlp 512 drop 0.12 lr 1.2e-03 batch 128`."""
    shape = (f"mlp {config['hidden_units']}" + (f" drop {config['dropout']:.2f}" if config.get("dropout") else "")
             if config["model"] == "mlp" else config["model"])
    return f"{shape} lr {config['learning_rate']:.1e} batch {config['batch_size']}"


def parse_range(text: str, what: str) -> tuple[float, float]:
    """'LOW:HIGH' (or one number: a fixed value) -> (low, high)."""
    parts = str(text).split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"{what} {text!r}: expected LOW:HIGH, two numbers") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{what} {text!r}: expected LOW:HIGH, two numbers")
    return values[0], values[1]


def parse_choices(text, what: str, kind=int) -> tuple:
    """'64,128,256' (or a YAML list) -> (64, 128, 256)."""
    items = [p.strip() for p in str(text).split(",")] if isinstance(text, str) else list(text)
    try:
        return tuple(_int(v) if kind is int else str(v) for v in items if v != "")
    except (TypeError, ValueError):
        raise UsageError(f"{what} {text!r}: expected a comma-separated list of {kind.__name__} values") from None


def _int(value) -> int:
    """A whole number from '128', 128 or 128.0; ValueError for 128.5 or 'x'."""
    number = float(value)
    if number != int(number):
        raise ValueError(value)
    return int(number)


PARSERS = {"learning_rate": lambda v: _range(v, "learning_rate"), "dropout": lambda v: _range(v, "dropout"),
           "batch_size": lambda v: parse_choices(v, "batch_size"),
           "hidden_units": lambda v: parse_choices(v, "hidden_units"),
           "model": lambda v: parse_choices(v, "model", str), "epochs": lambda v: _whole(v, "epochs")}


def _range(value, what: str) -> tuple[float, float]:
    if isinstance(value, (list, tuple)):
        return parse_range(":".join(str(v) for v in value), what)
    return parse_range(value, what)


def _whole(value, what: str) -> int:
    try:
        return _int(value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{what} {value!r}: expected a whole number") from None


def read_yaml(path: str) -> dict:
    """The space file's settings, parsed: a mapping of Space's fields. One line for a file that is
    missing, does not parse, or names what a space does not have."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError as exc:
        raise UsageError(f"--space {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UsageError(f"--space {path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--space {path}: expected a mapping of settings such as 'learning_rate: [0.0001, 0.01]', "
                         f"got a {type(values).__name__}")
    unknown = sorted(set(values) - set(PARSERS))
    if unknown:
        raise UsageError(f"--space {path}: unknown setting {unknown[0]!r}; a space has {', '.join(PARSERS)}")
    return {name: PARSERS[name](value) for name, value in values.items()}


def build(path: str | None = None, **overrides) -> Space:
    """The space from the defaults, then the YAML file at `path`, then `overrides` (the command line's
    texts, None where not given)."""
    values = read_yaml(path) if path else {}
    values.update({name: PARSERS[name](text) for name, text in overrides.items() if text is not None})
    return Space(**values)
