"""The REAL fedcrm apps on a real Flower deployment: ``fedcrm deploy local``'s code path.

Three Telco firms with their own prepared encrypted stores, a TLS SuperLink with SuperNode
authentication behind the Fleet gateway, one ``flower-supernode`` and one long-lived ClientApp
process per firm (node config: only the firm config path), the real ServerApp / ClientApp for 3
rounds - and, while it runs, what a security team asks about:

* before the run, a firm holding the CA tries the Control API through the address it dials
  (submit a run, register or unregister a node), and an app that ships its own code is
  submitted: every firm refuses it without importing a line of it;
* once every firm has sent its round-2 update, the SuperLink restarts: ``run`` submits the run
  again, it resumes after round 1 and the firms resend their round-2 updates, uncharged;
* after round 2, one firm is killed: it is named, dropped and shown as stopped (a node that
  dies without a word is dropped at the round timeout: ``test_deploy_resilience.py``);
* each firm exports its signed log, the run's folder is assembled and ``audit verify`` passes.

That deployment costs a couple of minutes, so it runs ONCE per test session (the module-scoped
``real_deployment`` fixture) and each ``slow`` test below checks one fact about it. Also the
command line wiring of every deployment command (fast).
"""

from __future__ import annotations

import json
import stat
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import assert_all_gone
from typer.testing import CliRunner

from fedcrm.coordinator.local_deployment import DeployEvent, DeployEventKind, LocalFederation
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.simulations.deploy_local import FEDERATION_DIR, LocalDeployment

TestFunction = TypeVar("TestFunction", bound=Callable[..., None])
FIRMS = ("firm1", "firm2", "firm3")
KILLED = "firm3"  # killed (`kill`: SIGTERM to its node's processes) once round 2 is trained
ROUNDS = 3
ROUND_TIMEOUT = 90.0  # a dead node is named long before: the SuperLink answers in its place
TARGET_EPSILON = 0.5


# ---------------------------------------------------------------- fast: CLI wiring
def test_fedcrm_help_lists_the_deployment_commands() -> None:
    from fedcrm.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for command in ("certs", "link", "node", "run", "deploy", "simulate"):
        assert f" {command} " in result.output, command
    for group, subcommands in (("certs", ("ca", "server", "node-key", "fingerprint")),
                               ("link", ("start", "register", "ls", "unregister")),
                               ("node", ("start", "export-audit")), ("deploy", ("local",)),
                               ("audit", ("verify", "assemble"))):
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
        f"control_port = {free_port()}\n"
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
    # the CLI's Control API connection is loopback whatever interface the firms dial
    assert cfg.control_address == "127.0.0.1:9094" and cfg.link.port == 9093
    path.write_text('[link]\nworkdir = "link"\ncerts_dir = "certs"\ncontrol_port = 9093\n')
    with pytest.raises(ConfigError, match="control_port"):
        load_coordinator_config(path)
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
    from fedcrm.clients.node import NODE_CONFIG_KEY, firm_node_config

    assert firm_node_config(tmp_path / "firm.toml") == {
        NODE_CONFIG_KEY: str((tmp_path / "firm.toml").resolve())
    }


# ---------------------------------------------------------------- slow: the real apps
ROGUE_SERVER = """
import json, time
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline, nodes = time.time() + 60, []
    while len(nodes) < {firms} and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [Message(RecordDict({{"config": ConfigRecord({{"x": 1}})}}), dst_node_id=n,
                        message_type="query.describe") for n in nodes]
    replies = grid.send_and_receive(messages, timeout=60)
    answers = [r.error.reason if r.has_error() else "ANSWERED" for r in replies]
    open({result!r}, "w").write(json.dumps(answers))
"""
ROGUE_CLIENT = """
import os
from flwr.clientapp import ClientApp

if "/nodes/" in os.environ.get("FLWR_HOME", ""):  # a firm's process (`flwr run` imports it too)
    open({marker!r}, "w").write("the rogue ClientApp was imported on a firm")  # must never be
app = ClientApp()
"""


