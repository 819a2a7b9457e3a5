"""Generate the minimal Flower app directory that ``flwr run`` bundles and submits.

``flwr new`` needs the internet, and fedcrm's ServerApp/ClientApp already live in installed
packages, so the app directory is just a ``pyproject.toml``: ``[project]`` metadata and
``[tool.flwr.app]`` naming the components as ``module:attribute`` references. Flower imports
those references in the ``flwr-serverapp`` / ``flwr-clientapp`` processes with the installed
app directory first on ``sys.path``, so a module importable from the environment (the
editable fedcrm install, or ``PYTHONPATH``) needs no copy in the bundle.

The directory carries no secrets: no key, no key path, no data path. Those are per-firm and
reach the ClientApp only through each SuperNode's ``--node-config``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import tomli_w

from fedcrm.coordinator.flower_cli import FlowerConfigValue
from fedcrm.coordinator.processes import DeploymentError

_APP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,49}$")
_OBJECT_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_CONFIG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# Keys whose presence in a run config suggests a secret or a firm-local path leaked in.
_SECRET_HINTS = ("key", "secret", "password", "token", "private")
FLWR_REQUIREMENT = "flwr>=1.41.0"


def _check_run_config(config: Mapping[str, FlowerConfigValue]) -> None:
    for key, value in config.items():
        if not _CONFIG_KEY.match(key):
            raise DeploymentError(f"run config key {key!r} must be letters, digits, '_' or '-'")
        if any(hint in key.lower() for hint in _SECRET_HINTS):
            raise DeploymentError(
                f"run config key {key!r} looks like a secret; the app bundle goes to every party. "
                "Pass keys and firm-local paths through each SuperNode's node config instead"
            )
        if not isinstance(value, bool | int | float | str):
            raise DeploymentError(
                f"run config {key!r} has type {type(value).__name__}; use str, int, float or bool"
            )


def write_app_dir(
    dest: Path,
    *,
    serverapp: str,
    clientapp: str,
    publisher: str = "fedcrm",
    name: str = "fedcrm-federation",
    version: str = "1.0.0",
    run_config_defaults: Mapping[str, FlowerConfigValue] | None = None,
) -> Path:
    """Write ``dest/pyproject.toml`` for a Flower app and return ``dest``.

    ``serverapp``/``clientapp`` are ``package.module:attribute`` references importable by the
    Flower processes (e.g. ``"fedcrm.server.server_app:app"``). ``run_config_defaults`` declares
    every run-config key (Flower rejects overrides of undeclared keys). ``dest``'s own name must
    be a valid Flower app name too (letters, digits, hyphens), since ``flwr run`` checks it.
    """
    dest = Path(dest)
    for label, value in (("app name", name), ("app directory name", dest.name)):
        if not _APP_NAME.match(value):
            raise DeploymentError(
                f"Flower {label} {value!r} must start with a letter and use only letters, digits "
                "and '-' (at most 50 characters)"
            )
    for label, ref in (("serverapp", serverapp), ("clientapp", clientapp)):
        if not _OBJECT_REF.match(ref):
            raise DeploymentError(f"{label} reference {ref!r} must look like 'package.module:app'")
    config = dict(run_config_defaults or {})
    _check_run_config(config)
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": name,
            "version": version,
            "description": "fedcrm federated CRM analytics (generated; edit fedcrm's config)",
            "license": "Apache-2.0",
            "dependencies": [FLWR_REQUIREMENT],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": publisher,
                    "components": {"serverapp": serverapp, "clientapp": clientapp},
                    "config": config,
                }
            }
        },
    }
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return dest
