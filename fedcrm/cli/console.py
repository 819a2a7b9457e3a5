"""What every ``fedcrm`` command shares: the two consoles and the user-error boundary.

User errors (every :class:`~fedcrm.privacy.errors.FedcrmError`) become one red line on stderr
and a non-zero exit code, never a traceback; unexpected errors print only their type (their text
could quote data) unless ``FEDCRM_DEBUG=1`` is set.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from fedcrm.privacy.errors import FedcrmError

out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


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
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if os.environ.get("FEDCRM_DEBUG") == "1":
                raise
            err.print(
                f"[bold red]internal error:[/] {type(exc).__name__} (details hidden because they "
                "may contain data; rerun with FEDCRM_DEBUG=1 on the firm's machine for a traceback)"
            )
            raise typer.Exit(70) from None

    return wrapper  # type: ignore[return-value]
