"""The Flower app bundle of a run, and the one check a firm makes before it answers a run.

``flwr new`` needs the internet, and fedcrm's ServerApp/ClientApp live in the installed package,
so the app directory is just a ``pyproject.toml``: ``[project]`` metadata and ``[tool.flwr.app]``
naming the components as ``module:attribute`` references, plus the run config. The directory
carries no code and no secrets: no key, no key path, no data path (those are per firm and reach
the ClientApp only through each SuperNode's ``--node-config``).

**The release a run declares.** Every bundle declares the fedcrm release it was made for in its
run config: ``fedcrm-version`` and ``fedcrm-app-hash`` (:func:`installed_release`: sha256 over
the installed package's source files). A firm's node never runs code from a bundle: its own
long-lived ClientApp process (:mod:`fedcrm.clients.runtime`) answers only runs whose bundle is
exactly what :func:`write_app_dir` writes for the release the firm installed
(:func:`bundle_refusal`): only ``pyproject.toml``, the firm's own ClientApp reference, the same
version and app hash. Anything else is refused with one line naming the difference.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import tomli_w

import fedcrm
from fedcrm.coordinator.flower_cli import FlowerConfigValue
from fedcrm.coordinator.processes import DeploymentError

_APP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,49}$")
_OBJECT_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_CONFIG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# Keys whose presence in a run config suggests a secret or a firm-local path leaked in.
_SECRET_HINTS = ("key", "secret", "password", "token", "private")
FLWR_REQUIREMENT = "flwr==1.41.0"

FEDCRM_SERVERAPP = "fedcrm.server.server_app:app"
FEDCRM_CLIENTAPP = "fedcrm.clients.client_app:app"
VERSION_KEY = "fedcrm-version"
APP_HASH_KEY = "fedcrm-app-hash"
PYPROJECT = "pyproject.toml"
#: What a FAB built from a bundle holds: the bundle's one file and Flower's own manifest.
BUNDLE_FILES = frozenset({PYPROJECT, ".info/CONTENT"})


@dataclass(frozen=True)
class AppRelease:
    """A fedcrm release: its version and the sha256 of its installed source files."""

    version: str
    app_hash: str

    def __str__(self) -> str:
        return f"fedcrm {self.version} (app {self.app_hash[:12]})"


@functools.cache
def installed_release() -> AppRelease:
    """The fedcrm release this interpreter imports: version and app hash.

    The hash covers every ``.py`` file of the installed ``fedcrm`` package (relative path and
    bytes, in path order; the role folders are followed where they are symlinks), so two hosts
    with the same release installed agree, and any edited module changes it.
    """
    root = Path(fedcrm.__file__).resolve().parent
    digest = hashlib.sha256()
    files: list[tuple[str, Path]] = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in names:
            if name.endswith(".py"):
                path = Path(folder) / name
                files.append((path.relative_to(root).as_posix(), path))
    for rel, path in sorted(files):
        digest.update(rel.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return AppRelease(version=fedcrm.__version__, app_hash=digest.hexdigest())


@dataclass(frozen=True)
class AppSpec:
    """Which ServerApp / ClientApp a run uses (``module:attribute`` references)."""

    serverapp: str = FEDCRM_SERVERAPP
    clientapp: str = FEDCRM_CLIENTAPP
    name: str = "fedcrm-federation"


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
    app: AppSpec | None = None,
    run_config_defaults: Mapping[str, FlowerConfigValue] | None = None,
    release: AppRelease | None = None,
    publisher: str = "fedcrm",
) -> Path:
    """Write ``dest/pyproject.toml`` for a Flower app and return ``dest``.

    ``run_config_defaults`` declares every run-config key (Flower rejects overrides of
    undeclared keys); the release (default: the installed one) is added as ``fedcrm-version`` and
    ``fedcrm-app-hash``. ``dest``'s own name must be a valid Flower app name too (letters,
    digits, hyphens), since ``flwr run`` checks it.
    """
    app = app or AppSpec()
    release = release or installed_release()
    dest = Path(dest)
    for label, value in (("app name", app.name), ("app directory name", dest.name)):
        if not _APP_NAME.match(value):
            raise DeploymentError(
                f"Flower {label} {value!r} must start with a letter and use only letters, digits "
                "and '-' (at most 50 characters)"
            )
    for label, ref in (("serverapp", app.serverapp), ("clientapp", app.clientapp)):
        if not _OBJECT_REF.match(ref):
            raise DeploymentError(f"{label} reference {ref!r} must look like 'package.module:app'")
    config = dict(run_config_defaults or {})
    _check_run_config(config)
    config[VERSION_KEY] = release.version
    config[APP_HASH_KEY] = release.app_hash
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": app.name,
            "version": "1.0.0",
            "description": "fedcrm federated CRM analytics (generated; edit fedcrm's config)",
            "license": "Apache-2.0",
            "dependencies": [FLWR_REQUIREMENT, f"fedcrm=={release.version}"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": publisher,
                    "components": {"serverapp": app.serverapp, "clientapp": app.clientapp},
                    "config": config,
                }
            }
        },
    }
    dest.mkdir(parents=True, exist_ok=True)
    (dest / PYPROJECT).write_text(tomli_w.dumps(pyproject))
    return dest


class Refusal(StrEnum):
    """Why a firm's node does not answer a run."""

    NOT_THE_APP = "not_the_app"  # ships code, or names another ClientApp: not a fedcrm bundle
    OTHER_RELEASE = "other_release"  # a fedcrm bundle for another version or app hash


@dataclass(frozen=True)
class BundleRefusal:
    kind: Refusal
    detail: str


def bundle_refusal(
    *,
    files: Collection[str],
    pyproject: Mapping[str, Any],
    run_config: Mapping[str, Any],
    clientapp: str,
    release: AppRelease,
) -> BundleRefusal | None:
    """Why this firm refuses a run's bundle, or None when it is the approved app.

    ``files``: the names in the run's FAB; ``pyproject``: its parsed ``pyproject.toml``;
    ``run_config``: the run's config as the ClientApp would see it (bundle defaults fused with
    any override); ``clientapp``: the reference this firm runs; ``release``: the firm's installed
    fedcrm release. The firm never imports anything from the bundle either way.
    """
    extra = sorted(name for name in files if name not in BUNDLE_FILES and not name.endswith("/"))
    if extra:
        shown = ", ".join(extra[:3]) + (" ..." if len(extra) > 3 else "")
        return BundleRefusal(
            Refusal.NOT_THE_APP,
            f"the run's app bundle ships files ({shown}); this firm runs only the ClientApp of its "
            f"installed {release}, never code from a bundle",
        )
    components = pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    named = components.get("clientapp") if isinstance(components, dict) else None
    if named != clientapp:
        return BundleRefusal(
            Refusal.NOT_THE_APP,
            f"the run names ClientApp {str(named)[:80]!r}; this firm runs only {clientapp} of its "
            f"installed {release}",
        )
    version, app_hash = run_config.get(VERSION_KEY), run_config.get(APP_HASH_KEY)
    if version != release.version or app_hash != release.app_hash:
        declared = f"fedcrm {str(version)[:20]} (app {str(app_hash)[:12]})"
        return BundleRefusal(
            Refusal.OTHER_RELEASE,
            f"the run was made for {declared}; this firm runs {release}. Install the same fedcrm "
            "release as the coordinator to take part",
        )
    return None
