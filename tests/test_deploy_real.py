"""The REAL fedcrm apps on a real Flower deployment: ``fedcrm deploy local``'s code path.

Telco firms with their own prepared encrypted stores, a TLS SuperLink with SuperNode
authentication, one ``flower-supernode`` per firm (node config: only the firm config path),
the real ServerApp / ClientApp for 2 rounds; afterwards no Flower process may be left.

That deployment costs about a minute, so it runs ONCE per test session (the module-scoped
``real_deployment`` fixture) and each ``slow`` test below checks one fact about it. Also the
command line wiring of every deployment command (fast).
"""

from __future__ import annotations

import json
import stat
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import assert_all_gone
from typer.testing import CliRunner

from fedcrm.coordinator.local_deployment import DeployEvent, DeployEventKind
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.simulations.deploy_local import FEDERATION_DIR, LocalDeployment

TestFunction = TypeVar("TestFunction", bound=Callable[..., None])
FIRMS = ("firm1", "firm2")
ROUNDS = 2
TARGET_EPSILON = 0.5


# ---------------------------------------------------------------- fast: CLI wiring
def test_fedcrm_help_lists_the_deployment_commands() -> None:
    from fedcrm.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for command in ("certs", "link", "node", "run", "deploy", "simulate"):
        assert f" {command} " in result.output, command
    for group, subcommands in (("certs", ("ca", "server", "node-key")),
                               ("link", ("start", "register")), ("node", ("start",)),
                               ("deploy", ("local",))):
        sub = runner.invoke(app, [group, "--help"], terminal_width=200)
        assert sub.exit_code == 0, sub.output
        for name in subcommands:
            assert f" {name} " in sub.output, (group, name)


