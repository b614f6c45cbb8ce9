"""How every `node-runtime` subcommand ends on an error (docs/runtime-contract.md, "Exit codes").

Exit 2: bad usage — click's own for options and arguments, `fail(..., 2)` for input read from
elsewhere (a spec in the environment). Exit 1: a failed check or operation, as one line that
says what to do. A traceback only with NODE_RUNTIME_DEBUG=1, for whoever debugs the runtime.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

import typer

DEBUG_ENV = "NODE_RUNTIME_DEBUG"
USAGE = 2
FAILED = 1

Command = TypeVar("Command", bound=Callable)


class Failure(Exception):
    """A failed check or operation; the message says what happened and what to do."""


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV) == "1"


def fail(message: str, code: int) -> typer.Exit:
    """Print `error: MESSAGE` on stderr; the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def exits_cleanly(*failures: type[Exception], on_interrupt: str | None = None) -> Callable[[Command], Command]:
    """Decorate a command: `Failure` and the given exception types end it with one line and exit 1.

    With `on_interrupt`, Ctrl-C ends it the same way with that line (commands that move data
    say they resume); without, KeyboardInterrupt is left to Python.
    """
    known = (Failure, *failures)
    interrupted = KeyboardInterrupt if on_interrupt else ()

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def run(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except known as failed:
                if debugging():
                    raise
                raise fail(str(failed), FAILED) from None
            except interrupted:
                if debugging():
                    raise
                raise fail(on_interrupt, FAILED) from None

        return run  # type: ignore[return-value]

    return decorate