@dataclass(frozen=True)
class RealDeployment:
    """What the one real deployment left behind, for the tests to read (never to change)."""

    done: LocalDeployment
    events: tuple[DeployEvent, ...]  # as ``on_event`` received them, in order
    root: Path  # every file the deployment wrote, and every process it started, names this
    seconds: float  # wall time of ``run_local_deployment``
    control_from_a_firm: dict[str, str]  # what each Control API call through the gateway got
    rogue_answers: list[str]  # every firm's answer to the app that ships code
    rogue_marker: Path  # written if any firm ever imported the rogue ClientApp
    faults: dict[str, float]  # when the SuperLink restarted / the firm was killed (monotonic)
    superlink_args: str  # the SuperLink's command line

    @property
    def summary(self) -> dict[str, Any]:
        return self.done.summary

    @property
    def federation(self) -> Path:
        return self.done.run_dir / FEDERATION_DIR

    def kinds(self) -> list[DeployEventKind]:
        return [e.kind for e in self.events]


def _control_from_a_firm(federation: LocalFederation, work: Path) -> dict[str, str]:
    """A firm with the CA, at the address it dials, tries the Control API; what did it get?"""
    from fedcrm.coordinator.app_bundle import write_app_dir
    from fedcrm.coordinator.flower_cli import (
        register_node,
        run_app,
        unregister_node,
        write_flwr_config,
    )
    from fedcrm.coordinator.processes import DeploymentError
    from fedcrm.privacy.certs import generate_node_auth_key

    home = work / "firm-cli"
    write_flwr_config(home, "firm", federation.link.fleet_address, federation.ca.cert)
    own = generate_node_auth_key(work / "firm-keys", firm="intruder")
    attempts: dict[str, Callable[[], object]] = {
        "run": lambda: run_app(app_dir=write_app_dir(work / "firm-app"), flwr_home=home,
                               connection="firm"),
        "register": lambda: register_node(flwr_home=home, connection_name="firm",
                                          public_key_path=own.public_key),
        "unregister": lambda: unregister_node(flwr_home=home, connection_name="firm",
                                              node_id=federation.node_ids[FIRMS[0]]),
    }
    def outcome(attempt: Callable[[], object]) -> str:
        try:
            return f"ACCEPTED {attempt()}"
        except DeploymentError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(attempts, pool.map(outcome, attempts.values()), strict=True))


def _rogue_app(federation: LocalFederation, work: Path) -> list[str]:
    """An app that ships its own ServerApp and ClientApp code, submitted to the SuperLink."""
    from fedcrm.coordinator.flower_cli import follow_run, run_app

    app_dir = work / "rogue-app"
    package = app_dir / "rogue"
    package.mkdir(parents=True)
    result = work / "rogue-answers.json"
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text(ROGUE_SERVER.format(firms=len(FIRMS), result=str(result)))
    (package / "client.py").write_text(
        ROGUE_CLIENT.format(marker=str(work / "rogue-ran-on-a-firm"))
    )
    (app_dir / "pyproject.toml").write_text(tomllib_free_pyproject())
    run_id = run_app(app_dir=app_dir, flwr_home=federation.cli_home, connection="fedcrm-local",
                     extra_pythonpath=[app_dir])
    follow_run(flwr_home=federation.cli_home, connection="fedcrm-local", run_id=run_id,
               timeout_s=180, log_path=work / "rogue-run.log")
    answers: list[str] = json.loads(result.read_text()) if result.exists() else []
    return answers


def tomllib_free_pyproject() -> str:
    return (
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "rogue-app"\nversion = "1.0.0"\ndescription = "x"\n'
        'license = "Apache-2.0"\ndependencies = ["flwr==1.41.0"]\n\n'
        '[tool.flwr.app]\npublisher = "rogue"\n\n'
        '[tool.flwr.app.components]\nserverapp = "rogue.server:app"\n'
        'clientapp = "rogue.client:app"\n\n[tool.flwr.app.config]\nx = 1\n'
    )


