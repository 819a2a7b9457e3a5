"""Real Flower 1.41 deployment plumbing: TLS SuperLink, node authentication, SuperNodes, runs.

The fast tests cover process management and the generated files. The ``slow`` ones start the
real ``flower-superlink`` (and ``flower-supernode``) on 127.0.0.1: node authentication refusing
an unregistered key, and :func:`deploy_local` stopping every process when a node fails to start
or the user presses Ctrl-C (with stand-in SuperNodes: plain Python processes that never exit by
themselves). A complete run of the real apps is ``tests/test_deploy_real.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_all_gone

from fedcrm.clients.node import SUPERNODE_CONNECTION_ERROR, format_node_config, start_supernode
from fedcrm.coordinator.app_bundle import (
    APP_HASH_KEY,
    FEDCRM_CLIENTAPP,
    VERSION_KEY,
    AppSpec,
    BundleRefusal,
    Refusal,
    bundle_refusal,
    installed_release,
    write_app_dir,
)
from fedcrm.coordinator.flower_cli import (
    RunState,
    RunStatus,
    node_statuses,
    register_node,
    start_superlink,
    write_flwr_config,
)
from fedcrm.coordinator.local_deployment import (
    DeployEvent,
    DeployEventKind,
    LocalFirm,
    NodeConfigValue,
    deploy_local,
)
from fedcrm.coordinator.processes import (
    DeploymentError,
    ManagedProcess,
    ProcessGroup,
    flower_env,
    free_port,
)
from fedcrm.privacy.certs import generate_ca, generate_node_auth_key, issue_server_cert

# A stand-in SuperNode: starts a child of its own (as flower-supernode starts flwr-clientapp),
# says so, then runs until it is stopped. (The log also holds the command line, which must not
# contain the words it prints: print() joins them.)
STAND_IN_NODE = (
    "import subprocess, time; subprocess.Popen(['sleep', '300']); "
    "print('node', 'up', flush=True); time.sleep(300)"
)


class StandInNodes:
    """A ``start_node`` for :func:`deploy_local` that starts :data:`STAND_IN_NODE` processes.

    Like :func:`start_supernode` it adds each process to the deployment's group, so only the
    deployment's clean-up can stop it. Starting a firm named in ``failing`` raises instead, as
    ``start_supernode`` does for an unreadable key, after the firms before it are running.
    """

    def __init__(self, *, failing: frozenset[str] = frozenset()) -> None:
        self.failing = failing
        self.started: list[ManagedProcess] = []

    def __call__(
        self,
        *,
        superlink_address: str,
        root_cert: Path,
        auth_key: Path,
        node_config: Mapping[str, NodeConfigValue],
        workdir: Path,
        max_retries: int | None = None,
        max_wait_time: float | None = None,
        name: str = "supernode",
        runtime_port: int | None = None,
        extra_pythonpath: Sequence[Path] = (),
        group: ProcessGroup | None = None,
        clientapp: str = "",
    ) -> ManagedProcess:
        assert group is not None, "deploy_local must hand its process group to start_node"
        if node_config["firm"] in self.failing:
            raise DeploymentError(f"{name}: cannot read its authentication key {auth_key}")
        process = group.start(
            name=name, argv=[sys.executable, "-c", STAND_IN_NODE],
            env=flower_env(flwr_home=workdir / "flwr-home"), log_path=workdir / f"{name}.log",
            cwd=workdir,
        )
        assert process.wait_for_log("node up", timeout=20), process.log_tail()
        assert len(process.leftover_pids()) == 2, "the stand-in and its child run"
        self.started.append(process)
        return process


def _unregistered(names: tuple[str, ...] = ("alpha", "beta")) -> list[LocalFirm]:
    """Firms whose keys are not registered: no ``flwr`` CLI call, and no node to wait for."""
    return [LocalFirm(name, {"firm": name}, register=False) for name in names]


# ---------------------------------------------------------------- fast: process management
def test_stopping_a_managed_process_kills_its_whole_group(tmp_path: Path) -> None:
    script = "import subprocess,time; subprocess.Popen(['sleep','300']); time.sleep(300)"
    proc = ManagedProcess(
        name="parent", argv=[sys.executable, "-c", script], env=dict(os.environ),
        log_path=tmp_path / "parent.log",
    ).start()
    deadline = time.monotonic() + 10
    while len(proc.leftover_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(proc.leftover_pids()) == 2  # parent and its sleep child
    proc.stop(grace_s=2)
    assert proc.leftover_pids() == []
    assert proc.poll() is not None


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    script = (
        "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('st' + 'arted', flush=True); time.sleep(300)"
    )
    proc = ManagedProcess(
        name="stubborn", argv=[sys.executable, "-c", script], env=dict(os.environ),
        log_path=tmp_path / "stubborn.log",
    ).start()
    assert proc.wait_for_log("started", timeout=10)
    started = time.monotonic()
    code = proc.stop(grace_s=1)
    assert code == -signal.SIGKILL
    assert time.monotonic() - started < 6
    assert proc.leftover_pids() == []


def test_process_group_stops_everything_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), ProcessGroup(grace_s=2) as group:
        for i in range(2):
            group.start(
                name=f"sleeper{i}", argv=["sleep", "300"], env=dict(os.environ),
                log_path=tmp_path / f"s{i}.log",
            )
        raise KeyboardInterrupt
    assert all(p.poll() is not None for p in group)
    assert group.leftover_pids() == []


def test_sigterm_to_the_coordinator_still_stops_its_children(tmp_path: Path) -> None:
    marker = tmp_path / "child-pid"
    script = f"""
