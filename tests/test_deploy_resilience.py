"""A deployed run survives restarts and names the firm at fault (fast: no Flower processes).

The ServerApp's Grid wrapper gives a reply the SuperLink wrote for a dead node to that node's
firm; the strategy guard takes a firm that stopped answering out of later rounds and records
updates a firm was charged for but that never arrived, and resent ones; a run resumes after
its last completed round from the checkpoint, with the same round numbers.
The real deployment, with a SuperLink restart and a killed firm, is ``test_deploy_real.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

from fedcrm.coordinator.events import (
    FirmDropped,
    RunEvent,
    UpdateAccepted,
    UpdateLost,
)
from fedcrm.coordinator.run_checkpoint import RunCheckpoint, load_checkpoint, save_checkpoint
from fedcrm.coordinator.run_config import RunConfig
from fedcrm.coordinator.run_state import FirmState, RoundRecord, restore_firms, summary
from fedcrm.flower.records import to_records
from fedcrm.learning.settings import ChurnModelKind, DpOptimizer
from fedcrm.protocol import MessageKind, ReplyState, RunSpec, TaskKind, TrainReply
from fedcrm.server.resume import CheckpointedRounds
from fedcrm.server.run_grid import RunGrid
from fedcrm.server.strategies import GuardedStrategy, build_strategy
from fedcrm.tasks import task_for

NODES = {7: "alpha", 8: "beta"}


@pytest.fixture(autouse=True)
def _a_serverapp_task() -> Iterator[None]:
    """Messages take their run and node from the task this process runs (as a ServerApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before
MODEL = [np.zeros((3, 1), np.float32), np.zeros(1, np.float32)]


class FakeGrid(Grid):
    """A Grid whose nodes answer with ``answer(request)`` (None: no reply yet)."""

    def __init__(self, answer: Callable[[Message], Message | None]) -> None:
        self.answer = answer
        self.sent: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:  # pragma: no cover - unused
        pass

    @property
    def run(self) -> Run:  # pragma: no cover - unused
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(NODES)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            mid = f"m{len(self.sent)}"
            message.metadata.__dict__["_message_id"] = mid
            self.sent[mid] = message
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [r for mid in message_ids if (r := self.answer(self.sent[mid])) is not None]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError


def _reply(request: Message, reply: TrainReply) -> Message:
    return Message(content=to_records(reply.encode()), reply_to=request)


def _train_reply(firm: str, *, replayed: bool = False,
                 released: tuple[int, ...] = ()) -> TrainReply:
    return TrainReply(
        firm=firm, state=ReplyState.OK, detail="", arrays=[a + 0.1 for a in MODEL],
        num_examples=100, epsilon_round=0.0 if replayed else 0.1, epsilon_total=0.2,
        epsilon_cap=1.0, delta=1e-5, replayed=replayed, rounds_released=released,
    )


def _node_unavailable(request: Message) -> Message:
    """What the SuperLink writes when the destination node missed its heartbeats."""
    reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"),
                    reply_to=request)
    reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    return reply


def _guard(events: list[RunEvent]) -> GuardedStrategy:
    cfg = RunConfig(rounds=3, min_firms=1, evaluate=False)
    spec = RunSpec(
        run_id="r", task=TaskKind.CHURN, rounds=3, model=ChurnModelKind.LOGISTIC,
        target_epsilon=1.0, local_epochs=1.0, batch_size=64, learning_rate=0.1,
        max_grad_norm=1.0, optimizer=DpOptimizer.SGD, proximal_mu=0.0, seed=0,
    )
    return GuardedStrategy(
        build_strategy(cfg), task=task_for(TaskKind.CHURN), spec=spec, evaluation_rounds=(),
        firms={n: FirmState(node_id=n, firm=f) for n, f in NODES.items()}, min_firms=1,
        max_update_norm=100.0, on_event=events.append,
    )


def _round(guard: GuardedStrategy, grid: Grid, rnd: int, *, timeout: float = 5.0) -> None:
    messages = guard.configure_train(rnd, ArrayRecord(MODEL), ConfigRecord(), grid)
    guard.aggregate_train(rnd, grid.send_and_receive(messages, timeout=timeout))


def test_a_reply_the_superlink_wrote_for_a_dead_node_names_that_firm_and_stops_it() -> None:
    events: list[RunEvent] = []
    guard = _guard(events)

    def answer(request: Message) -> Message:
        if request.metadata.dst_node_id == 8:
            return _node_unavailable(request)
        return _reply(request, _train_reply("alpha", released=(1,)))

    grid = RunGrid(FakeGrid(answer), poll_s=0.01)
    _round(guard, grid, 1)
    dropped = [e for e in events if isinstance(e, FirmDropped)]
    assert [(e.firm, e.node_id) for e in dropped] == [("beta", 8)]
    assert "Node Unavailable" in dropped[0].reason
    assert not any(getattr(e, "firm", "").startswith("node-") for e in events)
    assert guard.firms[8].excluded is not None
    assert guard.firms[8].excluded.startswith("dropped in round 1")
    # beta is not asked again; the summary shows it stopped
    assert [m.metadata.dst_node_id for m in guard.configure_train(
        2, ArrayRecord(MODEL), ConfigRecord(), grid)] == [7]
    firms = summary(RunConfig(rounds=3), run_id="r", status="completed", stop_reason="",
                    firms=list(guard.firms.values()), rounds=guard.rounds, updates=guard.updates,
                    model_path=None, model_hash="", started=time.time())["firms"]
    assert {f["firm"]: bool(f["stopped"]) for f in firms} == {"alpha": False, "beta": True}


