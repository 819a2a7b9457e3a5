"""Secure sum: fedcrm's protocol vs Flower's SecAgg+, side by side, same machine, same run.

For each number of firms, each system runs in ONE Flower simulation (Ray backend, one ClientApp
actor per CPU, like ``fedcrm simulate``); its ServerApp runs one sum per (vector length, dropout)
back to back, and a client mod (outermost) meters every message a firm receives and sends (the
protobuf size of its content, what travels besides Flower's fixed metadata) and the time the
firm's handlers take.

* **fedcrm**: ``fedcrm.server.secure_sum.secure_sum`` over the Grid, the firms' real
  ``SecureSumParty`` (signed audit entries, one-answer claims on disk) with the real message
  types; keys are made for the benchmark in the driver. 100 firms: a k-regular graph with
  ``--neighbours`` (default 20) and, for 100 values, also every firm sharing with every other.
* **SecAgg+**: Flower's ``SecAggPlusWorkflow`` through the legacy ``LegacyContext`` /
  ``DefaultWorkflow`` with a legacy ``FedAvg``, and ``secaggplus_mod`` on a legacy
  ``NumPyClient`` whose ``fit`` returns the vector; ``num_shares`` 1.0 (every firm) and, at 100
  firms, 21 (``--secaggplus-shares``); reconstruction threshold: a majority of the shares, as
  fedcrm's. Full sharing runs up to ``--secaggplus-max-full`` firms and vectors of 10,000 values
  up to ``--secaggplus-long-max-firms`` firms; larger SecAgg+ runs are skipped (too slow on a
  shared 2-core machine: the issue measured 216 s per sum at 100 firms with full sharing); what
  ran is recorded in the results.

Dropout: 20% of the firms (every fifth) fail at the masking step, after they shared their
secrets (fedcrm: ``query.secure_sum_mask``; SecAgg+: the ``collect_masked_vectors`` stage): the
costly case, where their masks must be recovered.

Reported per sum: ``seconds`` (the coordinator's wall time for the whole sum, every exchange
included), ``coordinator_cpu_seconds`` (the ServerApp thread's CPU), ``firm_seconds`` (mean time a
firm's handlers took over the sum), bytes per firm (mean in + out) and for the coordinator (sum
over firms of in + out), and whether the result is exact (fedcrm: equal to the sum of the
fixed-point inputs; SecAgg+ returns a weighted mean of quantized, clipped values and is compared
with a tolerance).

Utility (``--utility``): ``configs/simulations/telco_5firms.toml`` (5 firms, 20 rounds) trained
twice, without and with ``secure_aggregation``, same seed; DP noise is drawn in both runs from a
torch generator seeded by (firm, round) - a benchmark-only client mod replaces the node's
ChaCha20 noise source. Reported: each run's exact AUC of the final model on the pooled held-out
customers and the gap (target <= 0.002). Caveat, seen in the first run: each simulation makes
fresh firm keys and the held-out customers follow the keyed pseudonyms, so the two runs train
and test on different customers (compare their ``centralized_auc``); a proper comparison must
reuse one set of prepared firms for both runs (not done yet).

Run: ``python benchmarks/secure_sum.py [--firms 5 20 50 100] [--lengths 100 10000]
[--secaggplus-max-full 50] [--only fedcrm|secaggplus] [--utility]``; writes
``benchmarks/results/secure_sum.json`` and prints a table. Timings are noisy on a shared machine:
compare the two systems side by side from the same run (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "secure_sum.json"
DROPOUT = 0.2
RANGE = 1.0  # inputs in [-1, 1]
SCALE = 2**20
TARGETS = {
    "fedcrm_5firms_100values_seconds_max": 0.2,
    "fedcrm_100firms_100values_dropout_seconds_max": 5.0,
    "speedup_vs_secaggplus_full_100firms_min": 40.0,
    "speedup_vs_secaggplus_21shares_100firms_min": 3.0,
}


def firm_name(i: int) -> str:
    return f"firm{i:03d}"


def inputs(index: int, length: int) -> np.ndarray:
    """Firm ``index``'s benchmark vector in [-1, 1] (deterministic, so the sum can be checked)."""
    return ((np.arange(length) * 7 + index * 7919) % 2001 - 1000) / 1000.0


def dropped(partition: int) -> bool:
    return partition % round(1 / DROPOUT) == 0


# ------------------------------------------------------------------------------ metering


