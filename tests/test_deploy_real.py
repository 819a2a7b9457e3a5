"""The REAL fedcrm apps on a real Flower deployment: ``fedcrm deploy local``'s code path.

Telco firms with their own prepared encrypted stores, a TLS SuperLink with SuperNode
authentication, one ``flower-supernode`` per firm (node config: only the firm config path),
the real ServerApp / ClientApp for 2 rounds; afterwards no Flower process may be left.
Also the command line wiring of every deployment command (fast).
"""

from __future__ import annotations

import json
import stat
import time
import tomllib
from pathlib import Path

import pytest
from conftest import assert_all_gone
from typer.testing import CliRunner

from fedcrm.coordinator.run_config import RunConfig


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
@pytest.mark.slow
@pytest.mark.data
@pytest.mark.timeout(420)
def test_real_fedcrm_apps_complete_two_rounds_on_a_tls_deployment(tmp_path: Path) -> None:
    from fedcrm.coordinator.local_deployment import DeployEvent, DeployEventKind
    from fedcrm.simulations.deploy_local import (
        DeploySection,
        LocalDeployConfig,
        run_local_deployment,
    )

    cfg = LocalDeployConfig(
        deploy=DeploySection(firms=3, seed=3, epsilon_budget=1.0, workdir=tmp_path / "runs"),
        run=RunConfig(rounds=2, min_firms=2, round_timeout=120,
                      wait_for_firms=30, target_epsilon=0.5, batch_size=128,
                      learning_rate=1.0, max_update_norm=100.0),
    )
    events: list[DeployEvent] = []
    started = time.monotonic()
    done = run_local_deployment(cfg, firms=2, run_id="real-deploy", on_event=events.append)
    seconds = time.monotonic() - started

    assert done.result.completed, done.result.status
    assert done.summary_path.exists()
    summary = json.loads(done.summary_path.read_text())
    assert summary["status"] == "completed", summary.get("stop_reason")
    assert summary["rounds_completed"] == 2
    assert 0.5 < summary["metrics"]["pooled"]["auc"] <= 1.0
    firms = {f["firm"]: f for f in summary["firms"]}
    assert set(firms) == {"firm1", "firm2"} == set(done.result.node_ids)
    for f in firms.values():
        assert f["rounds_trained"] == 2
        assert 0 < f["epsilon"] <= f["epsilon_budget"] + 1e-9
        assert f["epsilon"] <= 0.5 + 1e-9  # the run's target_epsilon
    assert summary["deployment"]["flower_status"] == "finished:completed"
    assert [e.round for e in events if e.kind is DeployEventKind.ROUND] == [1, 2]
    assert events[-1].kind is DeployEventKind.STOPPED

    fed = done.run_dir / "federation"
    bundle = tomllib.loads((fed / "app" / "pyproject.toml").read_text())
    run_config = bundle["tool"]["flwr"]["app"]["config"]
    assert run_config["run-dir"] == str(done.run_dir) and run_config["rounds"] == 2
    assert not any(str(v).endswith((".toml", ".key")) for v in run_config.values())
    for secret in (fed / "certs" / "ca.key", fed / "certs" / "server.key",
                   fed / "keys" / "firm1.key", fed / "keys" / "firm2.key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    node_log = (fed / "nodes" / "firm1" / "supernode-firm1.log").read_text()
    firm1_config = str((done.run_dir / "firms" / "firm1" / "firm.toml").resolve())
    assert f"--node-config firm-config='{firm1_config}'" in node_log
    assert_all_gone(tmp_path)
    # the auditor's verification passes on the deployment's signed logs
    from fedcrm.audit.verify import verify_run

    verification = verify_run(done.run_dir)
    assert verification.ok, [str(f) for f in verification.failures]
    assert (fed / "audit.jsonl").exists() and (fed / "signing.pub").exists()
    print(f"real deployment of 2 firms x 2 rounds: {seconds:.1f}s")
