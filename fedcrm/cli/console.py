"""What every ``fedcrm`` command shares: the two consoles and the user-error boundary.

User errors (every :class:`~fedcrm.privacy.errors.FedcrmError`) become one red line on stderr
and a non-zero exit code, never a traceback; unexpected errors print only their type (their text
could quote data) unless ``FEDCRM_DEBUG=1`` is set.

Both consoles have rich markup off: paths, column names and firm names often hold ``[...]``
(``export[2024].csv``), which markup would swallow or choke on (``[/x]``). Styling is given
explicitly (``style=``, :class:`rich.text.Text`), never by markup in a string. Rich writes colour
codes only to a terminal, so piped output and log files stay plain text.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from fedcrm.privacy.errors import FedcrmError

out = Console(markup=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

#: Exit code of a file-system refusal (sysexits' EX_IOERR); 70 stays "internal error".
IO_ERROR_EXIT = 74


def file_system_problem(exc: OSError) -> str:
    """One line for an OSError: which path, what the system said, what to check."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or type(exc).__name__
    return (
        f"cannot use {paths or 'a file'}: {reason}; check that the path exists, is a file or "
        "folder as the command expects, is writable and has room (an immutable file: lsattr)"
    )


def finite_positive(value: float | None) -> float | None:
    """A typer callback for a float option that must be finite and > 0 (click's ranges let nan
    through: every comparison with nan is false)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a finite number above 0")
    return value


def finite_non_negative(value: float | None) -> float | None:
    """Like :func:`finite_positive`, 0 allowed."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"{value} is not a finite number of at least 0")
    return value

def plain(console: Console, text: str, *, style: str = "") -> None:
    """Print a line that holds user text (paths, firm names, run ids): never read as markup,
    so ``[link]`` or ``[bold]`` in a name prints as written."""
    console.print(Text(text, style=style), highlight=False, soft_wrap=True)


def user_errors(fn: F) -> F:
    """Turn FedcrmError into one line + exit code; hide other exceptions' text (may hold PII)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FedcrmError as exc:
            # User text (paths, column and firm names) is never read as markup.
            err.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False,
                      soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted", style="yellow")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except OSError as exc:
            if exc.errno is None and exc.filename is None:  # an OSError subclass, not the OS
                _internal_error(exc)
            # The system refused a file operation (a folder where a file belongs, a full disk, an
            # immutable or read-only file): name the path and the reason, never any contents.
            err.print(Text.assemble(("error: ", "bold red"), file_system_problem(exc)),
                      soft_wrap=True)
            raise typer.Exit(IO_ERROR_EXIT) from None
        except Exception as exc:
            _internal_error(exc)

    return wrapper  # type: ignore[return-value]


def _internal_error(exc: Exception) -> NoReturn:
    if os.environ.get("FEDCRM_DEBUG") == "1":
        raise exc
    err.print(Text.assemble(
        ("internal error: ", "bold red"),
        f"{type(exc).__name__} (details hidden because they may contain data; rerun with "
        "FEDCRM_DEBUG=1 on the firm's machine for a traceback)",
    ), soft_wrap=True)
    raise typer.Exit(70) from None