def meter_mod(folder: str) -> Any:
    from flwr.common.serde import recorddict_to_proto

    def mod(msg: Any, context: Any, call_next: Any) -> Any:
        wall, started = time.time(), time.perf_counter()
        reply = call_next(msg, context)
        seconds = time.perf_counter() - started
        record = {
            "partition": int(context.node_config["partition-id"]),
            "type": msg.metadata.message_type, "t": wall, "seconds": seconds,
            "in": recorddict_to_proto(msg.content).ByteSize(),
            "out": recorddict_to_proto(reply.content).ByteSize() if reply.has_content() else 0,
        }
        with open(Path(folder) / f"meter-{os.getpid()}.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        return reply

    return mod


def add_meter(folder: Path, rows: list[dict[str, Any]]) -> None:
    """Per row (one sum, between its start and end time): per-firm seconds and bytes."""
    records = [json.loads(line) for path in folder.glob("meter-*.jsonl")
               for line in path.read_text().splitlines()]
    for row in rows:
        firms: dict[int, dict[str, float]] = defaultdict(
            lambda: {"seconds": 0.0, "in": 0.0, "out": 0.0}
        )
        for r in records:
            if row["t0"] <= r["t"] <= row["t1"]:
                for key in ("seconds", "in", "out"):
                    firms[r["partition"]][key] += r[key]
        values = list(firms.values()) or [{"seconds": 0.0, "in": 0.0, "out": 0.0}]
        row.update({
            "firms_metered": len(values),
            "firm_seconds_mean": float(np.mean([v["seconds"] for v in values])),
            "firm_bytes_mean": float(np.mean([v["in"] + v["out"] for v in values])),
            "coordinator_bytes": float(sum(v["in"] + v["out"] for v in values)),
        })


# ------------------------------------------------------------------------------ fedcrm


def run_fedcrm(firms: int, lengths: list[int], neighbours: list[int], workdir: Path
               ) -> list[dict[str, Any]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from flwr.app import Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedcrm.audit.log import AuditLog
    from fedcrm.flower.records import reply as reply_to
    from fedcrm.flower.records import to_records, wire_of
    from fedcrm.privacy.keys import FirmKeys
    from fedcrm.privacy.secure_sum import FixedPoint, SumId, SumSpec
    from fedcrm.protocol import (
        ErrorReply,
        MessageKind,
        SecureSumKeysReply,
        SecureSumKeysRequest,
        SecureSumMaskRequest,
        SecureSumQuery,
        SecureSumShareRequest,
        SecureSumUnmaskRequest,
        SumInput,
    )
    from fedcrm.secure_sum_party import SecureSumParty
    from fedcrm.server.secure_sum import SumTrace, secure_sum

    raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw, \
        serialization.NoEncryption()
    material = {}
    for i in range(firms):
        sign, agree = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
        material[firm_name(i)] = (sign.private_bytes(*raw), agree.private_bytes(*raw))
    trusted_raw = {
        f: Ed25519PrivateKey.from_private_bytes(s).public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        for f, (s, _) in material.items()
    }
    state_root = workdir / "firms"
    meter = workdir / "meter"
    meter.mkdir(parents=True)
    out_path = workdir / "server.json"

    def party_for(firm: str) -> SecureSumParty:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        sign, agree = material[firm]
        keys = FirmKeys(
            firm=firm, pseudonym_version=1, pseudonym_master=secrets.token_bytes(32),
            data_version=1, data_key=secrets.token_bytes(32),
            signing_key=Ed25519PrivateKey.from_private_bytes(sign),
            agreement_key=X25519PrivateKey.from_private_bytes(agree),
        )
        trusted = {f: Ed25519PublicKey.from_public_bytes(k) for f, k in trusted_raw.items()}
        folder = state_root / firm
        folder.mkdir(parents=True, exist_ok=True)
        return SecureSumParty(keys, trusted=lambda: trusted,
                              audit=AuditLog(folder / "audit.jsonl",
                                             signing_key=keys.signing_key),
                              state_dir=folder)

    parties: dict[str, SecureSumParty] = {}

    def client_app() -> ClientApp:
        app = ClientApp(mods=[meter_mod(str(meter))])

        def handle(msg: Message, context: Any) -> Message:
            part = int(context.node_config["partition-id"])
            firm = firm_name(part)
            party = parties.get(firm) or parties.setdefault(firm, party_for(firm))
            wire = wire_of(msg)
            kind = MessageKind(msg.metadata.message_type)
            try:
                if kind is MessageKind.SECURE_SUM_KEYS:
                    reply = party.register(SecureSumKeysRequest.decode(wire))
                elif kind is MessageKind.SECURE_SUM_SHARE:
                    reply = party.share(SecureSumShareRequest.decode(wire))
                elif kind is MessageKind.SECURE_SUM_MASK:
                    request = SecureSumMaskRequest.decode(wire)
                    if request.query.spec.sum_id.query.endswith("-drop") and dropped(part):
                        raise RuntimeError("benchmark dropout after sharing")
                    reply = party.mask(request, inputs(part, request.query.spec.length))
                else:
                    reply = party.unmask(SecureSumUnmaskRequest.decode(wire))
            except RuntimeError:
                raise
            except Exception as exc:
                return reply_to(msg, ErrorReply(firm=firm, detail=str(exc)).encode())
            return reply_to(msg, reply.encode())

        for kind in (MessageKind.SECURE_SUM_KEYS, MessageKind.SECURE_SUM_SHARE,
                     MessageKind.SECURE_SUM_MASK, MessageKind.SECURE_SUM_UNMASK):
            app.query(kind.value.split(".")[1])(handle)
        return app

    server = ServerApp()

    @server.main()
    def main(grid: Any, context: Any) -> None:
        while len(list(grid.get_node_ids())) < firms:
            time.sleep(0.1)
        grid.pull_interval = min(getattr(grid, "pull_interval", 0.1), max(0.01, 0.001 * firms))
        replies = grid.send_and_receive([
            Message(content=to_records(SecureSumKeysRequest("bench").encode()), dst_node_id=n,
                    message_type=MessageKind.SECURE_SUM_KEYS.value)
            for n in grid.get_node_ids()
        ], timeout=600)
        nodes, keys = {}, {}
        for r in replies:
            key = SecureSumKeysReply.decode(wire_of(r)).key
            nodes[key.firm], keys[key.firm] = r.metadata.src_node_id, key
        parties_ = tuple(sorted(nodes))
        # warm-up (not reported): the actors' first messages load code and build the parties
        secure_sum(grid, SecureSumQuery(
            SumSpec(SumId("bench", 0, "warm-up"), parties_, 10, FixedPoint(-RANGE, RANGE, SCALE),
                    neighbours[0]), SumInput.TRAINING_UPDATE, 1,
        ), nodes=nodes, keys=keys, timeout=600)
        rows = []
        for length in lengths:
            for k in neighbours:
                if k == 0 and firms >= 100 and length > 100:
                    continue  # full sharing at 100 firms: 100 values only
                for drop in (False, True):
                    tag = f"L{length}-k{k}" + ("-drop" if drop else "")
                    spec = SumSpec(SumId("bench", 0, tag), parties_, length,
                                   FixedPoint(-RANGE, RANGE, SCALE), k)
                    query = SecureSumQuery(spec, SumInput.TRAINING_UPDATE, 1)
                    trace = SumTrace()
                    t0, wall, cpu = time.time(), time.perf_counter(), time.thread_time()
                    result = secure_sum(grid, query, nodes=nodes, keys=keys, timeout=600,
                                        trace=trace)
                    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                    survivors = [int(f[4:]) for f in result.survivors]
                    expected = sum(spec.fixed_point.encode(inputs(i, length)) for i in survivors)
                    rows.append({
                        "system": "fedcrm", "firms": firms, "length": length,
                        "dropout": DROPOUT if drop else 0.0,
                        "sharing": "every firm" if k == 0 or k >= firms - 1 else f"{k} neighbours",
                        "tag": tag, "t0": t0, "t1": time.time(), "seconds": wall,
                        "coordinator_cpu_seconds": cpu,
                        "step_seconds": trace.seconds, "survivors": len(survivors),
                        "dropped": len(result.dropped),
                        "exact": bool(np.array_equal(result.total, expected)),
                    })
                    print(f"  fedcrm {firms} firms {tag}: {wall:.3f} s", flush=True)
        out_path.write_text(json.dumps(rows))

    run_simulation(server_app=server, client_app=client_app(), num_supernodes=firms,
                   backend_config=_backend())
    rows = json.loads(out_path.read_text())
    add_meter(meter, rows)
    return rows


# ------------------------------------------------------------------------------ SecAgg+


def run_secaggplus(firms: int, lengths: list[int], shares: list[int | float], workdir: Path
                   ) -> list[dict[str, Any]]:
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    schedule = [(10, shares[0], False)]  # warm-up (not reported)
    schedule += [(length, s, drop) for length in lengths for s in shares for drop in (False, True)]
    meter = workdir / "meter"
    meter.mkdir(parents=True)
    out_path = workdir / "server.json"

    class Firm(NumPyClient):
        def __init__(self, partition: int) -> None:
            self.partition = partition

        def fit(self, parameters: Any, config: Any) -> Any:
            length = int(config["length"])
            return [inputs(self.partition, length)], 1, {}

    def drop_mod(msg: Any, context: Any, call_next: Any) -> Any:
        if msg.has_content():
            records = msg.content.config_records
            stage = records.get("secaggplus_configs", {}).get("stage")
            if stage == "collect_masked_vectors" and dropped(
                int(context.node_config["partition-id"])
            ) and any(r.get("drop") for r in records.values()):
                raise RuntimeError("benchmark dropout after sharing")
        return call_next(msg, context)

    def client_fn(context: Context) -> Any:
        return Firm(int(context.node_config["partition-id"])).to_client()

    client = ClientApp(client_fn=client_fn, mods=[meter_mod(str(meter)), drop_mod,
                                                  secaggplus_mod])
    server = ServerApp()
    timings: list[dict[str, Any]] = []

    class Timed(SecAggPlusWorkflow):
        def __call__(self, grid: Any, context: Any) -> None:
            wall, cpu = time.perf_counter(), time.thread_time()
            super().__call__(grid, context)
            timings.append({"seconds": time.perf_counter() - wall,
                            "coordinator_cpu_seconds": time.thread_time() - cpu})

    @server.main()
    def main(grid: Any, context: Any) -> None:
        from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

        while len(list(grid.get_node_ids())) < firms:
            time.sleep(0.1)
        rows = []
        for index, (length, num_shares, drop) in enumerate(schedule):
            fit_config = {"length": length, "drop": int(drop)}
            strategy = FedAvg(
                fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=firms,
                min_available_clients=firms,
                on_fit_config_fn=lambda _r, c=fit_config: dict(c),
                initial_parameters=ndarrays_to_parameters([np.zeros(length)]),
            )
            legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1),
                                   strategy=strategy)
            threshold = (num_shares // 2 + 1) if isinstance(num_shares, int) else 0.51
            workflow = DefaultWorkflow(fit_workflow=Timed(
                num_shares=num_shares, reconstruction_threshold=threshold, timeout=600,
            ))
            t0 = time.time()
            workflow(grid, legacy)
            t1 = time.time()
            t = timings[-1]
            mean = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()[0]
            alive = [i for i in range(firms) if not (drop and dropped(i))]
            expected = np.mean([inputs(i, length) for i in alive], axis=0)
            if index == 0:
                continue  # the warm-up
            rows.append({
                "system": "secaggplus", "firms": firms, "length": length,
                "dropout": DROPOUT if drop else 0.0,
                "sharing": "every firm" if isinstance(num_shares, float) else
                f"{num_shares} shares",
                "t0": t0, "t1": t1, **t, "survivors": len(alive),
                "max_abs_error_of_mean": float(np.abs(mean - expected).max())
                if mean.shape == expected.shape else None,
            })
            print(f"  SecAgg+ {firms} firms L{length} {rows[-1]['sharing']} drop={drop}: "
                  f"{t['seconds']:.3f} s", flush=True)
        out_path.write_text(json.dumps(rows))

    run_simulation(server_app=server, client_app=client, num_supernodes=firms,
                   backend_config=_backend())
    rows = json.loads(out_path.read_text())
    add_meter(meter, rows)
    return rows


def _backend() -> dict[str, Any]:
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": max(1, os.cpu_count() or 1), "include_dashboard": False,
                          "logging_level": "error", "log_to_driver": False}}