import os, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from fedcrm.coordinator.processes import ProcessGroup
with ProcessGroup(grace_s=2) as group:
    p = group.start(
        name="sleeper", argv=["sleep", "300"], env=dict(os.environ),
        log_path={str(tmp_path / 's.log')!r},
    )
    open({str(marker)!r}, "w").write(str(p.pid))
    time.sleep(300)
"""
    outer = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(marker.read_text())
        outer.send_signal(signal.SIGTERM)
        assert outer.wait(timeout=20) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            for _ in range(50):
                os.kill(child, 0)
                time.sleep(0.1)
    finally:
        if outer.poll() is None:
            os.killpg(outer.pid, signal.SIGKILL)


def test_wait_for_port_reports_an_early_exit_with_the_log(tmp_path: Path) -> None:
    proc = ManagedProcess(
        name="crasher", argv=[sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
        env=dict(os.environ), log_path=tmp_path / "crasher.log", port=free_port(),
    )
    with proc, pytest.raises(DeploymentError, match=r"exited with code 3.*boom"):
        proc.wait_for_port(timeout=20)


def test_flower_env_isolates_flwr_home_and_keeps_flower_offline(tmp_path: Path) -> None:
    apps = tmp_path / "apps"
    env = flower_env(
        flwr_home=tmp_path / "home", extra_pythonpath=[apps], base={"PATH": "/usr/bin"}
    )
    assert env["FLWR_HOME"] == str((tmp_path / "home").resolve())
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(apps.resolve())


# ---------------------------------------------------------------- fast: generated files
def test_node_config_is_encoded_the_way_flower_parses_it() -> None:
    from flwr.common.config import parse_config_args

    config: dict[str, str | int | float | bool] = {
        "firm": "acme", "store": "/data/my store/acme", "rounds": 3, "lr": 0.5, "dp": True
    }
    encoded = format_node_config(config)
    assert parse_config_args([encoded]) == config
    with pytest.raises(DeploymentError, match="quote"):
        format_node_config({"store": "/data/it's"})
    with pytest.raises(DeploymentError, match="letters"):
        format_node_config({"bad key": 1})


def test_app_dir_is_a_valid_flower_app_without_secrets(tmp_path: Path) -> None:
    from flwr.common.config import validate_config

    release = installed_release()
    app = write_app_dir(
        tmp_path / "my-app", app=AppSpec(),
        run_config_defaults={"num-rounds": 2, "result-dir": "out"},
    )
    pyproject = tomllib.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(pyproject, check_module=True, project_dir=app)
    assert ok, errors
    assert pyproject["tool"]["flwr"]["app"]["config"] == {
        "num-rounds": 2, "result-dir": "out", VERSION_KEY: release.version,
        APP_HASH_KEY: release.app_hash,
    }
    # the bundle pins the release it was made for, not only Flower
    assert f"fedcrm=={release.version}" in pyproject["project"]["dependencies"]
    assert sorted(p.name for p in app.iterdir()) == ["pyproject.toml"]
    with pytest.raises(DeploymentError, match="secret"):
        write_app_dir(tmp_path / "other", app=AppSpec(serverapp="a:b", clientapp="c:d"),
                      run_config_defaults={"private-key-path": "/keys/acme.key"})
    with pytest.raises(DeploymentError, match="app directory name"):
        write_app_dir(tmp_path / "my_app", app=AppSpec(serverapp="a:b", clientapp="c:d"))


def test_a_firm_runs_only_the_bundle_of_the_release_it_installed() -> None:
    """The one check a firm's ClientApp process makes before it answers a run."""
    mine = installed_release()
    fedcrm_bundle = {"tool": {"flwr": {"app": {"components": {"clientapp": FEDCRM_CLIENTAPP}}}}}
    declared = {VERSION_KEY: mine.version, APP_HASH_KEY: mine.app_hash}
    files = ["pyproject.toml", ".info/CONTENT"]

    def refusal(**changes: object) -> BundleRefusal | None:
        args: dict[str, Any] = {"files": files, "pyproject": fedcrm_bundle,
                                "run_config": declared, "clientapp": FEDCRM_CLIENTAPP,
                                "release": mine}
        return bundle_refusal(**{**args, **changes})

    assert refusal() is None
    shipped = refusal(files=[*files, "rogue/client.py"])
    assert shipped is not None and shipped.kind is Refusal.NOT_THE_APP
    assert "rogue/client.py" in shipped.detail
    other_app = refusal(pyproject={"tool": {"flwr": {"app": {"components": {
        "clientapp": "rogue.client:app"}}}}})
    assert other_app is not None and other_app.kind is Refusal.NOT_THE_APP
    for changed in ({VERSION_KEY: "9.9.9"}, {APP_HASH_KEY: "0" * 64}, {}):
        other = refusal(run_config={**declared, **changed} if changed else {})
        assert other is not None and other.kind is Refusal.OTHER_RELEASE
        assert mine.version in other.detail and "Install the same fedcrm release" in other.detail
    assert len(mine.app_hash) == 64 and mine == installed_release()


