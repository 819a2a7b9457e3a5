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

**Restarts.** Each round's released update is kept next to the plan (0600), published only once
the release is committed and audited. When a restarted coordinator asks again for a round this
firm already trained, on the same global model, the firm sends that very update again: no new
release, no new charge, an ``update_resent`` entry in its log and ``replayed`` in the reply.
Every train reply lists the rounds of the run the firm released, so the coordinator records an
update it was charged for but never received.

**What leaves.** A training round is one DP release (:func:`fedcrm.release.release`) of the
updated model; an evaluation is one Gaussian release of the task's bounded-contribution
statistics with discrete Gaussian noise on counts; a step of a DP tree run
(:meth:`FirmNode.grow_trees`, planned whole at its first request like a run) is one Gaussian
release of the step's bounded (G, H) sums. Sizes leave only as the firm's declared
public size (``[federation] public_size``): sampling rates, FedAvg weights and normalisation use
it, never the exact count. Every reply field is listed in ``docs/privacy.md``.

**Secure aggregation.** In a run with ``secure_aggregation`` the round's DP update (charged and
logged exactly as above, its ``update_sent`` entry marked ``secure_sum``) stays on the firm: the
reply carries no arrays, and the firm adds ``public_size / weight_norm`` times its update (and
that weight) to the round's secure sum (:mod:`fedcrm.secure_sum_party`), so the coordinator sees
only the sum over the firms.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedcrm.analytics.overlap import OverlapSpec
from fedcrm.analytics.spec import QuerySpec
from fedcrm.analytics.statistics import firm_statistics
from fedcrm.answering import (
    QUERY_SUM,
    AnswerPlan,
    QueryDeclined,
    answer,
    answer_bound,
    answered_event,
    plan_answer,
)
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
from fedcrm.overlap import (
    OverlapDeclined,
    blind,
    check_size,
    plan_overlap,
    read_match_keys,
    reblind,
)
from fedcrm.privacy.durable import StagedFile, write_private
from fedcrm.privacy.errors import (
    BudgetExhausted,
    ConfigError,
    FedcrmError,
    KeyFileError,
    PlanDoesNotFit,
    SchemaError,
    SecureSumError,
)
from fedcrm.privacy.keys import FirmKeys, load_keys, load_peer_signing_keys
from fedcrm.privacy.noise import discrete_gaussian, gaussian
from fedcrm.protocol import (
    DescribeReply,
    DescribeRequest,
    EvaluateReply,
    EvaluateRequest,
    OverlapBlindReply,
    OverlapBlindRequest,
    OverlapMatches,
    OverlapOffer,
    OverlapOfferReply,
    OverlapReblindRequest,
    QueryAnswer,
    QueryAnswerRequest,
    QueryOffer,
    QueryOfferReply,
    ReplyState,
    RunSpec,
    SecureSumConfirmReply,
    SecureSumConfirmRequest,
    SecureSumKeysReply,
    SecureSumKeysRequest,
    SecureSumMaskReply,
    SecureSumMaskRequest,
    SecureSumQuery,
    SecureSumShareReply,
    SecureSumShareRequest,
    SecureSumUnmaskReply,
    SecureSumUnmaskRequest,
    SumInput,
    TaskKind,
    TrainReply,
    TrainRequest,
    TreesReply,
    TreesRequest,
    arrays_hash,
)
from fedcrm.release import (
    FirmPrivacy,
    RunPlan,
    TreesPlan,
    plan_run,
    plan_trees,
    release,
    resend,
)
from fedcrm.secure_sum_party import SecureSumParty
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
        self._peer_keys: dict[str, Ed25519PublicKey] | None = None
        self.secure_sum = SecureSumParty(
            keys, trusted=self._trusted_peers, audit=self.privacy.audit,
            state_dir=self.privacy.files.ledger.parent,
        )

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
            node = cls(cfg, load_keys(cfg.firm.keys_dir, firm=cfg.firm.name))
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
            if request.server_round in trained:
                return self._resend(spec, request, trained)
            if len(trained) >= plan.training.rounds:
                raise Declined(
                    f"round {request.server_round} of run {spec.run_id}: all "
                    f"{plan.training.rounds} planned rounds were already trained"
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
                stage=self._keep_update(spec.run_id, request.server_round),
                funded=lambda arrays: (
                    EntryKind.UPDATE_SENT,
                    {
                        "run_id": spec.run_id,
                        "round": request.server_round,
                        "task": spec.task.value,
                        "model_hash": arrays_hash(arrays),
                        **({"secure_sum": True} if spec.secure_aggregation else {}),
                    },
                ),
            )
            if spec.secure_aggregation:
                self._hold_update(spec.run_id, request.server_round, request.arrays,
                                  released.value)
        except (PlanDoesNotFit, BudgetExhausted) as exc:
            return self._declined_training(str(exc), ReplyState.BUDGET_EXHAUSTED, spec)
        except Declined as exc:
            return self._declined_training(str(exc), exc.state, spec)
        head = released.audit_head
        return TrainReply(
            firm=self.firm,
            state=ReplyState.OK,
            detail="",
            arrays=None if spec.secure_aggregation else released.value,
            num_examples=self.public_size,
            epsilon_round=float(event.epsilon),
            epsilon_total=released.epsilon_total,
            epsilon_cap=self.privacy.cap,
            delta=self.privacy.delta,
            audit_head_hash=head.hash,
            audit_head_length=head.length,
            secure_sum=spec.secure_aggregation,
            rounds_released=self._rounds_released(spec),
        )

    # ------------------------------------------------------------------ kept updates

    def _update_path(self, run_id: str, server_round: int) -> Path:
        return self._plan_path(run_id).with_name(f"{run_id}.round-{server_round}.update.npz")

    def _keep_update(
        self, run_id: str, server_round: int
    ) -> Callable[[list[np.ndarray]], StagedFile]:
        """Stage the round's update next to the run's plan (0600); it is published only after
        the release is committed and audited, so a kept update was always paid for."""

        def stage(arrays: list[np.ndarray]) -> StagedFile:
            path = self._update_path(run_id, server_round)
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = StagedFile(path)
            buffer = io.BytesIO()
            np.savez(buffer, *[np.asarray(a) for a in arrays])
            staged.path.write_bytes(buffer.getvalue())
            return staged

        return stage

    def _resend(
        self, spec: RunSpec, request: TrainRequest, trained: dict[int, dict[str, object]]
    ) -> TrainReply:
        """A round this firm already released: send the very same update again, no new charge.

        Only for the same global model it trained on then (a restarted coordinator resuming the
        run); a round is never trained twice.
        """
        r = request.server_round
        if trained[r].get("global_hash") != arrays_hash(request.arrays):
            raise Declined(
                f"round {r} of run {spec.run_id} was already trained, on another global model; "
                "a firm trains each round of a run once"
            )
        path = self._update_path(spec.run_id, r)
        if not path.exists():
            raise Declined(
                f"round {r} of run {spec.run_id} was released and charged, but its update was not "
                "kept (the node stopped while sending it); a firm trains each round of a run once"
            )
        with np.load(path, allow_pickle=False) as npz:
            arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        head = resend(self.privacy, run_id=spec.run_id, server_round=r,
                      model_hash=arrays_hash(arrays))
        if spec.secure_aggregation:  # the update goes (again) only into the round's secure sum
            self._hold_update(spec.run_id, r, request.arrays, arrays)
        return TrainReply(
            firm=self.firm,
            state=ReplyState.OK,
            detail="",
            arrays=None if spec.secure_aggregation else arrays,
            num_examples=self.public_size,
            epsilon_round=0.0,
            epsilon_total=self.privacy.spent(),
            epsilon_cap=self.privacy.cap,
            delta=self.privacy.delta,
            audit_head_hash=head.hash,
            audit_head_length=head.length,
            replayed=True,
            secure_sum=spec.secure_aggregation,
            rounds_released=self._rounds_released(spec),
        )

    def _rounds_released(self, spec: RunSpec) -> tuple[int, ...]:
        return tuple(sorted(self._released(spec.run_id, f"train:{spec.task.value}")))

    def _declined_training(self, detail: str, state: ReplyState, spec: RunSpec) -> TrainReply:
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
            rounds_released=self._rounds_released(spec),
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

    # ------------------------------------------------------------------ analytics queries

    def _query_plan(
        self, request: QueryOffer | QueryAnswerRequest
    ) -> tuple[QuerySpec, AnswerPlan]:
        spec = QuerySpec.from_json(request.spec)
        plan = plan_answer(self.privacy, self.cfg, spec, query_id=request.query_id,
                           secure=request.secure)
        return spec, plan

    def offer_query(self, request: QueryOffer) -> QueryOfferReply:
        """Whether this firm will answer a query: policy, columns, data and budget are checked;
        nothing is spent and nothing about the data leaves but yes or no (and why not)."""
        try:
            spec, _plan = self._query_plan(request)
            if request.secure:
                self.public_size  # noqa: B018 - a secure sum is sized by it: refuse without one
            firm_statistics(spec, self.store())  # the data can answer it (nothing leaves)
        except QueryDeclined as exc:
            state = ReplyState.BUDGET_EXHAUSTED if exc.budget else ReplyState.DECLINED
            return self._query_offer_reply(state, str(exc))
        except (SchemaError, ConfigError) as exc:
            return self._query_offer_reply(ReplyState.DECLINED, str(exc))
        return self._query_offer_reply(ReplyState.OK, "")

    def _query_offer_reply(self, state: ReplyState, detail: str) -> QueryOfferReply:
        size = self.cfg.federation.public_size or 0
        return QueryOfferReply(firm=self.firm, state=state, detail=detail,
                               epsilon_total=self.privacy.spent(), epsilon_cap=self.privacy.cap,
                               public_size=size)

    def answer_query(self, request: QueryAnswerRequest) -> QueryAnswer:
        """This firm's DP answer (plain mode), released through :func:`fedcrm.answering.answer`."""
        try:
            if request.secure:
                raise QueryDeclined(
                    "a query offered for the secure sum is answered only inside the secure sum, "
                    "never alone"
                )
            _spec, plan = self._query_plan(request)
            released = answer(self.privacy, self.store(), plan)
        except BudgetExhausted as exc:
            return self._declined_answer(ReplyState.BUDGET_EXHAUSTED, str(exc))
        except QueryDeclined as exc:
            state = ReplyState.BUDGET_EXHAUSTED if exc.budget else ReplyState.DECLINED
            return self._declined_answer(state, str(exc))
        except (SchemaError, ConfigError) as exc:
            return self._declined_answer(ReplyState.DECLINED, str(exc))
        return QueryAnswer(
            firm=self.firm, state=ReplyState.OK, detail="",
            values=[int(v) for v in released.value], noise_std=plan.noise_std,
            epsilon=float(plan.event.epsilon), epsilon_total=released.epsilon_total,
        )

    def _declined_answer(self, state: ReplyState, detail: str) -> QueryAnswer:
        return QueryAnswer(firm=self.firm, state=state, detail=detail, values=(), noise_std=0.0,
                           epsilon=0.0, epsilon_total=self.privacy.spent())

    # ------------------------------------------------------------------ secure sums

    def _trusted_peers(self) -> Mapping[str, Ed25519PublicKey]:
        if self._peer_keys is None:
            folder = self.cfg.federation.peer_keys_dir
            if folder is None:
                raise KeyFileError(
                    f"{self.cfg.config_path}: this firm holds no peers' signing keys, so it "
                    "cannot check their secure-sum keys; set [federation] peer_keys_dir to a "
                    "folder of <firm>.pub files (each peer's signing.pub, exchanged out of band)"
                )
            self._peer_keys = load_peer_signing_keys(folder)
        return self._peer_keys

    def _held_update_path(self, run_id: str, server_round: int) -> Path:
        # not the kept update of a resend (_update_path): this is its difference to the global
        return self._plan_path(run_id).with_name(
            f"{run_id}.round-{server_round}.secure-update.npz"
        )

    def _hold_update(self, run_id: str, server_round: int, global_arrays: Sequence[np.ndarray],
                     trained: Sequence[np.ndarray]) -> None:
        """Keep the round's released update (trained minus global) for the secure sum."""
        buffer = io.BytesIO()
        np.savez(buffer, *[np.asarray(t, dtype=np.float64) - np.asarray(g, dtype=np.float64)
                           for t, g in zip(trained, global_arrays, strict=True)])
        write_private(self._held_update_path(run_id, server_round), buffer.getvalue())

    def _query_sum_input(self, query: SecureSumQuery, *, release_now: bool) -> np.ndarray:
        """An analytics query's answer for a secure sum: everything is checked at the share
        step (nothing spent); the answer is released - charged, signed - only at the mask step,
        and then leaves only masked."""
        sum_spec = query.spec
        query_id = sum_spec.sum_id.run_id
        if sum_spec.sum_id.query != QUERY_SUM or sum_spec.sum_id.round != 0:
            raise SecureSumError(f"secure sum {sum_spec.sum_id.label()} is not a query's sum")
        spec = QuerySpec.from_json(query.query_spec)
        if spec.min_firms < 2 or len(sum_spec.parties) < spec.min_firms:
            raise SecureSumError(
                f"query {query_id}: a secure sum of {len(sum_spec.parties)} firm(s) cannot carry "
                f"the noise of min_firms={spec.min_firms} (at least 2)"
            )
        strangers = sorted(set(sum_spec.parties) - set(self._trusted_peers()) - {self.firm})
        if strangers:
            # a party without a signing key this firm holds could be made up: its noise share
            # cannot be counted on
            raise SecureSumError(
                f"query {query_id}: the secure sum names {len(strangers)} part(ies) this firm "
                "holds no signing key for (e.g. '" + strangers[0][:40] + "'); it counts only "
                "firms it can authenticate toward min_firms"
            )
        plan = plan_answer(self.privacy, self.cfg, spec, query_id=query_id, secure=True)
        need = answer_bound(plan, self.public_size)
        fp = sum_spec.fixed_point
        if sum_spec.length != plan.layout.length or fp.scale != 1 or not (
            fp.lower <= -need and fp.upper >= need
        ):
            raise SecureSumError(
                f"query {query_id}: the secure sum's length {sum_spec.length}, range "
                f"[{fp.lower:g}, {fp.upper:g}] or scale {fp.scale} do not fit this firm's answer "
                f"({plan.layout.length} integers within ±{need:g}, scale 1)"
            )
        if not release_now:
            return np.empty(0)
        self.secure_sum._claimed(sum_spec, "share")
        released = answer(self.privacy, self.store(), plan, public_size=self.public_size)
        return np.asarray(released.value, dtype=np.float64)

    def _sum_input(self, query: SecureSumQuery, *, release_now: bool = True) -> np.ndarray:
        """The firm's vector for a sum: for training, its weighted update and its weight; for
        a query, its DP answer with its share of the noise."""
        sum_id = query.spec.sum_id
        if query.source is SumInput.QUERY_ANSWER:
            return self._query_sum_input(query, release_now=release_now)
        if query.source is not SumInput.TRAINING_UPDATE:
            raise SecureSumError(f"this firm cannot add '{query.source.value}' to a secure sum")
        path = self._held_update_path(sum_id.run_id, sum_id.round)
        if not path.exists():
            raise SecureSumError(
                f"this firm holds no update of round {sum_id.round} of run {sum_id.run_id} for a "
                "secure sum (it did not train that round with secure aggregation)"
            )
        if query.weight_norm < self.public_size:
            raise SecureSumError(
                f"secure sum {sum_id.label()}: the weights' normaliser {query.weight_norm} is "
                f"below this firm's public size {self.public_size}"
            )
        weight = self.public_size / query.weight_norm
        with np.load(path) as held:
            update = [held[f"arr_{i}"].ravel() for i in range(len(held.files))]
        return np.concatenate([*(u * weight for u in update), [weight]])

    def secure_sum_keys(self, request: SecureSumKeysRequest) -> SecureSumKeysReply:
        return self.secure_sum.register(request)

    def secure_sum_share(self, request: SecureSumShareRequest) -> SecureSumShareReply:
        # refuse early a sum this firm has nothing for (a query: checked, nothing spent)
        self._sum_input(request.query, release_now=False)
        return self.secure_sum.share(request)

    def secure_sum_mask(self, request: SecureSumMaskRequest) -> SecureSumMaskReply:
        if request.query.source is SumInput.QUERY_ANSWER:
            # the answer is released only once the step's own checks have passed
            return self.secure_sum.mask(request, lambda: self._sum_input(request.query))
        return self.secure_sum.mask(request, self._sum_input(request.query))

    def _accepted_min_firms(self, query: SecureSumQuery) -> int:
        """The min_firms this firm masked its answer with (from its ledger, never from the
        coordinator's later requests), after checking the request names the same query."""
        query_id = query.spec.sum_id.run_id
        event = answered_event(self.privacy, query_id)
        if event is None or not event.context.get("secure"):
            raise SecureSumError(
                f"query {query_id}: this firm masked no answer for it; it confirms and reveals "
                "nothing"
            )
        if QuerySpec.from_json(query.query_spec).fingerprint() != event.context.get(
            "fingerprint"
        ):
            raise SecureSumError(
                f"query {query_id}: the query in this request differs from the one this firm "
                "answered; nothing is revealed"
            )
        return int(event.context["min_firms"])

    def secure_sum_confirm(self, request: SecureSumConfirmRequest) -> SecureSumConfirmReply:
        """The consistency step of an analytics sum: sign the one survivor list this firm
        accepts, only if it holds at least the min_firms its answer's noise share assumed."""
        if request.query.source is not SumInput.QUERY_ANSWER:
            raise SecureSumError("only an analytics query's secure sum has a confirm step")
        min_firms = self._accepted_min_firms(request.query)
        if len(set(request.survivors)) < min_firms:
            raise SecureSumError(
                f"query {request.query.spec.sum_id.run_id}: {len(set(request.survivors))} "
                f"firm(s) would be in the sum, fewer than min_firms={min_firms}; this firm "
                "confirms no such sum"
            )
        parties = len(request.query.spec.parties)
        return self.secure_sum.confirm(request, min_survivors=max(min_firms, parties // 2 + 1))

    def secure_sum_unmask(self, request: SecureSumUnmaskRequest) -> SecureSumUnmaskReply:
        query = request.query
        if query.source is SumInput.QUERY_ANSWER:
            min_firms = self._accepted_min_firms(query)
            if len(set(request.survivors)) < min_firms:
                # each firm added 1/min_firms of the noise: fewer answers would carry less
                raise SecureSumError(
                    f"query {query.spec.sum_id.run_id}: {len(set(request.survivors))} firm(s) "
                    f"are in the sum, fewer than min_firms={min_firms}; this firm reveals "
                    "nothing that would open it"
                )
            # one survivor list, confirmed by this firm and a majority of the parties
            return self.secure_sum.unmask(request, confirmed=True)
        return self.secure_sum.unmask(request)

    # ------------------------------------------------------------------ customer overlap

    def offer_overlap(self, request: OverlapOffer) -> OverlapOfferReply:
        """Whether this firm takes part in a customer-overlap count: policy, key, peer, size and
        budget are checked; nothing is spent and no key leaves."""
        try:
            spec = OverlapSpec.from_json(request.spec)
            plan = plan_overlap(self.privacy, self.cfg, spec, overlap_id=request.overlap_id)
            check_size(plan, read_match_keys(self.cfg))
        except OverlapDeclined as exc:
            state = ReplyState.BUDGET_EXHAUSTED if exc.budget else ReplyState.DECLINED
            return self._overlap_offer_reply(state, str(exc), 0)
        except (SchemaError, ConfigError) as exc:
            return self._overlap_offer_reply(ReplyState.DECLINED, str(exc), 0)
        return self._overlap_offer_reply(ReplyState.OK, "", plan.padded_length)

    def _overlap_offer_reply(self, state: ReplyState, detail: str, length: int
                             ) -> OverlapOfferReply:
        return OverlapOfferReply(firm=self.firm, state=state, detail=detail,
                                 epsilon_total=self.privacy.spent(),
                                 epsilon_cap=self.privacy.cap, padded_length=length)

    def blind_overlap(self, request: OverlapBlindRequest) -> OverlapBlindReply:
        """Step 2 of an overlap: this firm's signed blinded set, its one DP release."""
        try:
            spec = OverlapSpec.from_json(request.spec)
            plan = plan_overlap(self.privacy, self.cfg, spec, overlap_id=request.overlap_id)
            released = blind(self.privacy, self.cfg, self.keys, plan, read_match_keys(self.cfg))
        except BudgetExhausted as exc:
            return self._declined_blind(ReplyState.BUDGET_EXHAUSTED, str(exc))
        except OverlapDeclined as exc:
            state = ReplyState.BUDGET_EXHAUSTED if exc.budget else ReplyState.DECLINED
            return self._declined_blind(state, str(exc))
        except (SchemaError, ConfigError) as exc:
            return self._declined_blind(ReplyState.DECLINED, str(exc))
        return OverlapBlindReply(
            firm=self.firm, state=ReplyState.OK, detail="", blinded=released.value,
            noise_std=plan.noise.noise_std, epsilon=float(plan.event.epsilon),
            epsilon_total=released.epsilon_total,
        )

    def _declined_blind(self, state: ReplyState, detail: str) -> OverlapBlindReply:
        return OverlapBlindReply(firm=self.firm, state=state, detail=detail, blinded=None,
                                 noise_std=0.0, epsilon=0.0, epsilon_total=self.privacy.spent())

    def reblind_overlap(self, request: OverlapReblindRequest) -> OverlapMatches:
        """Step 3 of an overlap: the peer's signed set blinded again, with this firm's dummies,
        for the coordinator only (no new release: the noise was drawn in step 2)."""
        try:
            spec = OverlapSpec.from_json(request.spec)
            elements = reblind(self.privacy, self.cfg, self.keys, spec, request.peer_set)
        except OverlapDeclined as exc:
            return OverlapMatches(firm=self.firm, state=ReplyState.DECLINED, detail=str(exc),
                                  elements=None)
        except ConfigError as exc:
            return OverlapMatches(firm=self.firm, state=ReplyState.DECLINED, detail=str(exc),
                                  elements=None)
        return OverlapMatches(firm=self.firm, state=ReplyState.OK, detail="", elements=elements)

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