# ------------------------------------------------------------------------------ report


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'system':<11}{'firms':>6}{'values':>8}{'drop':>6}  {'sharing':<15}{'sum s':>9}"
        f"{'coord cpu s':>12}{'firm s':>9}{'firm KB':>10}{'coord MB':>10}  exact",
    ]
    for r in sorted(rows, key=lambda r: (r["firms"], r["length"], r["dropout"], r["system"],
                                         r["sharing"])):
        exact = r.get("exact")
        if exact is None and r.get("max_abs_error_of_mean") is not None:
            exact = f"err {r['max_abs_error_of_mean']:.1e}"
        lines.append(
            f"{r['system']:<11}{r['firms']:>6}{r['length']:>8}{r['dropout']:>6.0%}  "
            f"{r['sharing']:<15}{r['seconds']:>9.3f}{r['coordinator_cpu_seconds']:>12.3f}"
            f"{r.get('firm_seconds_mean', float('nan')):>9.4f}"
            f"{r.get('firm_bytes_mean', float('nan')) / 1e3:>10.1f}"
            f"{r.get('coordinator_bytes', float('nan')) / 1e6:>10.2f}  {exact}"
        )
    return "\n".join(lines)


def seeded_noise_mod(msg: Any, context: Any, call_next: Any) -> Any:
    """Benchmark only: the same DP noise in both runs (seeded by firm and round)."""
    if msg.metadata.message_type == "train":
        import torch

        import fedcrm.node

        seed = 1000 * int(context.node_config["partition-id"]) + int(
            msg.content["config"]["server-round"]
        )
        fedcrm.node.noise_generator = lambda: torch.Generator().manual_seed(seed)  # type: ignore[assignment]
    return call_next(msg, context)