def _inject_faults(federation: LocalFederation, run_dir: Path, faults: dict[str, float],
                   done: threading.Event) -> None:
    """Restart the SuperLink once every firm has sent round 2; kill a firm after round 2."""
    from fedcrm.coordinator.events import RoundTrained, RunResumed, follow

    def sent_round_2(firm: str) -> bool:
        log = run_dir / "firms" / firm / "audit.jsonl"
        try:
            return any(json.loads(line)["kind"] == "update_sent"
                       and json.loads(line)["payload"]["round"] == 2
                       for line in log.read_text().splitlines())
        except (OSError, ValueError):
            return False

    while not done.is_set() and not all(sent_round_2(f) for f in FIRMS):
        time.sleep(0.1)
    if done.is_set():
        return
    faults["superlink_restart"] = time.monotonic()
    federation.restart_superlink()
    resumed = False
    for event in follow(run_dir / "events.jsonl", poll=0.1, stop=done.is_set):
        resumed = resumed or isinstance(event, RunResumed)
        if resumed and isinstance(event, RoundTrained) and event.round == 2:
            faults["firm_killed"] = time.monotonic()
            federation.stop_firm(KILLED)
            return


@pytest.fixture(scope="module")
def real_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealDeployment]:
    """The real fedcrm ServerApp / ClientApp, 3 Telco firms x 3 rounds, TLS + registered keys,
    a Control API attempt and a rogue app first, a SuperLink restart and a killed firm during."""
    from fedcrm.privacy.keys import ENV_COORDINATOR_KEY
    from fedcrm.simulations.deploy_local import (
        DeploySection,
        LocalDeployConfig,
        run_local_deployment,
    )

    root = tmp_path_factory.mktemp("real-deploy")
    work = root / "outside"
    work.mkdir()
    cfg = LocalDeployConfig(
        deploy=DeploySection(firms=3, seed=3, epsilon_budget=1.0, workdir=root / "runs"),
        run=RunConfig(rounds=ROUNDS, min_firms=2, round_timeout=ROUND_TIMEOUT,
                      wait_for_firms=60, target_epsilon=TARGET_EPSILON, batch_size=128,
                      learning_rate=1.0, max_update_norm=100.0),
    )
    events: list[DeployEvent] = []
    seen: dict[str, Any] = {"faults": {}}
    finished = threading.Event()

    timeline: list[str] = []

    def on_event(event: DeployEvent) -> None:
        events.append(event)
        timeline.append(f"{time.monotonic() - started:6.1f}s {event.message}")

    def before_the_run(federation: LocalFederation) -> None:
        with ThreadPoolExecutor(max_workers=2) as pool:  # independent: side by side
            control = pool.submit(_control_from_a_firm, federation, work)
            rogue = pool.submit(_rogue_app, federation, work)
            seen["control"], seen["rogue"] = control.result(), rogue.result()
        timeline.append(f"{time.monotonic() - started:6.1f}s Control API and rogue app refused")
        seen["superlink_args"] = federation.link.superlink.argv
        threading.Thread(
            target=_inject_faults, daemon=True,
            args=(federation, root / "runs" / "real-deploy", seen["faults"], finished),
        ).start()

    # run_local_deployment points this process's environment at the run's coordinator key;
    # put it back afterwards so no later test signs with a deleted temp key
    with pytest.MonkeyPatch.context() as env:
        env.delenv(ENV_COORDINATOR_KEY, raising=False)
        started = time.monotonic()
        try:
            done = run_local_deployment(
                cfg, firms=len(FIRMS), run_id="real-deploy", on_event=on_event,
                on_federation=before_the_run,
            )
        finally:
            finished.set()
        seconds = time.monotonic() - started
    print(f"\nreal deployment of {len(FIRMS)} firms x {ROUNDS} rounds, a SuperLink restart and "
          f"a killed firm: {seconds:.1f}s\n" + "\n".join(timeline) + "\n"
          + "\n".join(f"{t - started:6.1f}s {k}" for k, t in seen["faults"].items()))
    yield RealDeployment(
        done=done, events=tuple(events), root=root, seconds=seconds,
        control_from_a_firm=seen["control"], rogue_answers=seen["rogue"],
        rogue_marker=work / "rogue-ran-on-a-firm", faults=dict(seen["faults"]),
        superlink_args=" ".join(seen["superlink_args"]),
    )


def on_the_real_deployment(test: TestFunction) -> TestFunction:
    """Marks of a test reading ``real_deployment`` (the first one pays for the deployment)."""
    marked: TestFunction = pytest.mark.slow(pytest.mark.data(pytest.mark.timeout(600)(test)))
    return marked


