"""A firm's node in a federation, with no Flower in it.

The firm's Flower ClientApp (:mod:`fedcrm.clients.client_app`) decodes a message into a typed
request of :mod:`fedcrm.protocol`, calls :meth:`FirmNode.describe` / :meth:`FirmNode.train` /
:meth:`FirmNode.evaluate` and encodes the typed reply. Everything a firm decides - its budget, its
keys, its data, its policy - stays here, on the firm's machine.

**The run contract.** At its first round of a run the firm plans the whole run
(:func:`fedcrm.release.plan_run`): DP-SGD for the run's rounds and the evaluations it will answer,
calibrated together to fit ``min(cap, spent + the run's target ε)``, persisted next to its
ledger with a fingerprint of the run's parameters. After that it refuses a round outside the
plan, a round it already trained, a request whose run parameters changed, an evaluation beyond
the plan, of a model it did not receive for training in that round, or a second one in a round.

**What leaves.** A training round is one DP release (:func:`fedcrm.release.release`) of the
updated model; an evaluation is one Gaussian release of the task's bounded-contribution
statistics with discrete Gaussian noise on counts; a step of a DP tree run
(:meth:`FirmNode.grow_trees`, planned whole at its first request like a run) is one Gaussian
release of the step's bounded (G, H) sums. Sizes leave only as the firm's declared
public size (``[federation] public_size``): sampling rates, FedAvg weights and normalisation use
it, never the exact count. Every reply field is listed in ``docs/privacy.md``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from fedcrm.audit.log import EntryKind
from fedcrm.data.contract import FirmConfig, load_firm_config
from fedcrm.data.store import PreparedStore, load_store
from fedcrm.learning.dp_engine import noise_generator, train_dp
from fedcrm.learning.dp_trees import (
    TreeEnsemble,
    TreeStep,
    check_request,
    privatise,
    step_statistics,
)
from fedcrm.learning.models import arrays_to_model, model_to_arrays
from fedcrm.learning.settings import ChurnModelKind, TreeSettings
from fedcrm.privacy.durable import write_private
from fedcrm.privacy.errors import BudgetExhausted, ConfigError, FedcrmError, PlanDoesNotFit
from fedcrm.privacy.keys import FirmKeys, load_keys
from fedcrm.privacy.noise import discrete_gaussian, gaussian
from fedcrm.protocol import (
    DescribeReply,
    DescribeRequest,
    EvaluateReply,
    EvaluateRequest,
    ReplyState,
    RunSpec,
    TaskKind,
    TrainReply,
    TrainRequest,
    TreesReply,
    TreesRequest,
    arrays_hash,
)
from fedcrm.release import FirmPrivacy, RunPlan, TreesPlan, plan_run, plan_trees, release
from fedcrm.tasks import task_for
from fedcrm.tasks.base import TaskData
from fedcrm.tasks.churn import ChurnData

#: The ledger purpose of a federated DP tree run's releases.
TREES_PURPOSE = "train:churn-trees"

_NODES: dict[tuple[str, float], FirmNode] = {}


class Declined(FedcrmError):
    """The firm's own policy or the run contract refuses a request (its reply says why)."""

    def __init__(self, detail: str, state: ReplyState = ReplyState.DECLINED) -> None:
        super().__init__(detail)
        self.state = state


def spec_fingerprint(spec: RunSpec) -> str:
    """sha256 of the run's parameters as the firm received them at its first round."""
    return hashlib.sha256(json.dumps(spec.to_config(), sort_keys=True).encode()).hexdigest()


