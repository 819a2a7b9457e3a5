"""Deployment rounds: fedcrm against a trivial ClientApp on the same TLS deployment (3 firms).

Both apps run on the same kind of federation, built by
:class:`fedcrm.coordinator.local_deployment.LocalFederation` on 127.0.0.1: a TLS SuperLink with
SuperNode authentication behind the Fleet gateway, three SuperNodes in ``--isolation process``
mode, each with the firm's one long-lived ClientApp process (:mod:`fedcrm.clients.runtime`),
and the ServerApp polling through :class:`fedcrm.server.run_grid.RunGrid`. A round is a train and
an evaluate exchange with every firm (``evaluate_every = 1``) for both:

* ``trivial`` - ``benchmarks/deployment_trivial_app.py``: FedAvg over a 16-float model whose
  ClientApp returns what it got (no work: the round is the deployment's own latency);
* ``fedcrm`` - the real apps on three IBM Telco firms (DP-SGD on the firm's encrypted store, a DP
  evaluation, every release committed and signed before the reply).

Round latency is the time between two rounds' starts (fedcrm's ``round_started`` events; the
trivial app records the same moment); the first round (which includes each firm's planning of
the run) is reported apart from the steady rounds. The two apps alternate (``--pairs``), so the
machine's load hits both alike. Then ``fedcrm deploy local --firms 3`` is timed end to end (its
processes' CPU seconds too). Targets: fedcrm's steady round at most 1.5x the trivial one, and
``deploy local --firms 3`` within 30 s.

Run: ``python benchmarks/deployment.py [--rounds 8] [--pairs 1] [--no-deploy-local]`` (not ``-m``:
a third-party wheel installs a top-level ``benchmarks`` package); writes
``benchmarks/results/deployment.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FIRMS = 3
TARGETS = {"round_ratio_max": 1.5, "deploy_local_3_firms_seconds_max": 30.0}


def _firms(root: Path) -> list[Any]:
    from fedcrm.simulations.deploy_local import (
        DeploySection,
        LocalDeployConfig,
        _simulation_config,
    )
    from fedcrm.simulations.run import build_firms

    cfg = LocalDeployConfig(deploy=DeploySection(firms=FIRMS, seed=0, epsilon_budget=50.0))
    return build_firms(_simulation_config(cfg, FIRMS), root)


def _intervals(starts: list[float], finished: float) -> list[float]:
    ends = [*starts[1:], finished]
    return [b - a for a, b in zip(starts, ends, strict=True)]


def run_trivial(work: Path, rounds: int) -> list[float]:
    from fedcrm.clients.node import start_supernode
    from fedcrm.coordinator.app_bundle import AppSpec
    from fedcrm.coordinator.local_deployment import LocalFederation, LocalFirm

    timing = work / "timing.json"
    app = AppSpec(serverapp="deployment_trivial_app:server_app",
                  clientapp="deployment_trivial_app:client_app", name="trivial-bench")
    firms = [LocalFirm(f"firm{i + 1}") for i in range(FIRMS)]
    with LocalFederation(firms=firms, workdir=work / "federation", start_node=start_supernode,
                         app=app, extra_pythonpath=[HERE]) as federation:
        result = federation.run(run_config={"timing-file": str(timing), "firms": FIRMS},
                                rounds=rounds, timeout_s=900)
    if not result.completed:
        raise RuntimeError(f"trivial run ended {result.status.status_text}")
    record = json.loads(timing.read_text())
    return _intervals(record["round_started"], record["finished"])


def run_fedcrm(work: Path, firms: list[Any], rounds: int) -> list[float]:
    from fedcrm.clients.node import firm_node_config, start_supernode
    from fedcrm.coordinator.app_bundle import AppSpec
    from fedcrm.coordinator.events import RoundStarted, RunFinished, event_from_json
    from fedcrm.coordinator.host import use_coordinator_key
    from fedcrm.coordinator.local_deployment import LocalFederation, LocalFirm
    from fedcrm.coordinator.run_config import RunConfig
    from fedcrm.simulations.datasets import telco_schema

    run_dir = work / "run"
    run_id = work.name
    use_coordinator_key(work / "coordinator" / "signing.key")
    cfg = RunConfig(rounds=rounds, min_firms=FIRMS, expected_firms=FIRMS, round_timeout=120,
                    wait_for_firms=120, target_epsilon=1.0, batch_size=128, learning_rate=1.0,
                    max_update_norm=100.0, evaluate_every=1,
                    feature_schema=telco_schema().canonical_json())
    nodes = [LocalFirm(f.name, firm_node_config(f.config)) for f in firms]
    with LocalFederation(firms=nodes, workdir=work / "federation", start_node=start_supernode,
                         app=AppSpec()) as federation:
        result = federation.run(run_config=cfg.to_flower(run_id=run_id, run_dir=run_dir),
                                rounds=rounds, run_dir=run_dir, cfg=cfg, run_id=run_id,
                                timeout_s=900)
    if not result.completed:
        raise RuntimeError(f"fedcrm run ended {result.status.status_text}")
    starts, finished = [], 0.0
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        record = json.loads(line)
        event = event_from_json(record)
        if isinstance(event, RoundStarted):
            starts.append(record["t"])
        elif isinstance(event, RunFinished):
            finished = record["t"]
    return _intervals(starts, finished)


def deploy_local(work: Path) -> dict[str, float]:
    """``fedcrm deploy local --firms 3`` end to end: wall seconds and its processes' CPU."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fedcrm"), "deploy", "local", "--firms", str(FIRMS),
         "--config", str(ROOT / "configs" / "deploy" / "local.toml"), "--run-id", "bench"],
        cwd=work, capture_output=True, text=True, timeout=900, check=False,
    )
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"deploy local failed: {done.stderr[-2000:]}")
    return {"seconds": round(wall, 2),
            "cpu_seconds": round(after.ru_utime + after.ru_stime
                                 - before.ru_utime - before.ru_stime, 2)}


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 3), "min": round(ordered[0], 3),
            "max": round(ordered[-1], 3), "n": len(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--no-deploy-local", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    load_before = os.getloadavg()
    first: dict[str, list[float]] = {"trivial": [], "fedcrm": []}
    steady: dict[str, list[float]] = {"trivial": [], "fedcrm": []}
    with tempfile.TemporaryDirectory(prefix="fedcrm-deploy-bench-") as tmp:
        root = Path(tmp)
        firms = _firms(root / "firms")
        for pair in range(args.pairs):
            order = ("trivial", "fedcrm") if pair % 2 == 0 else ("fedcrm", "trivial")
            for app in order:
                work = root / f"{app}-{pair}"
                rounds = (run_trivial(work, args.rounds) if app == "trivial"
                          else run_fedcrm(work, firms, args.rounds))
                first[app].append(rounds[0])
                steady[app].extend(rounds[1:])
                print(f"pair {pair} {app}: rounds " + " ".join(f"{r:.2f}" for r in rounds),
                      flush=True)
        local = None if args.no_deploy_local else deploy_local(root)
    ratio = statistics.median(steady["fedcrm"]) / statistics.median(steady["trivial"])
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "firms": FIRMS, "rounds": args.rounds, "pairs": args.pairs,
        "first_round_seconds": {k: [round(v, 3) for v in vs] for k, vs in first.items()},
        "steady_round_seconds": {k: _stats(vs) for k, vs in steady.items()},
        "fedcrm_over_trivial": round(ratio, 3),
        "deploy_local": local,
        "targets": TARGETS,
        "met": {
            "round_ratio": ratio <= TARGETS["round_ratio_max"],
            "deploy_local": None if local is None
            else local["seconds"] <= TARGETS["deploy_local_3_firms_seconds_max"],
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "deployment.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| app | first round (s) | steady round median (s) | min | max | n |")
    print("|---|---|---|---|---|---|")
    for app in ("trivial", "fedcrm"):
        s = result["steady_round_seconds"][app]
        print(f"| {app} | {', '.join(f'{v:.2f}' for v in first[app])} | {s['median']:.2f} | "
              f"{s['min']:.2f} | {s['max']:.2f} | {s['n']} |")
    print(f"\nfedcrm / trivial (steady round medians): {ratio:.2f} (target <= "
          f"{TARGETS['round_ratio_max']})")
    if local is not None:
        print(f"deploy local --firms {FIRMS}: {local['seconds']:.1f} s wall, "
              f"{local['cpu_seconds']:.1f} s CPU (target <= "
              f"{TARGETS['deploy_local_3_firms_seconds_max']:.0f} s)")
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