def test_certs_commands_write_private_files_0600_and_refuse_to_overwrite(tmp_path: Path) -> None:
    from fedcrm.cli import app

    runner = CliRunner()
    certs = tmp_path / "certs"
    for args in (["certs", "ca", "--out", str(certs), "--name", "test CA"],
                 ["certs", "server", "--ca", str(certs), "--out", str(certs),
                  "--host", "link.example.org", "--host", "203.0.113.10"],
                 ["certs", "node-key", "--firm", "acme", "--out", str(tmp_path / "keys")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    for secret in (certs / "ca.key", certs / "server.key", tmp_path / "keys" / "acme.key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert (tmp_path / "keys" / "acme.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    again = runner.invoke(app, ["certs", "node-key", "--firm", "acme", "--out",
                                str(tmp_path / "keys")])
    assert again.exit_code == 4 and "--force" in again.output


def test_run_and_link_report_a_missing_superlink_in_one_line(tmp_path: Path) -> None:
    from fedcrm.cli import app
    from fedcrm.coordinator.processes import free_port

    runner = CliRunner()
    assert runner.invoke(app, ["certs", "ca", "--out", str(tmp_path / "certs")]).exit_code == 0
    coordinator = tmp_path / "coordinator.toml"
    coordinator.write_text(
        f'[link]\nworkdir = "link"\ncerts_dir = "certs"\nport = {free_port()}\n'
    )
    run_file = tmp_path / "run.toml"
    run_file.write_text('[run]\nrounds = 2\n')
    result = runner.invoke(app, ["run", "--config", str(run_file), "--coordinator",
                                 str(coordinator)])
    assert result.exit_code == 8, result.output
    assert "no SuperLink answers" in result.output and "fedcrm link start" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3
    key = runner.invoke(app, ["certs", "node-key", "--firm", "acme", "--out", str(tmp_path)])
    assert key.exit_code == 0, key.output
    result = runner.invoke(app, ["link", "register", "--firm", "acme", "--public-key",
                                 str(tmp_path / "acme.pub"), "--config", str(coordinator)])
    assert result.exit_code == 8 and "no SuperLink answers" in result.output, result.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nrounds = 0\n')
    result = runner.invoke(app, ["run", "--config", str(bad), "--coordinator", str(coordinator)])
    assert result.exit_code == 2 and "run.rounds" in result.output


def test_coordinator_config_resolves_paths_against_its_file(tmp_path: Path) -> None:
    from fedcrm.coordinator.deploy_config import load_coordinator_config
    from fedcrm.privacy.errors import ConfigError

    path = tmp_path / "conf" / "coordinator.toml"
    path.parent.mkdir()
    path.write_text('[link]\nworkdir = "../link"\ncerts_dir = "certs"\nhost = "0.0.0.0"\n')
    cfg = load_coordinator_config(path)
    assert cfg.workdir == (tmp_path / "link").resolve()
    assert cfg.ca_cert == (tmp_path / "conf" / "certs" / "ca.crt").resolve()
    assert cfg.database == (tmp_path / "link" / "state.db").resolve()
    assert cfg.local_address == "127.0.0.1:9093"
    path.write_text('[link]\nworkdir = "link"\ncertz = "certs"\n')
    with pytest.raises(ConfigError, match="certs_dir"):
        load_coordinator_config(path)


def test_the_shipped_deploy_configs_parse() -> None:
    from fedcrm.coordinator.deploy_config import load_coordinator_config, load_run_file
    from fedcrm.simulations.deploy_local import load_local_deploy_config

    root = Path(__file__).resolve().parents[1] / "configs" / "deploy"
    local = load_local_deploy_config(root / "local.toml")
    assert local.run.rounds == 2 and local.deploy.firms == 3
    assert load_run_file(root / "run.toml").rounds >= 1
    assert load_coordinator_config(root / "coordinator.toml").link.port == 9093


def test_the_firm_node_config_is_only_the_absolute_firm_config_path(tmp_path: Path) -> None:
    from fedcrm.clients.client_app import NODE_CONFIG_KEY
    from fedcrm.clients.node import firm_node_config

    assert firm_node_config(tmp_path / "firm.toml") == {
        NODE_CONFIG_KEY: str((tmp_path / "firm.toml").resolve())
    }


# ---------------------------------------------------------------- slow: the real apps
@dataclass(frozen=True)
class RealDeployment:
    """What the one real deployment left behind, for the tests to read (never to change)."""

    done: LocalDeployment
    events: tuple[DeployEvent, ...]  # as ``on_event`` received them, in order
    root: Path  # every file the deployment wrote, and every process it started, names this
    seconds: float  # wall time of ``run_local_deployment``

    @property
    def summary(self) -> dict[str, Any]:
        return self.done.summary

    @property
    def federation(self) -> Path:
        return self.done.run_dir / FEDERATION_DIR

    def kinds(self) -> list[DeployEventKind]:
        return [e.kind for e in self.events]


@pytest.fixture(scope="module")
def real_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealDeployment]:
    """The real fedcrm ServerApp / ClientApp, 2 Telco firms x 2 rounds, TLS + registered keys."""
    from fedcrm.privacy.keys import ENV_COORDINATOR_KEY
    from fedcrm.simulations.deploy_local import (
        DeploySection,
        LocalDeployConfig,
        run_local_deployment,
    )

    root = tmp_path_factory.mktemp("real-deploy")
    cfg = LocalDeployConfig(
        deploy=DeploySection(firms=3, seed=3, epsilon_budget=1.0, workdir=root / "runs"),
        run=RunConfig(rounds=ROUNDS, min_firms=2, round_timeout=120,
                      wait_for_firms=30, target_epsilon=TARGET_EPSILON, batch_size=128,
                      learning_rate=1.0, max_update_norm=100.0),
    )
    events: list[DeployEvent] = []
    # run_local_deployment points this process's environment at the run's coordinator key;
    # put it back afterwards so no later test signs with a deleted temp key
    with pytest.MonkeyPatch.context() as env:
        env.delenv(ENV_COORDINATOR_KEY, raising=False)
        started = time.monotonic()
        done = run_local_deployment(
            cfg, firms=len(FIRMS), run_id="real-deploy", on_event=events.append
        )
        seconds = time.monotonic() - started
    print(f"\nreal deployment of {len(FIRMS)} firms x {ROUNDS} rounds: {seconds:.1f}s")
    yield RealDeployment(done=done, events=tuple(events), root=root, seconds=seconds)


def on_the_real_deployment(test: TestFunction) -> TestFunction:
    """Marks of a test reading ``real_deployment`` (the first one pays for the deployment)."""
    marked: TestFunction = pytest.mark.slow(pytest.mark.data(pytest.mark.timeout(420)(test)))
    return marked


@on_the_real_deployment
def test_the_real_apps_complete_two_rounds_over_tls_with_registered_nodes(
    real_deployment: RealDeployment,
) -> None:
    done, summary = real_deployment.done, real_deployment.summary
    assert done.result.completed, done.result.status
    assert done.completed and done.summary_path.exists()
    assert json.loads(done.summary_path.read_text()) == summary
    assert summary["status"] == "completed", summary.get("stop_reason")
    assert summary["rounds_completed"] == ROUNDS
    assert summary["deployment"]["flower_status"] == "finished:completed"
    # every firm's key was registered, its node admitted, and it trained in every round
    assert set(done.result.node_ids) == set(FIRMS) == {f["firm"] for f in summary["firms"]}
    assert len(set(done.result.node_ids.values())) == len(FIRMS)
    assert summary["deployment"]["node_ids"] == dict(done.result.node_ids)
    assert all(f["rounds_trained"] == ROUNDS for f in summary["firms"])
    link_log = done.result.logs["superlink"].read_text()
    assert "--enable-supernode-auth" in link_log and "--ssl-certfile" in link_log
    for firm, node_id in done.result.node_ids.items():
        node_log = done.result.logs[f"supernode-{firm}"].read_text()
        assert "--root-certificates" in node_log and "--auth-supernode-private-key" in node_log
        assert f"SuperNode ID: {node_id}" in node_log
    kinds = real_deployment.kinds()
    registered = [e.firm for e in real_deployment.events
                  if e.kind is DeployEventKind.NODE_REGISTERED]
    assert registered == list(FIRMS)
    assert (kinds.index(DeployEventKind.SUPERLINK_STARTED)
            < kinds.index(DeployEventKind.NODE_REGISTERED)
            < kinds.index(DeployEventKind.NODES_ONLINE)
            < kinds.index(DeployEventKind.RUN_STARTED)
            < kinds.index(DeployEventKind.RUN_FINISHED))
    assert kinds[-1] is DeployEventKind.STOPPED and kinds.count(DeployEventKind.STOPPED) == 1
    assert 0 < summary["deployment"]["seconds"] <= real_deployment.seconds


@on_the_real_deployment
def test_round_progress_is_reported_from_the_runs_typed_event_log(
    real_deployment: RealDeployment,
) -> None:
    from fedcrm.coordinator.events import EVENTS, RoundTrained, read_run_events

    rounds = [e for e in real_deployment.events if e.kind is DeployEventKind.ROUND]
    assert [e.round for e in rounds] == [1, 2]
    assert [e.total_rounds for e in rounds] == [ROUNDS, ROUNDS]
    kinds = real_deployment.kinds()
    first, last = (real_deployment.events.index(rounds[0]),
                   real_deployment.events.index(rounds[-1]))
    assert kinds.index(DeployEventKind.RUN_STARTED) < first
    assert last < kinds.index(DeployEventKind.RUN_FINISHED)
    # the progress is the ServerApp's events.jsonl, not Flower's log
    logged = read_run_events(real_deployment.done.run_dir / EVENTS)
    assert [e.round for e in logged if isinstance(e, RoundTrained)] == [1, 2]


@on_the_real_deployment
def test_each_firm_spends_a_positive_epsilon_within_its_budget_and_the_run_target(
    real_deployment: RealDeployment,
) -> None:
    firms = {f["firm"]: f for f in real_deployment.summary["firms"]}
    assert set(firms) == set(FIRMS)
    for f in firms.values():
        assert 0 < f["epsilon"] <= f["epsilon_budget"] + 1e-9, f
        assert f["epsilon"] <= TARGET_EPSILON + 1e-9, f
        assert 0 < f["delta"] < 1, f
        assert Path(f["ledger"]).exists(), f


@on_the_real_deployment
def test_the_federated_churn_model_beats_chance_on_the_pooled_holdout(
    real_deployment: RealDeployment,
) -> None:
    assert 0.5 < real_deployment.summary["metrics"]["pooled"]["auc"] <= 1.0


@on_the_real_deployment
def test_the_app_bundle_carries_no_secret_and_no_firm_path(
    real_deployment: RealDeployment,
) -> None:
    run_dir = real_deployment.done.run_dir
    app_dir = real_deployment.federation / "app"
    assert sorted(p.name for p in app_dir.iterdir()) == ["pyproject.toml"]
    app_text = (app_dir / "pyproject.toml").read_text()
    run_config = tomllib.loads(app_text)["tool"]["flwr"]["app"]["config"]
    assert run_config["run-dir"] == str(run_dir) and run_config["rounds"] == ROUNDS
    assert not any(str(v).endswith((".toml", ".key")) for v in run_config.values())
    assert "firm-config" not in run_config
    assert ".key" not in app_text and "BEGIN" not in app_text
    assert str(run_dir / "firms") not in app_text


@on_the_real_deployment
def test_every_private_key_the_deployment_wrote_is_0600(
    real_deployment: RealDeployment,
) -> None:
    run_dir, fed = real_deployment.done.run_dir, real_deployment.federation
    expected = {fed / "certs" / "ca.key", fed / "certs" / "server.key",
                run_dir / "coordinator" / "signing.key",
                *(fed / "keys" / f"{firm}.key" for firm in FIRMS),
                *(run_dir / "firms" / firm / "keys" / "signing.key" for firm in FIRMS)}
    written = set(run_dir.rglob("*.key"))
    assert expected <= written
    for secret in sorted(written):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret


@on_the_real_deployment
def test_a_firms_node_config_is_only_its_absolute_firm_config_path(
    real_deployment: RealDeployment,
) -> None:
    for firm in FIRMS:
        node_log = (real_deployment.federation / "nodes" / firm / f"supernode-{firm}.log")
        firm_config = (real_deployment.done.run_dir / "firms" / firm / "firm.toml").resolve()
        # the next argument starts right after the one key: nothing else rides along
        assert f"--node-config firm-config='{firm_config}' --" in node_log.read_text(), firm


@on_the_real_deployment
def test_no_deployment_process_outlives_the_run(real_deployment: RealDeployment) -> None:
    assert real_deployment.kinds()[-1] is DeployEventKind.STOPPED
    assert_all_gone(real_deployment.root)


@on_the_real_deployment
def test_the_auditor_verifies_the_deployments_signed_logs(
    real_deployment: RealDeployment,
) -> None:
    from fedcrm.audit.verify import verify_run

    fed = real_deployment.federation
    assert (fed / "audit.jsonl").exists() and (fed / "signing.pub").exists()
    verification = verify_run(real_deployment.done.run_dir)
    assert verification.ok, [str(f) for f in verification.failures]