def _train_releases(run_dir: Path, firm: str) -> list[int]:
    """The rounds of this run the firm's ledger charged a training release for."""
    ledger = run_dir / "firms" / firm / "store" / "budget.jsonl"
    rounds = []
    for line in ledger.read_text().splitlines():
        record = json.loads(line)
        context = record.get("context", {}) if isinstance(record, dict) else {}
        if str(record.get("purpose", "")).startswith("train:") and context.get("run_id"):
            rounds.append(int(context["round"]))
    return rounds


@on_the_real_deployment
def test_the_run_completes_over_tls_across_a_superlink_restart(
    real_deployment: RealDeployment,
) -> None:
    done, summary = real_deployment.done, real_deployment.summary
    assert "superlink_restart" in real_deployment.faults, "the restart never happened"
    assert done.result.completed, done.result.status
    assert done.completed and done.summary_path.exists()
    assert json.loads(done.summary_path.read_text()) == summary
    assert summary["status"] == "completed", summary.get("stop_reason")
    assert summary["rounds_completed"] == ROUNDS
    # two attempts: the first cut by the restart, the second resumed after round 1
    attempts = summary["deployment"]["attempts"]
    assert [a["ended"] for a in attempts] == ["the SuperLink restarted", "finished:completed"]
    assert summary["attempts"] == 2
    assert set(done.result.node_ids) == set(FIRMS) == {f["firm"] for f in summary["firms"]}
    assert len(set(done.result.node_ids.values())) == len(FIRMS)
    link_log = done.result.logs["superlink"].read_text()
    assert "--enable-supernode-auth" in link_log and "--ssl-certfile" in link_log
    for firm, node_id in done.result.node_ids.items():
        node_log = done.result.logs[f"supernode-{firm}"].read_text()
        assert "--root-certificates" in node_log and "--auth-supernode-private-key" in node_log
        assert f"SuperNode ID: {node_id}" in node_log
    kinds = real_deployment.kinds()
    assert (kinds.index(DeployEventKind.SUPERLINK_STARTED)
            < kinds.index(DeployEventKind.NODE_REGISTERED)
            < kinds.index(DeployEventKind.NODES_ONLINE)
            < kinds.index(DeployEventKind.RUN_STARTED)
            < kinds.index(DeployEventKind.RUN_FINISHED))
    assert kinds[-1] is DeployEventKind.STOPPED and kinds.count(DeployEventKind.STOPPED) == 1
    assert 0 < summary["deployment"]["seconds"] <= real_deployment.seconds


@on_the_real_deployment
def test_no_round_a_firm_was_charged_for_is_charged_again(
    real_deployment: RealDeployment,
) -> None:
    """Every firm had released round 2 when the SuperLink went down: the resumed run got the
    same updates again (replayed), and each ledger holds one training release per round."""
    run_dir, summary = real_deployment.done.run_dir, real_deployment.summary
    assert summary["replayed_updates"] == [{"round": 2, "firm": f} for f in FIRMS]
    assert summary["lost_updates"] == []
    trained = {f["firm"]: f["rounds_trained"] for f in summary["firms"]}
    assert trained == {"firm1": ROUNDS, "firm2": ROUNDS, KILLED: 2}
    for firm in FIRMS:
        assert _train_releases(run_dir, firm) == list(range(1, trained[firm] + 1)), firm
        kept = sorted(p.name for p in (run_dir / "firms" / firm / "store" / "runs").iterdir())
        assert "real-deploy.round-2.update.npz" in kept, firm


@on_the_real_deployment
def test_a_killed_firm_is_named_dropped_within_the_round_timeout_and_shown_stopped(
    real_deployment: RealDeployment,
) -> None:
    from fedcrm.coordinator.events import FirmDropped, RoundStarted, RoundTrained, read_run_events

    assert "firm_killed" in real_deployment.faults
    logged = read_run_events(real_deployment.done.run_dir / "events.jsonl")
    dropped = [e for e in logged if isinstance(e, FirmDropped)]
    assert [(e.firm, e.round) for e in dropped] == [(KILLED, ROUNDS)]
    assert dropped[0].node_id == real_deployment.done.result.node_ids[KILLED]
    assert not any("node-" in getattr(e, "firm", "") for e in logged)
    started = next(e for e in logged if isinstance(e, RoundStarted) and e.round == ROUNDS)
    trained = next(e for e in logged if isinstance(e, RoundTrained) and e.round == ROUNDS)
    assert KILLED in started.firms and trained.dropped == (KILLED,)
    raw = [json.loads(line) for line in
           (real_deployment.done.run_dir / "events.jsonl").read_text().splitlines()]
    began = next(r["t"] for r in raw if r["kind"] == "round_started" and r["round"] == ROUNDS)
    named = next(r["t"] for r in raw if r["kind"] == "firm_dropped")
    assert named - began < ROUND_TIMEOUT / 2  # the SuperLink's answer, not the timeout
    stopped = {f["firm"]: f["stopped"] for f in real_deployment.summary["firms"]}
    assert stopped[KILLED] and stopped[KILLED].startswith(f"dropped in round {ROUNDS}")
    assert stopped["firm1"] is None and stopped["firm2"] is None


