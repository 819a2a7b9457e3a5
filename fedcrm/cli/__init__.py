"""The ``fedcrm`` command line: one thin adapter per role over the packages below it.

* :mod:`fedcrm.cli.firm` - partner firm: ``keys``, ``scan``, ``prepare``, ``budget``, ``train``,
  ``score``;
* :mod:`fedcrm.cli.node` - partner firm in a deployment: ``node start``;
* :mod:`fedcrm.cli.coordinator` - coordinator: ``certs``, ``link``, ``run``, ``runs``;
* :mod:`fedcrm.cli.analytics` - coordinator / analyst: ``query``;
* :mod:`fedcrm.cli.simulations` - coordinator demos: ``datasets``, ``simulate``, ``deploy local``;
* :mod:`fedcrm.cli.audit` - auditor (read-only): ``audit verify``, ``report``, ``export``.

Commands decode arguments, call the core and render results; heavy imports (torch, Flower,
pandas) happen inside the commands so ``fedcrm --help`` stays fast. The CLI is the top layer of
the import-linter contract: it may call every package, none calls it.
"""

from __future__ import annotations

import typer

from fedcrm.cli import analytics, audit, coordinator, firm, node, simulations

app = typer.Typer(
    help="fedcrm: privacy-preserving federated analytics for customer data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for _role in (firm, node, coordinator, analytics, simulations, audit):
    _role.register(app)


def main() -> None:  # pragma: no cover - console entry point
    app()