def test_flwr_config_names_the_connection_and_its_ca(tmp_path: Path) -> None:
    path = write_flwr_config(tmp_path / "home", "coord", "127.0.0.1:9093", tmp_path / "ca.crt")
    write_flwr_config(tmp_path / "home", "other", "10.0.0.2:9093", tmp_path / "ca.crt")
    config = tomllib.loads(path.read_text())
    assert config["superlink"]["default"] == "other"
    assert config["superlink"]["coord"] == {
        "address": "127.0.0.1:9093", "root-certificates": str((tmp_path / "ca.crt").resolve())
    }


# ---------------------------------------------------------------- fast: run status
def test_a_flower_run_is_reported_completed_only_when_it_finished_completed() -> None:
    states = {
        text: RunStatus(run_id=7, status_text=text).state
        for text in ("finished:completed", "finished:failed", "finished:stopped",
                     "finished:something-new", "running", "pending", "")
    }
    assert states == {
        "finished:completed": RunState.COMPLETED, "finished:failed": RunState.FAILED,
        "finished:stopped": RunState.STOPPED, "finished:something-new": RunState.FAILED,
        "running": RunState.UNFINISHED, "pending": RunState.UNFINISHED, "": RunState.UNFINISHED,
    }
    assert [text for text in states if RunStatus(7, text).completed] == ["finished:completed"]