def test_a_silent_firm_is_dropped_when_the_round_times_out() -> None:
    events: list[RunEvent] = []
    guard = _guard(events)

    def answer(request: Message) -> Message | None:
        if request.metadata.dst_node_id == 8:
            return None  # a killed node: nothing, until the SuperLink notices
        return _reply(request, _train_reply("alpha", released=(1,)))

    started = time.monotonic()
    _round(guard, RunGrid(FakeGrid(answer), poll_s=0.01), 1, timeout=0.5)
    assert time.monotonic() - started < 3
    dropped = [e for e in events if isinstance(e, FirmDropped)]
    assert [(e.firm, e.reason) for e in dropped] == [
        ("beta", "no reply before the round timeout")
    ]
    assert guard.firms[8].excluded is not None


def test_updates_a_firm_was_charged_for_but_never_sent_and_resent_ones_are_recorded() -> None:
    events: list[RunEvent] = []
    guard = _guard(events)

    def answer(request: Message) -> Message:
        firm = NODES[request.metadata.dst_node_id]
        if firm == "alpha":  # released round 1 in an attempt whose reply was lost
            return _reply(request, _train_reply("alpha", released=(1, 2)))
        return _reply(request, _train_reply("beta", replayed=True, released=(2,)))

    _round(guard, RunGrid(FakeGrid(answer), poll_s=0.01), 2)
    lost = [e for e in events if isinstance(e, UpdateLost)]
    assert [(e.firm, e.round) for e in lost] == [("alpha", 1)]
    replayed = [e for e in events if isinstance(e, UpdateAccepted) and e.replayed]
    assert [(e.firm, e.round) for e in replayed] == [("beta", 2)]
    assert guard.rounds[1].lost == ["alpha"] and guard.rounds[2].replayed == ["beta"]
    record = summary(RunConfig(rounds=3), run_id="r", status="completed", stop_reason="",
                     firms=list(guard.firms.values()), rounds=guard.rounds,
                     updates=guard.updates, model_path=None, model_hash="", started=time.time())
    assert record["lost_updates"] == [{"round": 1, "firm": "alpha"}]
    assert record["replayed_updates"] == [{"round": 2, "firm": "beta"}]
    # a second report of the same loss is not recorded twice
    _round(guard, RunGrid(FakeGrid(answer), poll_s=0.01), 3)
    assert guard.rounds[1].lost == ["alpha"]


class Recorder(Strategy):
    """An inner strategy that records the round numbers it is given."""

    def __init__(self) -> None:
        self.rounds: list[tuple[str, int]] = []

    def summary(self) -> None:
        pass

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.rounds.append(("train", server_round))
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return ArrayRecord([a + server_round for a in MODEL]), None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.rounds.append(("evaluate", server_round))
        return []

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        return None


def _checkpoint(completed: int, model: list[np.ndarray]) -> RunCheckpoint:
    return RunCheckpoint(
        run_id="r", config_hash="h", completed_round=completed, attempt=0, started=1.0,
        layout="L", input_dim=3,
        firms=(FirmState(node_id=7, firm="alpha", epsilon_total=0.3, rounds_trained=completed),
               FirmState(node_id=8, firm="beta", excluded="dropped in round 1: gone")),
        rounds={r: RoundRecord(r, accepted=["alpha"]) for r in range(1, completed + 1)},
        updates=({"round": 1, "firm": "alpha", "node_id": 7, "hash": "x"},),
        arrays=tuple(model),
    )


def test_a_resumed_run_continues_after_its_last_completed_round_from_the_checkpoint(
    tmp_path: Path,
) -> None:
    inner = Recorder()
    rounds = CheckpointedRounds(inner, completed=2, initial=MODEL, run_dir=tmp_path,
                                snapshot=_checkpoint)
    rounds.start(grid=RunGrid(FakeGrid(lambda m: None)), initial_arrays=ArrayRecord(MODEL),
                 num_rounds=2, timeout=1.0)
    assert inner.rounds == [("train", 3), ("evaluate", 3), ("train", 4), ("evaluate", 4)]
    saved = load_checkpoint(tmp_path)
    assert saved is not None and saved.completed_round == 4
    np.testing.assert_array_equal(saved.arrays[0], MODEL[0] + 4)  # round 4's aggregate
    assert saved.rounds[4].accepted == ["alpha"] and saved.firms[0].epsilon_total == 0.3
    assert (tmp_path / "checkpoint.json").stat().st_mode & 0o777 == 0o600
    # a torn pair (arrays from another write) is refused, not resumed from
    (tmp_path / "checkpoint.npz").write_bytes(b"other")
    with pytest.raises(Exception, match="does not match"):
        load_checkpoint(tmp_path)