@on_the_real_deployment
def test_round_progress_is_reported_from_the_runs_typed_event_log(
    real_deployment: RealDeployment,
) -> None:
    from fedcrm.coordinator.events import EVENTS, RoundTrained, RunResumed, read_run_events

    logged = read_run_events(real_deployment.done.run_dir / EVENTS)
    resumed = [e for e in logged if isinstance(e, RunResumed)]
    assert [(e.completed_round, e.attempt) for e in resumed] == [(1, 1)]
    after = logged[logged.index(resumed[0]):]
    assert [e.round for e in after if isinstance(e, RoundTrained)] == [2, 3]
    rounds = [e.round for e in real_deployment.events if e.kind is DeployEventKind.ROUND]
    assert rounds[-2:] == [2, 3] and rounds[0] == 1


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
def test_a_firm_cannot_use_the_control_api_through_the_address_it_dials(
    real_deployment: RealDeployment,
) -> None:
    """Holding the CA (and a registered node key, which the CLI does not even use), a firm can
    neither submit a run nor register or unregister a node; the SuperLink binds loopback."""
    got = real_deployment.control_from_a_firm
    assert set(got) == {"run", "register", "unregister"}
    for call, answer in got.items():
        assert not answer.startswith("ACCEPTED"), (call, answer)
        assert "failed" in answer, (call, answer)
    assert "--host 127.0.0.1" in real_deployment.superlink_args
    assert len(real_deployment.done.result.node_ids) == len(FIRMS)  # nothing was unregistered


@on_the_real_deployment
def test_an_app_that_ships_code_is_refused_by_every_firm_without_running_it(
    real_deployment: RealDeployment,
) -> None:
    answers = real_deployment.rogue_answers
    assert len(answers) == len(FIRMS), answers
    for answer in answers:
        assert "ships files" in answer and "rogue/client.py" in answer, answer
    assert not real_deployment.rogue_marker.exists()
    for firm in FIRMS:  # no bundle was ever installed on a firm
        apps = real_deployment.federation / "nodes" / firm / "flwr-home" / "apps"
        assert not apps.exists() or not any(apps.rglob("client.py"))


@on_the_real_deployment
def test_each_firm_answers_every_message_from_one_long_lived_clientapp_process(
    real_deployment: RealDeployment,
) -> None:
    """torch and the firm's store load once per firm, not once per message."""
    from fedcrm.clients.runtime import READY

    for firm in FIRMS:
        node = real_deployment.federation / "nodes" / firm
        log = (node / "clientapp.log").read_text()
        assert log.count(READY) == 1, firm
        assert log.count("answered in") >= (4 if firm == KILLED else 6), firm
        assert "Starting Flower SuperExec" not in (node / f"supernode-{firm}.log").read_text()