# ---------------------------------------------------------------- slow: real SuperLink
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_node_with_an_unregistered_key_is_refused_while_a_registered_one_connects(
    tmp_path: Path, write_firm: Callable[..., Path]
) -> None:
    """The rogue firm goes through `fedcrm node start`: one clear line and a non-zero exit."""
    from typer.testing import CliRunner

    from fedcrm.cli import app
    from fedcrm.data.contract import load_firm_config
    from fedcrm.data.prepare import prepare

    rogue_config = write_firm(firm="rogue")
    prepare(load_firm_config(rogue_config))
    ca = generate_ca(tmp_path / "certs", common_name="test CA")
    certs = issue_server_cert(ca, tmp_path / "certs")
    good = generate_node_auth_key(tmp_path / "keys", firm="good")
    rogue = generate_node_auth_key(tmp_path / "keys", firm="rogue")
    cli_home = tmp_path / "cli"
    with ProcessGroup() as group:
        link = start_superlink(workdir=tmp_path / "link", certs=certs, group=group)
        write_flwr_config(cli_home, "t", link.address, ca.cert)
        good_id = register_node(
            flwr_home=cli_home, connection_name="t", public_key_path=good.public_key
        )
        good_node = start_supernode(
            superlink_address=link.address, root_cert=ca.cert, auth_key=good.private_key,
            node_config={"firm": "good"}, workdir=tmp_path / "good", max_retries=2,
            max_wait_time=20, group=group,
        )
        refused = CliRunner().invoke(app, [
            "node", "start", "--config", str(rogue_config), "--superlink", link.address,
            "--ca", str(ca.cert), "--auth-key", str(rogue.private_key),
            "--workdir", str(tmp_path / "rogue-node"), "--max-retries", "2",
            "--max-wait-time", "20",
        ])
        assert refused.exit_code == 8, refused.output
        errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, refused.output
        assert "firm 'rogue'" in errors[0] and "exit code 305" in errors[0]
        assert "fedcrm link register" in errors[0] and "Traceback" not in refused.output
        rogue_log = tmp_path / "rogue-node" / "supernode-rogue.log"
        assert f"Exit Code: {SUPERNODE_CONNECTION_ERROR}" in rogue_log.read_text()
        deadline = time.monotonic() + 60
        while (statuses := node_statuses(flwr_home=cli_home, connection="t")).get(
            good_id
        ) != "online":
            assert good_node.poll() is None, good_node.log_tail()
            assert time.monotonic() < deadline, "registered node never came online"
            time.sleep(2)
        assert good_node.poll() is None
        assert statuses == {good_id: "online"}  # the rogue key never became a node
    assert_all_gone(tmp_path)


@pytest.mark.extended
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_node_that_fails_to_start_is_reported_and_every_process_is_stopped(
    tmp_path: Path,
) -> None:
    nodes = StandInNodes(failing=frozenset({"beta"}))
    events: list[DeployEvent] = []
    with pytest.raises(DeploymentError, match="supernode-beta: cannot read"):
        deploy_local(
            firms=_unregistered(), workdir=tmp_path / "deploy", rounds=2, run_config={},
            start_node=nodes, on_event=events.append,
        )
    # alpha's node and the SuperLink were up when beta failed; both went with the failure
    assert [p.name for p in nodes.started] == ["supernode-alpha"]
    assert [e.firm for e in events if e.kind is DeployEventKind.NODE_STARTED] == ["alpha"]
    assert DeployEventKind.SUPERLINK_STARTED in [e.kind for e in events]
    assert DeployEventKind.RUN_STARTED not in [e.kind for e in events]
    assert events[-1].kind is DeployEventKind.STOPPED
    assert all(p.poll() is not None for p in nodes.started)
    assert_all_gone(tmp_path)


