"""Command-line rules shared by every entry point.

Every flag `--some-flag` can also come from `SENTIMENT_SOME_FLAG`, and errors a user can
cause end in one clear line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

ENV_PREFIX = "SENTIMENT_"
TRUE_WORDS = {"1", "true", "yes", "on"}


class UserError(Exception):
    """An error the user can fix; its message is the one line they see."""


def env_name(option: str) -> str:
    return ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()


def apply_env_defaults(parser: argparse.ArgumentParser) -> None:
    """Let SENTIMENT_<FLAG> set each long option's default (argparse applies `type` to it)."""
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest == "help":
            continue
        value = os.environ.get(env_name(longs[0]))
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            action.default = value.strip().lower() in TRUE_WORDS
        else:
            if action.choices is not None and value not in action.choices:
                parser.error(f"{env_name(longs[0])}={value!r} is not one of {', '.join(action.choices)}")
            action.default = value
            action.required = False


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run an entry point: UserError becomes `error: ...` and exit 2; Ctrl-C exits 130."""
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