@on_the_real_deployment
def test_a_run_records_the_fedcrm_release_it_ran(real_deployment: RealDeployment) -> None:
    from fedcrm.coordinator.app_bundle import APP_HASH_KEY, VERSION_KEY, installed_release

    release = installed_release()
    summary = real_deployment.summary
    assert (summary["fedcrm_version"], summary["app_hash"]) == (release.version, release.app_hash)
    bundle = tomllib.loads((real_deployment.federation / "app" / "pyproject.toml").read_text())
    config = bundle["tool"]["flwr"]["app"]["config"]
    assert (config[VERSION_KEY], config[APP_HASH_KEY]) == (release.version, release.app_hash)
    started = json.loads((real_deployment.federation / "audit.jsonl").read_text().splitlines()[0])
    assert started["payload"]["app_hash"] == release.app_hash


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
def test_every_file_with_keys_state_plans_or_raw_data_is_0600(
    real_deployment: RealDeployment,
) -> None:
    run_dir, fed = real_deployment.done.run_dir, real_deployment.federation
    expected = {fed / "certs" / "ca.key", fed / "certs" / "server.key",
                run_dir / "coordinator" / "signing.key",
                *(fed / "keys" / f"{firm}.key" for firm in FIRMS),
                *(run_dir / "firms" / firm / "keys" / "signing.key" for firm in FIRMS)}
    written = set(run_dir.rglob("*.key"))
    assert expected <= written
    private = {
        *written, fed / "superlink" / "state.db", fed / "superlink" / "superlink.log",
        fed / "superlink" / "fleet-gateway.log", run_dir / "events.jsonl",
        run_dir / "summary.json", run_dir / "checkpoint.json", run_dir / "checkpoint.npz",
        run_dir / "attempts.json", run_dir / "flower.log", fed / "audit.jsonl",
        *run_dir.glob("firms/*/keys/keys.json"), *run_dir.glob("firms/*/customers.csv"),
        *run_dir.glob("firms/*/store/runs/*"), *fed.glob("nodes/*/*.log"),
    }
    assert len([p for p in private if "runs" in p.parts and p.name.endswith(".npz")]) >= 8
    for path in sorted(private):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@on_the_real_deployment
def test_a_firms_node_config_is_only_its_absolute_firm_config_path(
    real_deployment: RealDeployment,
) -> None:
    for firm in FIRMS:
        node_log = (real_deployment.federation / "nodes" / firm / f"supernode-{firm}.log")
        firm_config = (real_deployment.done.run_dir / "firms" / firm / "firm.toml").resolve()
        # the argument ends right after the one key: nothing else rides along
        command = node_log.read_text().splitlines()[0] + " "
        assert f" --node-config firm-config='{firm_config}' " in command, firm


@on_the_real_deployment
def test_no_deployment_process_outlives_the_run(real_deployment: RealDeployment) -> None:
    assert real_deployment.kinds()[-1] is DeployEventKind.STOPPED
    assert_all_gone(real_deployment.root)


@on_the_real_deployment
def test_the_run_folder_assembled_from_each_partys_export_passes_audit_verify(
    real_deployment: RealDeployment, tmp_path: Path,
) -> None:
    """The multi-host procedure: each firm exports its log, the auditor assembles and verifies;
    the same federation log cut before ``run_finished`` is reported incomplete."""
    from fedcrm.audit.assemble import assemble_run, export_firm_log
    from fedcrm.audit.verify import FailureKind, verify_run

    run_dir = real_deployment.done.run_dir
    coordinator = tmp_path / "coordinator-run"  # what the coordinator's host holds
    (coordinator / "federation").mkdir(parents=True)
    for name in ("audit.jsonl", "signing.pub"):
        (coordinator / "federation" / name).write_bytes((run_dir / "federation" / name)
                                                        .read_bytes())
    exports = [
        export_firm_log(firm=f, log=run_dir / "firms" / f / "audit.jsonl",
                        public_key=run_dir / "firms" / f / "keys" / "signing.pub",
                        out=tmp_path / f"{f}.zip", run_id="real-deploy").path
        for f in FIRMS
    ]
    report = verify_run(assemble_run(run_dir=coordinator, firm_exports=exports,
                                     out=tmp_path / "audit"))
    assert report.ok, [str(f) for f in report.failures]
    assert {(u.firm, u.round) for u in report.replayed_updates} == {(f, 2) for f in FIRMS}
    assert report.lost_updates == ()
    assert report.run["resumed"][0]["completed_round"] == 1
    cut = tmp_path / "cut"
    (cut / "federation").mkdir(parents=True)
    lines = (tmp_path / "audit" / "federation" / "audit.jsonl").read_bytes().splitlines(True)
    (cut / "federation" / "audit.jsonl").write_bytes(b"".join(lines[:-1]))
    (cut / "federation" / "signing.pub").write_bytes(
        (tmp_path / "audit" / "federation" / "signing.pub").read_bytes())
    (cut / "firms").symlink_to(tmp_path / "audit" / "firms")
    assert FailureKind.INCOMPLETE in {f.kind for f in verify_run(cut).failures}
