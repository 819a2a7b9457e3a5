"""The coordinator's deployment configs: ``coordinator.toml`` and ``RUN.toml``.

Both are parsed once, at the edge, into frozen models; relative paths are resolved against the
file's own folder. Neither holds a secret: ``coordinator.toml`` names the directory with the
SuperLink's certificate and key files (made by ``fedcrm certs``), ``RUN.toml`` holds only the
run parameters that travel to every party.

``coordinator.toml``::

    [link]
    workdir      = "/srv/fedcrm/link"   # SuperLink home and log, CLI home, runs/<run-id>/
    certs_dir    = "/srv/fedcrm/certs"  # ca.crt, server.crt, server.key (never ca.key)
    database     = "state.db"           # optional; default <workdir>/state.db
    host         = "0.0.0.0"            # interface the firms dial (default 127.0.0.1)
    port         = 9093                 # the Fleet gateway: the one port firms may reach
    control_port = 9094                 # the SuperLink itself, on 127.0.0.1 only

``RUN.toml`` has one ``[run]`` section, the :class:`fedcrm.run_config.RunConfig`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedcrm.config_file import load_toml
from fedcrm.coordinator.run_config import RunConfig

CA_CERT = "ca.crt"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class LinkSection(BaseModel):
    """Where the coordinator's SuperLink keeps its state and which address it binds."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    workdir: Path
    certs_dir: Path
    database: Path | None = None
    host: str = Field(default="127.0.0.1", description="interface the firms dial")
    port: int = Field(default=9093, ge=1, le=65535, description="the Fleet gateway's port")
    control_port: int = Field(
        default=9094, ge=1, le=65535,
        description="the SuperLink's own port, bound to 127.0.0.1: Control and Runtime APIs",
    )

    @model_validator(mode="after")
    def _two_ports(self) -> LinkSection:
        if self.port == self.control_port:
            raise ValueError("port (the firms' Fleet gateway) and control_port must differ")
        return self


class CoordinatorConfig(BaseModel):
    """``coordinator.toml``: the SuperLink of a long-lived federation."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    link: LinkSection
    config_path: Path | None = Field(default=None, exclude=True)

    @property
    def workdir(self) -> Path:
        return self.link.workdir

    @property
    def ca_cert(self) -> Path:
        return self.link.certs_dir / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.link.certs_dir / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.link.certs_dir / SERVER_KEY

    @property
    def database(self) -> Path:
        return self.link.database or self.link.workdir / "state.db"

    @property
    def superlink_dir(self) -> Path:
        """The SuperLink's own directory: its ``FLWR_HOME``, log and working directory."""
        return self.link.workdir / "superlink"

    @property
    def cli_home(self) -> Path:
        """``FLWR_HOME`` of the coordinator's ``flwr`` CLI (register, run, log)."""
        return self.link.workdir / "cli"

    @property
    def signing_key(self) -> Path:
        """The coordinator's Ed25519 key that signs federation logs (created 0600 on start)."""
        return self.link.workdir / "coordinator" / "signing.key"

    @property
    def runs_dir(self) -> Path:
        """Where the ServerApp writes ``<run-id>/summary.json``, the model and events."""
        return self.link.workdir / "runs"

    @property
    def control_address(self) -> str:
        """Where the coordinator's own CLI dials the SuperLink (loopback; in server.crt)."""
        return f"127.0.0.1:{self.link.control_port}"

    @property
    def fleet_local_address(self) -> str:
        """The Fleet gateway as seen from the coordinator's host (for a port check)."""
        host = "127.0.0.1" if self.link.host in _WILDCARD_HOSTS else self.link.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.link.port}"


def _resolve(base: Path, p: Path) -> Path:
    p = p.expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    """Parse ``coordinator.toml``; paths become absolute (relative to the file's folder)."""
    path = Path(path)
    cfg = load_toml(path, CoordinatorConfig, what="coordinator config")
    base = path.resolve().parent
    link = cfg.link.model_copy(
        update={
            "workdir": _resolve(base, cfg.link.workdir),
            "certs_dir": _resolve(base, cfg.link.certs_dir),
            "database": None if cfg.link.database is None else _resolve(base, cfg.link.database),
        }
    )
    return cfg.model_copy(update={"link": link, "config_path": path.resolve()})


def load_run_file(path: Path) -> RunConfig:
    """Parse ``RUN.toml`` (one ``[run]`` section) into a :class:`RunConfig`."""
    path = Path(path)
    return load_toml(path, RunFile, what="run config").run


class RunFile(BaseModel):
    """``RUN.toml``: one ``[run]`` section (see ``configs/deploy/run.toml``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    run: RunConfig