def utility(workdir: Path) -> dict[str, Any]:
    """Telco, 5 firms, the same firms (keys, held-out customers, empty ledgers: each run starts
    from one snapshot of the prepared firm folders) and the same seeded DP noise and sampling,
    trained once with FedAvg's plain mean and once through the secure sum. What differs is only
    the aggregation (the secure sum's fixed-point encoding)."""
    import shutil

    from fedcrm.coordinator.runs import load_summary
    from fedcrm.learning.models import load_model
    from fedcrm.simulations.run import (
        ENGINE_LOG,
        build_firms,
        centralized_baseline,
        engine_logs,
        load_simulation_config,
        run_flower_simulation,
        start_engine,
        stop_engine,
    )

    cfg = load_simulation_config(ROOT / "configs" / "simulations" / "telco_5firms.toml")
    cfg = cfg.model_copy(update={
        "simulation": cfg.simulation.model_copy(update={"workdir": workdir})})
    built = workdir / "built"
    firms = build_firms(cfg, built)
    pristine = workdir / "pristine"
    shutil.copytree(built / "firms", pristine)
    out: dict[str, Any] = {"config": "configs/simulations/telco_5firms.toml",
                           "seed": cfg.simulation.seed, "rounds": cfg.run.rounds,
                           "controlled": "same firm folders (restored from one snapshot), same "
                                         "seeded noise and sampling; only the aggregation differs"}
    weights: dict[str, dict[str, Any]] = {}
    for secure in (False, True):
        key = "secure" if secure else "plain"
        shutil.rmtree(built / "firms")
        shutil.copytree(pristine, built / "firms")
        run = cfg.model_copy(update={
            "run": cfg.run.model_copy(update={"secure_aggregation": secure})})
        run_dir = workdir / key
        run_dir.mkdir()
        started = time.perf_counter()
        with engine_logs(run_dir / ENGINE_LOG):
            try:
                start_engine(run.simulation)
                run_flower_simulation(run, firms, run_id=f"utility-{key}", run_dir=run_dir,
                                      client_mods=[seeded_noise_mod])
            finally:
                stop_engine()
        summary = load_summary(run_dir)
        model = Path(summary["model"]) if summary.get("model") else None
        baseline = centralized_baseline(firms, run, model)
        if model is not None:
            weights[key] = {k: v.detach().numpy() for k, v in load_model(model)[0]
                            .state_dict().items()}
        out[key] = {
            "federated_auc_exact": baseline.get("federated_auc_exact"),
            "centralized_auc": baseline.get("centralized_auc"),
            "status": summary.get("status"), "rounds_completed": summary.get("rounds_completed"),
            "epsilon": {f["firm"]: f.get("epsilon") for f in summary.get("firms", [])},
            "seconds": time.perf_counter() - started,
            # the coordinator's signed log shows which aggregation ran (secure-sum entries)
            "federation_log_kinds": dict(sorted(Counter(
                json.loads(line)["kind"] for line in
                (run_dir / "federation" / "audit.jsonl").read_text().splitlines()
                if line.strip()).items())),
        }
        print(f"  {key}: AUC {out[key]['federated_auc_exact']} ({out[key]['seconds']:.1f} s)",
              flush=True)
    if len(weights) == 2:
        out["max_abs_weight_difference"] = float(max(
            np.abs(weights["plain"][k] - weights["secure"][k]).max() for k in weights["plain"]))
    plain_auc, secure_auc = (out[k]["federated_auc_exact"] for k in ("plain", "secure"))
    out["auc_gap"] = (abs(secure_auc - plain_auc)
                      if plain_auc is not None and secure_auc is not None else None)
    out["target_auc_gap_max"] = 0.002
    out["target_met"] = out["auc_gap"] is not None and out["auc_gap"] <= 0.002
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--firms", type=int, nargs="+", default=[5, 20, 50, 100])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--neighbours", type=int, default=20,
                        help="fedcrm at 100 firms: the k-regular graph's degree")
    parser.add_argument("--fedcrm-full-max-firms", type=int, default=100,
                        help="largest federation fedcrm also runs with every firm sharing")
    parser.add_argument("--secaggplus-shares", type=int, default=21)
    parser.add_argument("--secaggplus-max-full", type=int, default=50,
                        help="largest federation SecAgg+ runs with every firm sharing")
    parser.add_argument("--secaggplus-long-max-firms", type=int, default=20,
                        help="largest federation SecAgg+ sums vectors longer than 100 in")
    parser.add_argument("--only", choices=["fedcrm", "secaggplus"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--utility", action="store_true",
                        help="only the Telco AUC with and without secure aggregation")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    if args.utility:
        with tempfile.TemporaryDirectory(prefix="secure-sum-auc-") as tmp:
            result = utility(Path(tmp))
        previous = json.loads(args.out.read_text()) if args.out.exists() else {}
        previous["utility"] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(previous, indent=1))
        print(json.dumps(result, indent=1))
        return
    rows: list[dict[str, Any]] = []
    ran: list[str] = []
    with tempfile.TemporaryDirectory(prefix="secure-sum-bench-") as tmp:
        for firms in args.firms:
            if args.only != "secaggplus":
                neighbours = [0] if firms < 100 else [args.neighbours]
                if firms >= 100 and firms <= args.fedcrm_full_max_firms:
                    neighbours.append(0)
                print(f"fedcrm, {firms} firms", flush=True)
                rows += run_fedcrm(firms, args.lengths, neighbours,
                                   Path(tmp) / f"fedcrm-{firms}")
                ran.append(f"fedcrm {firms} firms: lengths {args.lengths}, sharing "
                           f"{['every firm' if k == 0 else f'{k} neighbours' for k in neighbours]}")
            if args.only != "fedcrm":
                shares: list[int | float] = []
                if firms <= args.secaggplus_max_full:
                    shares.append(1.0)
                if firms > args.secaggplus_shares:
                    shares.append(args.secaggplus_shares)
                lengths = [x for x in args.lengths
                           if x <= 100 or firms <= args.secaggplus_long_max_firms]
                if shares and lengths:
                    print(f"SecAgg+, {firms} firms", flush=True)
                    rows += run_secaggplus(firms, lengths, shares,
                                           Path(tmp) / f"secaggplus-{firms}")
                    ran.append(f"SecAgg+ {firms} firms: lengths {lengths}, num_shares {shares}")
            _write(args.out, rows, ran)
    print(table(rows))
    _write(args.out, rows, ran)


def _write(path: Path, rows: list[dict[str, Any]], ran: list[str]) -> None:
    import flwr

    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    kept = old.get("utility")
    # rows of other firm counts from earlier runs stay (each row says what it measured)
    measured = {(r["system"], r["firms"]) for r in rows}
    rows = [r for r in old.get("rows", []) if (r["system"], r["firms"]) not in measured] + rows
    ran = [x for x in old.get("setup", {}).get("ran", []) if x not in ran] + ran
    path.write_text(json.dumps({
        **({"utility": kept} if kept else {}),
        "benchmark": "secure sum: fedcrm vs Flower SecAgg+ (Flower simulation, Ray backend)",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "flwr": flwr.__version__,
                    "load_average_at_end": os.getloadavg()},
        "setup": {"dropout": DROPOUT, "range": [-RANGE, RANGE], "scale": SCALE,
                  "dropout_point": "after sharing, at the masking step (recovery needed)",
                  "bytes": "protobuf size of each message's content (RecordDict), in + out",
                  "ran": ran},
        "targets": TARGETS,
        "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