class FirmNode:
    """One firm's node: its config, keys, privacy state and decrypted examples (cached)."""

    def __init__(self, cfg: FirmConfig, keys: FirmKeys) -> None:
        self.cfg = cfg
        self.keys = keys
        self.privacy = FirmPrivacy(cfg, keys)
        self._data: dict[tuple[TaskKind, str], tuple[str, TaskData]] = {}

    @classmethod
    def open(cls, firm_config: Path | str) -> FirmNode:
        """Open (or reuse, within this process) the node for a firm config path."""
        path = Path(firm_config).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"node config points at {path}, which does not exist")
        key = (str(path), path.stat().st_mtime)
        node = _NODES.get(key)
        if node is None:
            cfg = load_firm_config(path)
            node = cls(cfg, load_keys(cfg.firm.keys_dir))
            _NODES[key] = node
        return node

    @property
    def firm(self) -> str:
        return self.cfg.firm.name

    @property
    def public_size(self) -> int:
        size = self.cfg.federation.public_size
        if size is None:
            raise ConfigError(
                f"{self.cfg.config_path}: declare [federation] public_size, a public upper bound "
                "on your number of customers: federated runs sample and weight by it so that "
                "the exact count never leaves the firm"
            )
        return size

    def store(self) -> PreparedStore:
        return load_store(self.cfg.prepared_dir, keys=self.keys)

    def task_data(self, kind: TaskKind, schema: str = "") -> TaskData:
        """This firm's examples for a task (in a run's public ``schema``, or its own declared
        layout for local work), rebuilt only when the prepared store changed."""
        store = self.store()
        cached = self._data.get((kind, schema))
        if cached is None or cached[0] != store.store_hash:
            cached = (store.store_hash, task_for(kind).firm_data(self.cfg, store, schema=schema))
            self._data[(kind, schema)] = cached
        return cached[1]

    def _federated_data(self, kind: TaskKind, schema: str) -> TaskData:
        if kind is TaskKind.CHURN and not schema:
            raise Declined(
                "the coordinator sent no public feature schema for this churn run; this firm "
                "trains a shared model only on a run's declared schema, never on its own ranges"
            )
        return self.task_data(kind, schema)

    # ------------------------------------------------------------------ the run contract

    def _plan_path(self, run_id: str) -> Path:
        return self.privacy.files.ledger.parent / "runs" / f"{run_id}.plan.json"

    def _run_plan(self, spec: RunSpec, *, create: bool) -> RunPlan:
        """The run's plan: made at the firm's first round, then held to (see the module doc)."""
        fingerprint = spec_fingerprint(spec)
        path = self._plan_path(spec.run_id)
        if path.exists():
            plan = RunPlan.from_json(json.loads(path.read_text()))
            if plan.spec_fingerprint != fingerprint:
                raise Declined(
                    f"run {spec.run_id}'s parameters changed after this firm planned it (rounds, "
                    "target ε, training settings, evaluations or schema); the firm holds to the "
                    "plan it made at its first round"
                )
            return plan
        if not create:
            raise Declined(f"this firm has not trained in run {spec.run_id}; nothing to evaluate")
        policy = self.cfg.federation
        evaluations = min(spec.evaluations, policy.max_evaluations) if policy.evaluate else 0
        plan = plan_run(
            self.privacy,
            spec_fingerprint=fingerprint,
            n_examples=self.public_size,
            epsilon=spec.target_epsilon,
            settings=spec.dp_sgd(),
            rounds=spec.rounds,
            evaluations=evaluations,
            evaluation_share=policy.evaluation_share,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, json.dumps(plan.to_json()).encode())
        return plan

    def _released(self, run_id: str, purpose: str) -> dict[int, dict[str, object]]:
        """This run's releases of one purpose, by round (from the ledger, the source of truth)."""
        return {
            int(e.context["round"]): dict(e.context)
            for e in self.privacy.ledger.events
            if e.purpose == purpose and e.context.get("run_id") == run_id
        }

    # ------------------------------------------------------------------ messages

    def describe(self, request: DescribeRequest) -> DescribeReply:
        return self._federated_data(request.task, request.schema).describe(
            self.firm, public_size=self.public_size
        )

    def train(self, request: TrainRequest) -> TrainReply:
        """One federated training round on this firm's data: one DP release."""
        torch.set_num_threads(1)
        spec = request.spec
        try:
            plan = self._run_plan(spec, create=True)
            purpose = f"train:{spec.task.value}"
            trained = self._released(spec.run_id, purpose)
            if not 1 <= request.server_round <= plan.training.rounds:
                raise Declined(
                    f"round {request.server_round} is outside run {spec.run_id}'s plan of "
                    f"{plan.training.rounds} rounds"
                )
            if request.server_round in trained or len(trained) >= plan.training.rounds:
                raise Declined(
                    f"round {request.server_round} of run {spec.run_id} was already trained "
                    f"({len(trained)} of {plan.training.rounds} rounds done)"
                )
            problem = self._federated_data(spec.task, spec.schema).training_problem(
                model=spec.model, seed=spec.seed
            )
            model = arrays_to_model(problem.model, request.arrays)
            received = arrays_hash(request.arrays)
            event = plan.training.round_event(
                purpose=purpose,
                context={
                    "run_id": spec.run_id, "round": request.server_round,
                    "task": spec.task.value, "global_hash": received,
                },
            )
            global_params = [p.detach().clone() for p in model.parameters()]
            proximal = (global_params, spec.proximal_mu) if spec.proximal_mu > 0 else None

            def compute() -> list[np.ndarray]:
                train_dp(
                    model,
                    torch.as_tensor(problem.x),
                    torch.as_tensor(problem.y),
                    per_sample_loss=problem.loss,
                    plan=plan.training,
                    generator=noise_generator(),
                    optimizer=spec.optimizer,
                    proximal=proximal,
                )
                return model_to_arrays(model)

            released = release(
                self.privacy,
                event,
                compute,
                funded=lambda arrays: (
                    EntryKind.UPDATE_SENT,
                    {
                        "run_id": spec.run_id,
                        "round": request.server_round,
                        "task": spec.task.value,
                        "model_hash": arrays_hash(arrays),
                    },
                ),
            )
        except (PlanDoesNotFit, BudgetExhausted) as exc:
            return self._declined_training(str(exc), ReplyState.BUDGET_EXHAUSTED)
        except Declined as exc:
            return self._declined_training(str(exc), exc.state)
        head = released.audit_head
        return TrainReply(
            firm=self.firm,
            state=ReplyState.OK,
            detail="",
            arrays=released.value,
            num_examples=self.public_size,
            epsilon_round=float(event.epsilon),
            epsilon_total=released.epsilon_total,
            epsilon_cap=self.privacy.cap,
            delta=self.privacy.delta,
            audit_head_hash=head.hash,
            audit_head_length=head.length,
        )

    def _declined_training(self, detail: str, state: ReplyState) -> TrainReply:
        head = self.privacy.head()
        return TrainReply(
            firm=self.firm,
            state=state,
            detail=detail,
            arrays=None,
            num_examples=self.public_size,
            epsilon_round=0.0,
            epsilon_total=self.privacy.spent(),
            epsilon_cap=self.privacy.cap,
            delta=self.privacy.delta,
            audit_head_hash=head.hash,
            audit_head_length=head.length,
        )

    def evaluate(self, request: EvaluateRequest) -> EvaluateReply:
        """A DP evaluation of the model this firm trained on in this round, if its policy and
        the run's plan allow one more."""
        torch.set_num_threads(1)
        spec = request.spec
        purpose = f"evaluate:{spec.task.value}"
        try:
            if not self.cfg.federation.evaluate:
                raise Declined(
                    "this firm does not answer evaluations ([federation] evaluate = false)"
                )
            plan: RunPlan | TreesPlan = (
                self._trees_plan(spec) if spec.model is ChurnModelKind.TREES
                else self._run_plan(spec, create=False)
            )
            evaluated = self._released(spec.run_id, purpose)
            model_hash = arrays_hash(request.arrays)
            trained = (TREES_PURPOSE if spec.model is ChurnModelKind.TREES
                       else f"train:{spec.task.value}")
            received = self._released(spec.run_id, trained).get(
                request.server_round, {}
            ).get("global_hash")
            if received != model_hash:
                raise Declined(
                    "this firm evaluates only the global model it received for training in the "
                    f"same round (round {request.server_round})"
                )
            if request.server_round in evaluated:
                raise Declined(f"round {request.server_round} was already evaluated")
            if len(evaluated) >= plan.evaluations:
                raise Declined(
                    f"this firm's plan for run {spec.run_id} has {plan.evaluations} evaluations, "
                    "all answered"
                )
            statistics = self._federated_data(spec.task, spec.schema).evaluation(
                request.arrays, model=spec.model
            )
            noise_std = plan.evaluation_noise * statistics.l2_sensitivity
            event = plan.evaluation_event(
                delta=self.privacy.delta, purpose=purpose,
                context={"run_id": spec.run_id, "round": request.server_round,
                         "task": spec.task.value, "model_hash": model_hash},
            )

            def compute() -> dict[str, tuple[float, ...]]:
                noisy = {}
                for name, values in statistics.values.items():
                    if statistics.integer:
                        noise = discrete_gaussian(len(values), noise_std)
                        noisy[name] = tuple(float(v) for v in np.rint(values) + noise)
                    else:
                        noisy[name] = tuple(
                            float(v) for v in values + gaussian(len(values), noise_std)
                        )
                return noisy

            released = release(self.privacy, event, compute)
        except (PlanDoesNotFit, BudgetExhausted) as exc:
            return self._declined_evaluation(str(exc), ReplyState.BUDGET_EXHAUSTED)
        except Declined as exc:
            return self._declined_evaluation(str(exc), exc.state)
        return EvaluateReply(
            firm=self.firm,
            state=ReplyState.OK,
            detail="",
            statistics=released.value,
            noise_std=noise_std,
            epsilon=float(event.epsilon),
            epsilon_total=released.epsilon_total,
        )

    def _declined_evaluation(self, detail: str, state: ReplyState) -> EvaluateReply:
        return EvaluateReply(
            firm=self.firm, state=state, detail=detail, statistics={}, noise_std=0.0,
            epsilon=0.0, epsilon_total=self.privacy.spent(),
        )


    # ------------------------------------------------------------------ DP trees

    def _trees_plan(self, spec: RunSpec, settings: TreeSettings | None = None,
                    schedule_of: ChurnData | None = None) -> TreesPlan:
        """The tree run's plan: made at the firm's first request (``settings`` and the data
        given), then held to, like :meth:`_run_plan`."""
        fingerprint = spec_fingerprint(spec)
        path = self._plan_path(spec.run_id).with_name(f"{spec.run_id}.trees-plan.json")
        if path.exists():
            plan = TreesPlan.from_json(json.loads(path.read_text()))
            if plan.spec_fingerprint != fingerprint or (
                settings is not None and plan.settings_fingerprint != _settings_fingerprint(
                    settings)
            ):
                raise Declined(
                    f"run {spec.run_id}'s parameters changed after this firm planned it (rounds, "
                    "target ε, tree settings, evaluations or schema); the firm holds to the "
                    "plan it made at its first request"
                )
            return plan
        if settings is None or schedule_of is None:
            raise Declined(f"this firm has not trained in run {spec.run_id}; nothing to evaluate")
        policy = self.cfg.federation
        plan = plan_trees(
            self.privacy,
            schedule=schedule_of.tree_schedule(settings, seed=spec.seed),
            epsilon=spec.target_epsilon,
            spec_fingerprint=fingerprint,
            settings_fingerprint=_settings_fingerprint(settings),
            evaluations=min(spec.evaluations, policy.max_evaluations) if policy.evaluate else 0,
            evaluation_share=policy.evaluation_share,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, json.dumps(plan.to_json()).encode())
        return plan

    def grow_trees(self, request: TreesRequest) -> TreesReply:
        """One step of a federated DP tree run: this firm's noisy (G, H) sums, one release."""
        spec, settings = request.spec, request.settings
        step = TreeStep(request.server_round, request.level)
        try:
            if spec.task is not TaskKind.CHURN or spec.model is not ChurnModelKind.TREES:
                raise Declined("a trees request must belong to a churn run with model = trees")
            if settings.rounds != spec.rounds:
                raise Declined(f"the tree settings plan {settings.rounds} rounds, the run "
                               f"{spec.rounds}")
            data = self._federated_data(spec.task, spec.schema)
            if not isinstance(data, ChurnData):
                raise Declined("a trees request must belong to a churn run")
            plan = self._trees_plan(spec, settings, data)
            schedule = data.tree_schedule(settings, seed=spec.seed)
            if step not in schedule.steps:
                raise Declined(
                    f"step (round {step.round}, level {step.level}) is outside run "
                    f"{spec.run_id}'s plan of {settings.rounds} rounds of depth {settings.depth}"
                )
            done = {(int(e.context["round"]), int(e.context["level"]))
                    for e in self.privacy.ledger.events
                    if e.purpose == TREES_PURPOSE and e.context.get("run_id") == spec.run_id}
            if (step.round, step.level) in done:
                raise Declined(f"round {step.round}, level {step.level} of run {spec.run_id} "
                               "was already released")
            try:
                ensemble = TreeEnsemble.from_arrays(request.arrays, complete=False)
                check_request(schedule, ensemble, step)
            except ConfigError as exc:
                raise Declined(f"refused the trees sent: {exc}") from None
            received = arrays_hash(ensemble.first(schedule.batch(step.round).start).to_arrays())
            noise_std = plan.noise.noise_std(schedule, step)
            event = plan.event(schedule, step, delta=self.privacy.delta, purpose=TREES_PURPOSE,
                               context={"run_id": spec.run_id, "task": spec.task.value,
                                        "global_hash": received})
            sums = step_statistics(schedule, ensemble, data.binned_train(schedule),
                                   data.y_train, step)
            released = release(
                self.privacy, event, lambda: privatise(sums, noise_std),
                funded=lambda noisy: (EntryKind.UPDATE_SENT, {
                    "run_id": spec.run_id, "round": step.round, "level": step.level,
                    "task": spec.task.value, "model_hash": arrays_hash([noisy]),
                }),
            )
        except (PlanDoesNotFit, BudgetExhausted) as exc:
            return self._declined_trees(str(exc), ReplyState.BUDGET_EXHAUSTED)
        except Declined as exc:
            return self._declined_trees(str(exc), exc.state)
        head = released.audit_head
        return TreesReply(
            firm=self.firm, state=ReplyState.OK, detail="", sums=released.value,
            num_examples=self.public_size, noise_std=noise_std, epsilon=float(event.epsilon),
            epsilon_total=released.epsilon_total, epsilon_cap=self.privacy.cap,
            delta=self.privacy.delta, audit_head_hash=head.hash, audit_head_length=head.length,
        )

    def _declined_trees(self, detail: str, state: ReplyState) -> TreesReply:
        head = self.privacy.head()
        return TreesReply(
            firm=self.firm, state=state, detail=detail, sums=np.zeros((0, 2)),
            num_examples=self.public_size, noise_std=0.0,
            epsilon=0.0, epsilon_total=self.privacy.spent(), epsilon_cap=self.privacy.cap,
            delta=self.privacy.delta, audit_head_hash=head.hash, audit_head_length=head.length,
        )


def _settings_fingerprint(settings: TreeSettings) -> str:
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()