def test_restored_firms_keep_their_budget_state_and_dropped_ones_come_back(
    tmp_path: Path,
) -> None:
    before = _checkpoint(1, MODEL)
    save_checkpoint(tmp_path, before)
    saved = load_checkpoint(tmp_path)
    assert saved is not None
    now = {11: FirmState(node_id=11, firm="alpha"), 12: FirmState(node_id=12, firm="beta")}
    restore_firms(now, saved.firms)
    assert now[11].epsilon_total == 0.3 and now[11].rounds_trained == 1
    assert now[12].excluded is None  # it had dropped out, and its node is back
    alone = {11: FirmState(node_id=11, firm="alpha")}
    restore_firms(alone, saved.firms)
    assert alone[8].firm == "beta" and alone[8].excluded is not None  # kept in the summary


def test_a_run_id_that_could_name_a_path_on_a_firm_is_refused() -> None:
    from fedcrm.protocol import ProtocolError

    good = RunSpec(
        run_id="run-1", task=TaskKind.CHURN, rounds=1, model=ChurnModelKind.LOGISTIC,
        target_epsilon=1.0, local_epochs=1.0, batch_size=64, learning_rate=0.1,
        max_grad_norm=1.0, optimizer=DpOptimizer.SGD, proximal_mu=0.0, seed=0,
    ).to_config()
    assert RunSpec.from_config(good).run_id == "run-1"
    for bad in ("../../keys/x", "a/b", "", ".hidden", "x" * 101):
        with pytest.raises(ProtocolError, match="run-id"):
            RunSpec.from_config({**good, "run-id": bad})


def test_a_train_reply_carries_its_resend_flag_and_released_rounds() -> None:
    from fedcrm.flower.records import from_records

    reply = _train_reply("alpha", replayed=True, released=(1, 3))
    decoded = TrainReply.decode(from_records(to_records(reply.encode())))
    assert decoded.replayed and decoded.rounds_released == (1, 3)
    assert MessageKind.TRAIN.value == "train"


# ---------------------------------------------------------------- a SuperLink that is restarting


def _fail_then(results: Iterable[object]) -> Callable[..., object]:
    """A stand-in for a flwr CLI call: raises the exceptions in ``results``, then returns."""
    queue = iter(results)

    def call(*_args: object, **_kwargs: object) -> object:
        result = next(queue)
        if isinstance(result, Exception):
            raise result
        return result

    return call


def test_a_status_that_cannot_be_read_while_following_is_a_superlink_restart_not_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a restart the SuperLink binds its port before its Control API serves (seen in CI:
    `flwr ls` said "unavailable" with the port open, and the run was ended as stopped): the
    follower reports the SuperLink, so the run waits for it and resumes."""
    import fedcrm.coordinator.flower_cli as cli
    from fedcrm.coordinator.processes import DeploymentError

    unavailable = DeploymentError("Connection to the SuperLink is unavailable")
    monkeypatch.setattr(cli, "_stream_log", lambda **_kw: None)
    for port_is_open in (True, False):
        monkeypatch.setattr(cli, "port_open", lambda _port, o=port_is_open: o)
        monkeypatch.setattr(cli, "run_status", _fail_then([unavailable]))
        with pytest.raises(cli.SuperLinkUnreachable):
            cli.follow_run(flwr_home=Path("."), connection="c", run_id=7, control_port=1)
    final = cli.RunStatus(run_id=7, status_text="finished:completed")
    monkeypatch.setattr(cli, "run_status", _fail_then([final]))
    assert cli.follow_run(flwr_home=Path("."), connection="c", run_id=7, control_port=1) is final


def test_resubmitting_waits_for_a_restarted_superlink_but_not_for_a_real_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedcrm.coordinator.flower_cli as cli
    from fedcrm.coordinator.processes import DeploymentError

    monkeypatch.setattr(cli, "port_open", lambda _port: True)
    monkeypatch.setattr(cli.time, "sleep", lambda _s: None)
    unavailable = DeploymentError("Connection to the SuperLink is unavailable")
    submit = _fail_then([unavailable, unavailable, 42])
    assert cli.submit_when_answering(submit, control_port=1) == 42  # type: ignore[arg-type]
    refused = DeploymentError("the app's run config key 'x' is not declared")
    with pytest.raises(DeploymentError, match="not declared"):
        cli.submit_when_answering(_fail_then([refused, 42]),  # type: ignore[arg-type]
                                  control_port=1)
