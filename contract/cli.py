"""Command-line rules shared by every entry point.

Each option is written once, as an `Option`: its flag, its `SENTIMENT_*` variable, its type,
default and help, and its row in the README's table all derive from it. Errors a user can
cause end in one clear line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from importlib import metadata
from typing import Any, get_args, get_type_hints

from contract.logs import error_line

ENV_PREFIX = "SENTIMENT_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
DISTRIBUTION = "review-sentiment-stream"


class UserError(Exception):
    """An error the user can fix; its message is the one line they see."""


@dataclass(frozen=True)
class Option:
    """One option, defined once. `type` defaults to the type of `default` (str without one);
    a bool option is a switch. Choices match case-insensitively and come back as written here."""

    name: str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()
    required: bool = False
    type: type | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def kind(self) -> type:
        return self.type or (type(self.default) if self.default is not None else str)

    def convert(self, text: str) -> Any:
        """The value of `text` for this option; ValueError says why it is not one."""
        if self.kind is bool:
            word = text.strip().lower()
            if word not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError(f"expected one of {', '.join(w for w in TRUE_WORDS + FALSE_WORDS if w)}")
            return word in TRUE_WORDS
        if self.choices:
            for choice in self.choices:
                if text.strip().lower() == choice.lower():
                    return choice
            raise ValueError(f"expected one of {', '.join(self.choices)}")
        try:
            return self.kind(text)
        except ValueError:
            raise ValueError(f"expected {'a number' if self.kind is float else 'an integer'}") from None

    def field(self) -> Any:
        """A dataclass field whose default is this option's (and which carries the option)."""
        default = MISSING if self.required else self.default
        return field(default=default, metadata={"option": self})

    def shown_default(self) -> str:
        if self.kind is bool:
            return "off"
        return "" if self.default is None else str(self.default)


def option(default: Any = None, help: str = "", choices: Sequence[str] = (), required: bool = False) -> Any:
    """A dataclass field defining an option named after the field (see `options_of`)."""
    return Option("", default, help, tuple(choices), required).field()


def options_of(config_class: type) -> tuple[Option, ...]:
    """The options a dataclass defines with `option()` or `Option.field()`, named and typed after its fields
    (`int | None`: an int option whose default, None, is decided later)."""
    hints = get_type_hints(config_class)
    return tuple(replace(f.metadata["option"], name=f.name, type=_not_none(hints[f.name]))
                 for f in fields(config_class) if "option" in f.metadata)


def _not_none(hint: Any) -> Any:
    kinds = [kind for kind in get_args(hint) if kind is not type(None)]
    return kinds[0] if len(kinds) == 1 else hint


class Parser(argparse.ArgumentParser):
    """An argparse parser built from `Option`s; `SENTIMENT_<FLAG>` sets an option's default, a flag wins."""

    def __init__(self, *args: Any, env: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.environ = os.environ if env is None else env

    def add_version(self, program: str) -> None:
        self.add_argument("--version", action=_PrintVersion, nargs=0, default=argparse.SUPPRESS, dest=program,
                          help="print the package, torch, transformers and Kafka client versions, then exit")

    def add_options(self, options: Iterable[Option]) -> None:
        for opt in options:
            default, required = opt.default, opt.required
            if opt.env in self.environ:
                try:
                    default, required = opt.convert(self.environ[opt.env]), False
                except ValueError as err:
                    raise UserError(f"{opt.env}={self.environ[opt.env]!r}: {err}") from None
            shown = opt.shown_default()
            note = f"[env {opt.env}" + (f"; default {shown}" if shown and not opt.required else "") + "]"
            text = f"{opt.help} {note}".strip()
            if opt.kind is bool:
                self.add_argument(opt.flag, dest=opt.name, action="store_true", default=default, help=text)
                continue
            self.add_argument(opt.flag, dest=opt.name, type=_argparse_type(opt), default=default,
                              required=required, help=text, metavar=_metavar(opt))


def _metavar(opt: Option) -> str:
    if opt.choices:
        return "|".join(opt.choices)
    if opt.kind in (int, float):
        return next((unit for unit in ("MS", "BYTES") if opt.name.upper().endswith("_" + unit)), "N")
    return opt.name.split("_")[-1].upper()


class _PrintVersion(argparse.Action):
    """--version on one line (argparse's own action wraps it)."""

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any) -> None:
        print(version_text(self.dest))
        parser.exit()


def _argparse_type(opt: Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return opt.convert(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None

    convert.__name__ = opt.name  # argparse names the type in some messages
    return convert


def options_table(options: Iterable[Option]) -> str:
    """The README's Markdown table of `options` (tests keep the README equal to it)."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for opt in options:
        meaning = opt.help + (f" ({' | '.join(opt.choices)})" if opt.choices else "")
        default = "required" if opt.required else f"`{opt.shown_default()}`" if opt.shown_default() else ""
        escaped = meaning.replace("|", "\\|")
        rows.append(f"| `{opt.flag}` | `{opt.env}` | {default} | {escaped} |")
    return "\n".join(rows)


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_text(program: str) -> str:
    """`--version`: what an operator pastes into a bug report (read from package metadata, no imports)."""
    parts = [f"{name} {_installed(name)}" for name in ("torch", "transformers", "kafka-python", "confluent-kafka")]
    return f"{program} {_installed(DISTRIBUTION)} (Python {platform.python_version()}; {'; '.join(parts)})"


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run an entry point: UserError becomes one line (`error: ...`, see contract.logs) and exit 2;
    Ctrl-C exits 130."""
    try:
        code = main(argv)
    except UserError as err:
        print(error_line(str(err)), file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


# Options both `python -m models` and `python -m worker` take (models/encoder.py resolves them).
DEVICE = Option("device", "auto", "auto | cpu | cuda[:N]")
DTYPE = Option("dtype", "auto", "auto: fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise",
               ("auto", "fp32", "bf16", "fp16"))
QUANTIZE = Option("quantize", "none", "int8: dynamic quantization of the linear layers (CPU)", ("none", "int8"))