@pytest.mark.extended
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_interrupt_once_the_nodes_are_up_stops_every_process(tmp_path: Path) -> None:
    nodes = StandInNodes()
    events: list[DeployEvent] = []

    def press_ctrl_c(event: DeployEvent) -> None:
        events.append(event)
        if event.kind is DeployEventKind.NODES_ONLINE:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        deploy_local(
            firms=_unregistered(), workdir=tmp_path / "deploy", rounds=2, run_config={},
            start_node=nodes, on_event=press_ctrl_c,
        )
    assert [p.name for p in nodes.started] == ["supernode-alpha", "supernode-beta"]
    assert [e.kind for e in events][-2:] == [DeployEventKind.NODES_ONLINE,
                                             DeployEventKind.STOPPED]
    assert all(p.poll() is not None for p in nodes.started)
    superlink_log = tmp_path / "deploy" / "superlink" / "superlink.log"
    assert "--enable-supernode-auth" in superlink_log.read_text()
    assert_all_gone(tmp_path)


# ---------------------------------------------------------------- fast: the firms' one door
def test_the_fleet_gateway_forwards_only_the_fleet_api(tmp_path: Path) -> None:
    """A firm that dials the coordinator reaches Flower's Fleet API and nothing else: no
    ``flwr run`` (Control API), no node (un)registration, no ServerApp Runtime API."""
    from starlette.testclient import TestClient

    from fedcrm.coordinator.fleet_gateway import NOT_SERVED, create_app

    ca = generate_ca(tmp_path / "certs", common_name="test CA")
    upstream = f"127.0.0.1:{free_port()}"  # nothing listens there: the SuperLink is down
    with TestClient(create_app(upstream=upstream, ca_cert=str(ca.cert))) as client:
        for path in ("/v1/control/start-run", "/v1/control/register-node",
                     "/v1/control/unregister-node", "/v1/runtime/pull-messages", "/health",
                     "/v1/fleet/../control/start-run"):
            answer = client.post(path, content=b"\x00")
            assert answer.status_code == 404, path
            assert NOT_SERVED in answer.text
        assert client.get("/v1/fleet/pull-messages").status_code == 404  # Fleet is POST only
        # a Fleet call is forwarded; the SuperLink being down is a 503 a SuperNode retries
        assert client.post("/v1/fleet/pull-messages", content=b"\x00").status_code == 503


def test_a_process_reports_only_its_own_session_and_writes_private_files(
    tmp_path: Path,
) -> None:
    log = tmp_path / "node.log"
    log.write_text("SuperNode ID: 1\nExit Code: 305\n")  # an earlier session's tail
    script = (
        "import os; open('state.db', 'w').write('x'); "
        "print('SuperNode ID', ': 2', sep='', flush=True)"
    )
    proc = ManagedProcess(name="node", argv=[sys.executable, "-c", script], env=dict(os.environ),
                          log_path=log, cwd=tmp_path)
    with proc:
        assert proc.wait(timeout=20) == 0
    assert "SuperNode ID: 2" in proc.read_log() and "SuperNode ID: 1" not in proc.read_log()
    assert proc.flower_exit_code() is None  # the old 305 is not this session's
    assert "SuperNode ID: 1" in log.read_text()  # the log itself keeps every session
    for written in (log, tmp_path / "state.db"):
        assert written.stat().st_mode & 0o777 == 0o600, written


