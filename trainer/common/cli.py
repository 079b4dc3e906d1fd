"""What every command's command line shares: flags declared as the fields of a frozen dataclass
(`option`, `add_options`, `options_from`: each default defined once, on its field), a script's
parser, the one-line error, and the line that owns up to a bug."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback

from trainer.common import errors, quiet


def parse_workers(text: str) -> int | tuple[int, int]:
    """A count, or a range: '4' is 4; '2-4' is (2, 4) (a ValueError if neither)."""
    low, dash, high = str(text).strip().partition("-")
    if not dash:
        return int(low)
    return int(low), int(high)


parse_workers.__name__ = "N or MIN-MAX"  # what argparse's "invalid ... value" message calls it
# Each annotation an option's field may have: (the type a flag's text parses to, whether None is allowed).
# The CLI and Config's validation both read it; a Config field with any other annotation fails at import.
FIELD_TYPES = {"int": (int, False), "float": (float, False), "bool": (bool, False), "str": (str, False),
               "int | None": (int, True), "float | None": (float, True), "str | None": (str, True),
               "int | tuple[int, int]": (parse_workers, False), "tuple[str, ...]": (str, False)}
INSTANCE_OF = {float: (int, float), parse_workers: (int, tuple)}  # what a parsed value may be, where not its parser


def option(default=None, help: str = "", **settings) -> dataclasses.Field:
    """A dataclass field that declares a command-line option: its default, its help, and whatever
    else argparse needs that the field's name and annotation do not say: choices, metavar, nargs,
    const, positional=True, group (a title), exclusive (a name: fields sharing it exclude each
    other; exclusive_required=True on one of them: one is required), hidden=True."""
    return dataclasses.field(default=default, metadata={"help": help, **settings})


def add_options(parser: argparse.ArgumentParser, cls, title: str | None = None) -> argparse.ArgumentParser:
    """One flag (or positional) per field of the dataclass `cls`, in field order: --field-name, its
    type from the annotation (FIELD_TYPES), a bool a switch. A help that states its own default gets
    none added. Returns `parser`."""
    target = parser.add_argument_group(title) if title else parser
    groups, exclusive = {}, {}
    for f in dataclasses.fields(cls):
        meta, annotation = f.metadata, _annotation(f.type)
        help_text = meta.get("help", "").replace("%", "%%")  # argparse formats help with %
        if "(default" in help_text:
            help_text += "%(default).0s"  # says its own default; stops argparse adding "(default: None)"
        kwargs = {"help": argparse.SUPPRESS if meta.get("hidden") else help_text}
        if annotation == "bool":
            kwargs.update(action="store_true", default=f.default)
        else:
            kwargs.update(type=meta.get("type", FIELD_TYPES[annotation][0]), choices=meta.get("choices"),
                          metavar=meta.get("metavar", None if meta.get("positional") else f.name.upper()))
            kwargs.update({k: meta[k] for k in ("nargs", "const") if k in meta})
            if not meta.get("positional"):
                kwargs["default"] = f.default
        into = target
        if "group" in meta:
            into = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        if "exclusive" in meta:
            name = meta["exclusive"]
            if name not in exclusive:
                exclusive[name] = into.add_mutually_exclusive_group()
            exclusive[name].required |= bool(meta.get("exclusive_required"))
            into = exclusive[name]
        if meta.get("positional"):
            into.add_argument(f.name, **kwargs)
        else:
            into.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    return parser


def _annotation(annotation) -> str:
    """A field's annotation as FIELD_TYPES names it, whether or not its module postpones annotations."""
    if isinstance(annotation, str):
        return annotation
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def options_from(cls, args: argparse.Namespace):
    """The dataclass `cls` from parsed arguments (add_options' flags)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


class _ScriptHelp(argparse.RawDescriptionHelpFormatter):
    """The docstring as written; a flag's default after its help, unless the help already says it
    or there is none to say."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def script_parser(doc: str) -> argparse.ArgumentParser:
    """The parser every script in scripts/ starts from: its docstring as --help's description, as
    written, and each flag's default shown."""
    return argparse.ArgumentParser(description=doc.strip(), formatter_class=_ScriptHelp)


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def bug(exc: BaseException) -> int:
    """An exception that is not a JobError reached a command's top: a bug, not the user's input. Its
    traceback goes to this process's log file; the console gets one line saying so and where. Exit 1."""
    log = quiet.log_file()
    try:
        with open(log, "a") as f:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
    except OSError:  # nowhere to write it: the console gets the traceback after all
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        log = "the lines above"
    return fail(f"a bug, not your input: {errors.first_line(exc, named=True)} (the traceback is in {log}; "
                "please report it)", code=1)


def run_command(body, interrupted: str, describe_os_error=None) -> int:
    """`body()`'s exit code (0 if it returns anything else); a JobError becomes its one line and exit code, Ctrl-C (or SIGTERM, with
    errors.interrupt) `interrupted` and 130, an OSError that no check named one line (through
    `describe_os_error`, if given), and anything else `bug`."""
    try:
        code = body()
        return code if isinstance(code, int) else 0
    except errors.JobError as exc:
        return fail(str(exc), code=exc.exit_code)
    except KeyboardInterrupt:
        return fail(interrupted, code=130)
    except OSError as exc:
        if describe_os_error is None:
            return bug(exc)
        return fail(describe_os_error(exc), code=1)
    except Exception as exc:
        return bug(exc)