# ---------------------------------------------------------------- fast: command line
def test_certs_print_the_ca_fingerprint_and_keep_ca_key_out_of_the_superlinks_folder(
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from fedcrm.cli import app
    from fedcrm.privacy.certs import certificate_fingerprint

    runner = CliRunner()
    offline, link = tmp_path / "offline", tmp_path / "link-certs"
    made = runner.invoke(app, ["certs", "ca", "--out", str(offline)], terminal_width=200)
    assert made.exit_code == 0, made.output
    fingerprint = certificate_fingerprint(offline / "ca.crt")
    assert fingerprint.startswith("SHA256:") and len(fingerprint.split(":")) == 33
    assert fingerprint in made.output and "offline" in made.output
    issued = runner.invoke(app, ["certs", "server", "--ca", str(offline), "--out", str(link)])
    assert issued.exit_code == 0, issued.output
    assert sorted(p.name for p in link.iterdir()) == ["ca.crt", "server.crt", "server.key"]
    shown = runner.invoke(app, ["certs", "fingerprint", str(link / "ca.crt")],
                          terminal_width=200)
    assert shown.exit_code == 0 and fingerprint in shown.output


def test_user_text_is_never_read_as_markup(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedcrm.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["certs", "ca", "--out", str(tmp_path / "c")]).exit_code == 0
    weird = tmp_path / "[bold]x[/bold]"
    result = runner.invoke(app, ["certs", "fingerprint", str(weird)], terminal_width=300)
    assert result.exit_code != 0 and "[bold]x[/bold]" in result.output


def test_the_live_display_prints_plain_lines_without_a_terminal(tmp_path: Path) -> None:
    """Under nohup or systemd the progress goes to the log, one line per event."""
    import io

    from rich.console import Console

    from fedcrm.coordinator.events import (
        EventLog,
        FirmDropped,
        RoundTrained,
        RunFinished,
        RunStarted,
    )
    from fedcrm.coordinator.live import RunDisplay

    sink = io.StringIO()
    console = Console(file=sink, force_terminal=False, width=200)
    events = EventLog(tmp_path / "events.jsonl")
    with RunDisplay(events.path, console=console, title="run-[x]"):
        events.emit(RunStarted(run_id="r", task="churn", strategy="fedavg", rounds=2))
        events.emit(FirmDropped(round=1, firm="beta", node_id=8, reason="[gone]"))
        events.emit(RoundTrained(round=1, accepted=("alpha",), rejected=0, dropped=("beta",),
                                 epsilon={"alpha": 0.2}, epsilon_cap={"alpha": 1.0}))
        events.emit(RunFinished(status="completed", reason="", model=None))
        time.sleep(1.0)
    printed = sink.getvalue()
    assert "run-[x]: 2 rounds" in printed and "[ROUND 1/2] trained" in printed
    assert "beta dropped: [gone]" in printed and "finished: completed" in printed
    assert (tmp_path / "events.jsonl").stat().st_mode & 0o777 == 0o600


def test_runs_list_finds_the_coordinators_runs_and_unfinished_ones(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedcrm.cli import app
    from fedcrm.coordinator.events import EventLog, RoundTrained, RunStarted

    (tmp_path / "coordinator.toml").write_text('[link]\nworkdir = "link"\ncerts_dir = "c"\n')
    run_dir = tmp_path / "link" / "runs" / "cut-short"
    events = EventLog(run_dir / "events.jsonl")
    events.emit(RunStarted(run_id="cut-short", task="churn", strategy="fedavg", rounds=5))
    events.emit(RoundTrained(round=2, accepted=(), rejected=0, dropped=(), epsilon={},
                             epsilon_cap={}))
    runner = CliRunner()
    for args in (["--coordinator", str(tmp_path / "coordinator.toml")],
                 ["--root", str(tmp_path / "link" / "runs")]):
        listed = runner.invoke(app, ["runs", "list", *args], terminal_width=200)
        assert listed.exit_code == 0, listed.output
        assert "cut-short" in listed.output and "2/5" in listed.output
        assert "interrupted" in listed.output
