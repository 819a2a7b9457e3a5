"""Security figures: poisoning by one of five firms, and membership inference on the global model.

**Poisoning** (``--only poisoning``). Telco, 5 firms as in ``configs/simulations/telco_5firms.toml``
(non-IID by contract type, ε ≤ 1 per firm, 20 rounds). The largest firm of the split (the most
FedAvg weight: the worst case) is malicious: it sends sign-flipped or ×100-scaled updates (a
Flower client mod), or trains through the normal pipeline on a label-flipped or backdoored export
(:mod:`fedcrm.simulations.poisoning`). Every scenario is a whole ``simulate`` run (the harness:
fresh firms, keys, ledgers). Each run's firms get fresh keys, hence their own held-out customers
(a firm's held-out set follows from its pseudonyms), so runs of one seed differ in their test
split as well as in their DP noise. The score is the exact AUC of the saved global model on the
four HONEST firms' held-out customers with their true labels (the harness's
``summary["baseline"]["federated_auc_exact"]`` restricted to honest firms: in a data-poisoning
run the malicious firm's own labels are the attacker's; the federation's DP evaluation is noisy
on purpose), next to a centralized non-DP logistic regression trained on the honest firms'
training customers and scored on the same held-out customers. The drop is read on the gap
between the two (``adj. drop``): it cancels how hard a run's split is. Each strategy's honest
run is repeated (``--honest-repeats``) to show how far two honest runs differ.

**Membership inference** (``--only mia``): Telco runs at ε = 1 and ε = 8 through ``simulate``,
then :func:`fedcrm.simulations.membership.membership_audit` on each (what ``fedcrm audit mia``
runs); and two non-DP contrasts on the first run's firms, trained in-process since a firm never
releases a non-DP update: the run's own procedure without clipping or noise, and an MLP with
10× the local steps (a model that overfits, to show the attacks have teeth on this data).

Run: ``python benchmarks/security.py [--only poisoning|mia] [--seeds 3 4 5]``
(not ``-m``: a third-party wheel installs a top-level ``benchmarks`` package); writes
``benchmarks/results/security.json``. Finished scenarios are appended to
``benchmarks/results/security_runs.jsonl`` and skipped when the benchmark is rerun with
``--resume`` (this machine is shared; every seed takes hours when it is loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
TELCO = ROOT / "configs" / "simulations" / "telco_5firms.toml"
RUNS_LOG = RESULTS / "security_runs.jsonl"

STRATEGIES = ("fedavg", "fedmedian", "trimmed_mean", "krum")
ATTACKS = ("sign_flip", "scale_x100", "label_flip", "backdoor")
TARGETS = {"robust_auc_drop_max": 0.01, "mia_auc_max_at_eps_le_1": 0.52}


# --------------------------------------------------------------------------- poisoning


def _sim_config(seed: int, workdir: Path, **run: Any) -> Any:
    from fedcrm.simulations.run import SimulationConfig, load_simulation_config

    base = load_simulation_config(TELCO)
    data = base.model_dump()
    data["simulation"].update(seed=seed, workdir=workdir, baseline=True)
    # This machine is shared and at times heavily loaded: generous waits, so that no firm is
    # dropped for being slow (a dropout is not what this benchmark measures).
    data["run"].update(wait_for_firms=600.0, round_timeout=600.0, **run)
    return SimulationConfig.model_validate(data)


def _firm_examples(config: Path, schema: str) -> tuple[Any, Any, Any, Any, Any, Any]:
    """A firm's (x_train, y_train, x_test, y_test, held-out churners, layout) in the run's
    public schema."""
    import numpy as np

    from fedcrm.data.contract import load_firm_config
    from fedcrm.data.encoding import FeatureLayout
    from fedcrm.data.store import load_store
    from fedcrm.privacy.keys import load_keys
    from fedcrm.tasks.churn import holdout_mask

    layout = FeatureLayout.from_json(schema)
    cfg = load_firm_config(config)
    customers = load_store(cfg.prepared_dir, keys=load_keys(cfg.firm.keys_dir)).customers
    assert customers is not None
    test = holdout_mask(customers["customer_id"])
    x = layout.encode(customers)
    y = customers["churn"].to_numpy(dtype=np.float32)
    held_out = customers[test]
    return x[~test], y[~test], x[test], y[test], held_out[held_out["churn"] == 1], layout


def score_run(run_dir: Path, honest: Sequence[str], schema: str) -> dict[str, float]:
    """Exact AUC of the run's saved global model on the HONEST firms' held-out customers (true
    labels; the malicious firm's are left out in every scenario, since in data-poisoning runs
    its labels are the attacker's), the centralized non-DP AUC on the same customers (trained on
    the honest firms' training customers: it absorbs how hard this run's split is), and the
    backdoor's success on the honest held-out churners."""
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from fedcrm.learning.metrics import auc
    from fedcrm.learning.models import load_model, predict_proba
    from fedcrm.simulations.poisoning import backdoor_success

    parts = [_firm_examples(run_dir / "firms" / f / "firm.toml", schema) for f in honest]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test = np.concatenate([p[2] for p in parts])
    y_test = np.concatenate([p[3] for p in parts])
    churners = pd.concat([p[4] for p in parts], ignore_index=True)
    layout = parts[0][5]
    central = LogisticRegression(max_iter=2000, C=1.0).fit(x_train, y_train)
    out = {"centralized_auc": auc(central.predict_proba(x_test)[:, 1], y_test),
           "test_customers": len(y_test)}
    summary = json.loads((run_dir / "summary.json").read_text())
    if not summary.get("model"):
        return {**out, "auc": float("nan"), "backdoor_success": float("nan")}
    model, _ = load_model(summary["model"])
    return {
        **out,
        "auc": auc(predict_proba(model, x_test), y_test),
        "backdoor_success": backdoor_success(
            lambda rows: predict_proba(model, layout.encode(rows)), churners
        ),
    }


def _done_runs() -> dict[str, dict[str, Any]]:
    """Logged scenarios that ran at least one round (a run that never started is retried)."""
    if not RUNS_LOG.exists():
        return {}
    runs = {}
    for line in RUNS_LOG.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("rounds_completed", 0) > 0:
                runs[r["key"]] = r
    return runs


def _log_run(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with RUNS_LOG.open("a") as fh:
        fh.write(json.dumps(result) + "\n")


def largest_firm(cfg: Any) -> tuple[int, str, dict[str, int]]:
    """The split's largest firm (partition id, name) and every firm's size, before any run."""
    from fedcrm.simulations.datasets import load_telco
    from fedcrm.simulations.run import split_telco

    sizes = [len(p) for p in split_telco(load_telco(), cfg.simulation)]
    index = max(range(len(sizes)), key=lambda i: sizes[i])
    return index, f"firm{index + 1}", {f"firm{i + 1}": n for i, n in enumerate(sizes)}


def poisoning_seed(
    seed: int, *, strategies: Sequence[str], attacks: Sequence[str], honest_repeats: int,
    rounds: int, resume: bool, tmp: Path, purpose: str,
) -> list[dict[str, Any]]:
    """Every (strategy, attack) of one split seed, each a whole ``simulate`` run."""
    from fedcrm.simulations.poisoning import Attack, poison_export, tamper_mod
    from fedcrm.simulations.run import simulate

    done = _done_runs() if resume else {}
    malicious, bad, sizes = largest_firm(_sim_config(seed, tmp, rounds=rounds))
    honest_firms = [f for f in sizes if f != bad]
    results = []
    plan = [(s, "none", r) for s in strategies for r in range(honest_repeats)]
    plan += [(s, a, 0) for s in strategies for a in attacks]
    for strategy, attack_name, rep in plan:
        attack = Attack(attack_name)
        ratio = _sim_config(seed, tmp).run.max_update_norm_ratio  # the shipped default
        key = f"poisoning/seed{seed}/r{rounds}/ratio{ratio:g}/{strategy}/{attack.value}/{rep}"
        if key in done:
            results.append(done[key])
            continue
        extra: dict[str, Any] = {"strategy": strategy}
        if strategy == "krum":
            extra["min_firms"] = 5  # Krum with one malicious firm needs n >= 2f + 3 = 5
        cfg = _sim_config(seed, tmp, rounds=rounds, **extra)
        run_id = f"seed{seed}-{strategy}-{attack.value}-{rep}"
        norms_dir = tmp / f"{run_id}-norms"
        norms_dir.mkdir()

        def alter(firm: str, export: Any, attack: Attack = attack) -> Any:
            return poison_export(export, attack, seed=seed) if firm == bad else export

        started = time.perf_counter()
        for attempt in range(1, 4):  # a run that never got its firms connected is retried
            run_dir, summary = simulate(
                cfg, run_id=f"{run_id}-{attempt}",
                client_mods=[tamper_mod(attack, malicious=malicious, record_dir=norms_dir)],
                alter_export=alter if attack.alters_data else None,
            )
            if summary["rounds_completed"] > 0:
                break
            print(f"  {run_id}: no round ran ({summary.get('stop_reason')}); retrying", flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            for p in norms_dir.iterdir():
                p.unlink()
        seconds = time.perf_counter() - started
        rejected_bad = sum(1 for r in summary["rounds_detail"] for x in r["rejected"]
                           if x["firm"] == bad)
        rejected_honest = sum(1 for r in summary["rounds_detail"] for x in r["rejected"]
                              if x["firm"] != bad)
        update_hash = {(u["round"], u["firm"]): u["hash"] for u in summary["updates"]}
        krum_picked_bad = sum(
            1 for r in summary["rounds_detail"]
            if r.get("model_hash") and r["model_hash"] == update_hash.get((r["server_round"], bad))
        )
        norms = [json.loads(x) for p in sorted(norms_dir.iterdir())
                 for x in p.read_text().splitlines()]
        scores = score_run(run_dir, honest_firms, cfg.run.feature_schema)
        result = {
            "key": key, "purpose": purpose, "seed": seed, "rounds": rounds,
            "max_update_norm_ratio": ratio,
            "strategy": strategy, "attack": attack.value, "repeat": rep,
            "malicious_firm": bad, "firm_rows": sizes,
            "status": summary["status"], "rounds_completed": summary["rounds_completed"],
            "stop_reason": summary.get("stop_reason"), "attempts": attempt,
            "dropped": sum(len(r.get("dropped", [])) for r in summary["rounds_detail"]),
            **scores,
            "harness_federated_auc_exact": summary.get("baseline", {}).get("federated_auc_exact"),
            "harness_centralized_auc": summary.get("baseline", {}).get("centralized_auc"),
            "rejected_malicious": rejected_bad, "rejected_honest": rejected_honest,
            "malicious_updates_sent": sum(1 for n in norms if n["partition"] == malicious),
            "krum_selected_malicious": krum_picked_bad if strategy == "krum" else None,
            "honest_update_norms": [n["honest_norm"] for n in norms
                                    if n["partition"] != malicious],
            "malicious_sent_norms": [n["sent_norm"] for n in norms
                                     if n["partition"] == malicious],
            "honest_norm_over_round_median": _round_ratios(norms, malicious),
            "seconds": round(seconds, 1),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        }
        _log_run(result)
        results.append(result)
        print(f"  seed {seed} {strategy:12} {attack.value:10} rep {rep}: AUC {scores['auc']:.4f}"
              f" (central {scores['centralized_auc']:.4f}) rejected {rejected_bad} "
              f"({seconds:.0f}s)", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(norms_dir, ignore_errors=True)
    return results


def _round_ratios(norms: Sequence[dict[str, Any]], malicious: int) -> list[float]:
    """Per round: the largest honest update norm over the median of every update sent (what a
    relative bound, ``max_update_norm_ratio``, must let through)."""
    import numpy as np

    out = []
    for r in sorted({n["round"] for n in norms}):
        sent = [n["sent_norm"] for n in norms if n["round"] == r]
        honest = [n["sent_norm"] for n in norms if n["round"] == r and n["partition"] != malicious]
        if len(sent) >= 3 and honest:
            out.append(max(honest) / float(np.median(sent)))
    return out


def _mean(xs: Sequence[float]) -> float:
    """Mean of the values that are numbers (a backdoor success is NaN when a model flags no
    churner at all)."""
    finite = [x for x in xs if x == x]
    return statistics.fmean(finite) if finite else float("nan")


def _gap(r: dict[str, Any]) -> float:
    return float(r["centralized_auc"] - r["auc"])


def summarize_poisoning(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per strategy and attack: mean AUC and the drop against the strategy's honest runs of the
    same seed, raw (AUC) and split-adjusted (the gap to the centralized AUC of the same run's
    split: every run has its own keys, hence its own held-out customers); rejected malicious
    updates; and how far two honest runs of one seed differ."""
    out: dict[str, Any] = {}
    seeds = sorted({r["seed"] for r in runs})
    for strategy in STRATEGIES:
        mine = [r for r in runs if r["strategy"] == strategy]
        if not mine:
            continue
        honest = {s: [r for r in mine if r["attack"] == "none" and r["seed"] == s]
                  for s in seeds}
        honest = {s: v for s, v in honest.items() if v}
        auc_mean = {s: _mean([r["auc"] for r in v]) for s, v in honest.items()}
        gap_mean = {s: _mean([_gap(r) for r in v]) for s, v in honest.items()}

        def diffs(f: Any, groups: dict[int, list[dict[str, Any]]] = honest) -> list[float]:
            return [abs(f(v[i]) - f(v[j])) for v in groups.values()
                    for i in range(len(v)) for j in range(i + 1, len(v))]

        all_honest = [r for v in honest.values() for r in v]
        row: dict[str, Any] = {
            "honest": {
                "runs": len(all_honest),
                "auc": _mean([r["auc"] for r in all_honest]),
                "centralized_auc": _mean([r["centralized_auc"] for r in all_honest]),
                "auc_by_seed": {str(s): [r["auc"] for r in v] for s, v in honest.items()},
                "repeat_abs_diff_auc": _mean(diffs(lambda r: r["auc"])),
                "repeat_abs_diff_gap": _mean(diffs(_gap)),
                "repeat_abs_diff_gap_max": max(diffs(_gap), default=float("nan")),
                "backdoor_success": _mean([r["backdoor_success"] for r in all_honest]),
                "rejected_honest": sum(r["rejected_honest"] for r in all_honest),
            }
        }
        for attack in ATTACKS:
            att = [r for r in mine if r["attack"] == attack and r["seed"] in honest]
            if not att:
                continue
            drops = [auc_mean[r["seed"]] - r["auc"] for r in att]
            drops_adj = [_gap(r) - gap_mean[r["seed"]] for r in att]
            row[attack] = {
                "runs": len(att),
                "auc": _mean([r["auc"] for r in att]),
                "drop_mean": _mean(drops),
                "drop_adjusted_mean": _mean(drops_adj),
                "drop_adjusted_max": max(drops_adj),
                "drops": drops,
                "drops_adjusted": drops_adj,
                "rejected": sum(r["rejected_malicious"] for r in att),
                "sent": sum(r["malicious_updates_sent"] for r in att),
                "rejected_honest": sum(r["rejected_honest"] for r in att),
                "backdoor_success": _mean([r["backdoor_success"] for r in att]),
                "krum_selected_malicious": (
                    sum(r["krum_selected_malicious"] for r in att) if strategy == "krum"
                    else None),
                "incomplete_runs": sum(1 for r in att if r["status"] != "completed"),
            }
        out[strategy] = row
    return out


def print_poisoning(summary: dict[str, Any], seeds: Sequence[int]) -> None:
    print(f"\nPoisoning: Telco, 5 firms, the largest one malicious, split seeds {list(seeds)}; "
          "exact AUC of the saved global model on the 4 honest firms' held-out customers.\n"
          "drop = honest AUC - attacked AUC (same seed); adj. drop = the same on the gap to the "
          "centralized AUC of each run's own split (what the target is read on); rejected = the "
          "malicious firm's updates rejected / sent; honest rej = honest updates rejected")
    header = (f"{'strategy':13} {'attack':11} {'AUC':>7} {'drop':>8} {'adj.drop':>9} "
              f"{'max adj':>8} {'rejected':>9} {'honest rej':>10} {'backdoor':>9} {'<=0.01':>7}")
    print(header)
    print("-" * len(header))
    for strategy, row in summary.items():
        h = row["honest"]
        print(f"{strategy:13} {'honest':11} {h['auc']:7.4f} {'':>8} {'':>9} {'':>8} "
              f"{'':>9} {h['rejected_honest']:>10} {h['backdoor_success']:9.3f}   "
              "two honest runs differ by "
              f"{h['repeat_abs_diff_auc']:.4f} AUC, {h['repeat_abs_diff_gap']:.4f} gap "
              f"(max {h['repeat_abs_diff_gap_max']:.4f})")
        for attack in ATTACKS:
            if attack not in row:
                continue
            a = row[attack]
            robust = strategy != "fedavg"
            met = ("yes" if a["drop_adjusted_mean"] <= TARGETS["robust_auc_drop_max"] else "NO") \
                if robust else "-"
            extra = ""
            if a["krum_selected_malicious"] is not None:
                extra = f"  (Krum chose it {a['krum_selected_malicious']}x)"
            rejected = f"{a['rejected']}/{a['sent']}"
            print(f"{'':13} {attack:11} {a['auc']:7.4f} {a['drop_mean']:+8.4f} "
                  f"{a['drop_adjusted_mean']:+9.4f} {a['drop_adjusted_max']:+8.4f} "
                  f"{rejected:>9} {a['rejected_honest']:>10} {a['backdoor_success']:9.3f} "
                  f"{met:>7}{extra}")


# --------------------------------------------------------------------------- membership inference


def _mlp_contrast(procedure: Any, epochs_factor: int) -> Any:
    """A leakier non-DP contrast: the run's firms and rounds with an MLP, Adam and
    ``epochs_factor`` times the local steps (no clipping, no noise)."""
    from dataclasses import replace

    from fedcrm.simulations.membership import FederatedProcedure

    run = procedure.run.model_copy(update={"model": "mlp", "optimizer": "adam",
                                           "learning_rate": 0.01})
    rounds = tuple(
        {f: replace(p, steps=p.steps * epochs_factor, learning_rate=0.01)
         for f, p in plans.items()}
        for plans in procedure.without_dp().rounds
    )
    return FederatedProcedure(run=run, input_dim=procedure.input_dim, rounds=rounds, dp=False)


def mia_seed(seed: int, *, shadows: int, epsilons: Sequence[float], mlp_epochs_factor: int,
             mlp_shadows: int, rounds: int, resume: bool, tmp: Path) -> list[dict[str, Any]]:
    """Telco runs at each ε (``fedcrm simulate``, then ``membership_audit``), and two non-DP
    contrasts on the first run's firms: the run's own procedure without DP, and an MLP trained
    ``mlp_epochs_factor`` times longer."""
    from fedcrm.simulations.membership import (
        attack_model,
        load_run,
        membership_audit,
        train_federated,
    )
    from fedcrm.simulations.run import simulate

    done = _done_runs() if resume else {}
    out = []

    def record(key: str, label: str, epsilon: float | None, report: Any, extra: dict[str, Any],
               n_shadows: int = shadows) -> None:
        attacks = report if isinstance(report, tuple) else report.attacks
        result = {"key": key, "seed": seed, "model": label, "epsilon": epsilon,
                  "shadows": n_shadows, "rounds_completed": rounds,
                  "attacks": {a.attack: a.to_json() for a in attacks}, **extra,
                  "loadavg": [round(x, 2) for x in os.getloadavg()]}
        _log_run(result)
        out.append(result)
        print("  " + f"seed {seed} {label:34} " + ", ".join(
            f"{a.attack} AUC {a.auc:.4f} TPR@1% {a.tpr_at_low_fpr:.4f}" for a in attacks),
            flush=True)

    first_run: Path | None = None
    for epsilon in epsilons:
        key = f"mia/seed{seed}/r{rounds}/eps{epsilon:g}/s{shadows}"
        if key in done:
            out.append(done[key])
            continue
        cfg = _sim_config(seed, tmp, rounds=rounds, target_epsilon=epsilon)
        data = cfg.model_dump()
        data["simulation"]["epsilon_budget"] = epsilon
        cfg = type(cfg).model_validate(data)
        started = time.perf_counter()
        run_dir, summary = simulate(cfg, run_id=f"mia-seed{seed}-eps{epsilon:g}")
        seconds = time.perf_counter() - started
        report = membership_audit(run_dir, shadows=shadows, seed=seed)
        record(key, f"federated DP, eps <= {epsilon:g}", epsilon, report, {
            "federated_auc_exact": summary["baseline"].get("federated_auc_exact"),
            "epsilon_spent_max": max(f["epsilon"] for f in summary["firms"]),
            "run_seconds": round(seconds, 1), "attack_seconds": round(report.seconds, 1),
        })
        first_run = first_run or run_dir
    contrasts = [("nondp-logistic", "non-DP, same procedure (logistic)"),
                 (f"nondp-mlp-x{mlp_epochs_factor}",
                  f"non-DP MLP, {mlp_epochs_factor}x local steps")]
    for tag, label in contrasts:
        n_shadows = shadows if tag == "nondp-logistic" else mlp_shadows
        key = f"mia/seed{seed}/r{rounds}/{tag}/s{n_shadows}"
        if key in done:
            out.append(done[key])
            continue
        if first_run is None:
            cfg = _sim_config(seed, tmp, rounds=rounds)
            first_run, _ = simulate(cfg, run_id=f"mia-seed{seed}-contrast")
        procedure, firms, _ = load_run(first_run)
        procedure = (procedure.without_dp() if tag == "nondp-logistic"
                     else _mlp_contrast(procedure, mlp_epochs_factor))
        started = time.perf_counter()
        target = train_federated(procedure, firms, [f.member for f in firms], seed=seed)
        from fedcrm.learning.metrics import auc
        from fedcrm.learning.models import predict_proba

        x_test = np.concatenate([f.x[~f.member] for f in firms])
        y_test = np.concatenate([f.y[~f.member] for f in firms])
        attacks = attack_model(target, procedure, firms, shadows=n_shadows, seed=seed)
        record(key, label, None, attacks, {
            "federated_auc_exact": auc(predict_proba(target, x_test), y_test),
            "attack_seconds": round(time.perf_counter() - started, 1),
        }, n_shadows)
    return out


def summarize_mia(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == label]
        row: dict[str, Any] = {"runs": len(mine), "seeds": [r["seed"] for r in mine],
                               "epsilon": mine[0]["epsilon"],
                               "model_auc": _mean([r.get("federated_auc_exact") or float("nan")
                                                   for r in mine])}
        for attack in ("loss_threshold", "lira"):
            aucs = [r["attacks"][attack]["auc"] for r in mine if attack in r["attacks"]]
            tprs = [r["attacks"][attack]["tpr_at_low_fpr"] for r in mine
                    if attack in r["attacks"]]
            if aucs:
                row[attack] = {"auc_mean": _mean(aucs), "auc_max": max(aucs), "aucs": aucs,
                               "tpr_at_1pct_fpr_mean": _mean(tprs)}
        out[label] = row
    return out


def print_mia(summary: dict[str, Any], seeds: Sequence[int], shadows: int) -> None:
    print(f"\nMembership inference: Telco, 5 firms, members = training customers, non-members = "
          f"held-out customers; seeds {list(seeds)}; LiRA with {shadows} shadow federations "
          "(fewer for the MLP contrast: see 'shadows' in the JSON)")
    header = (f"{'model':36} {'model AUC':>9} {'loss AUC':>9} {'TPR@1%':>7} {'LiRA AUC':>9} "
              f"{'TPR@1%':>7} {'<=0.52':>7}")
    print(header)
    print("-" * len(header))
    for label, row in summary.items():
        loss, lira = row.get("loss_threshold", {}), row.get("lira", {})
        eps = row["epsilon"]
        worst = max(loss.get("auc_max", 0.0), lira.get("auc_max", 0.0))
        met = ("yes" if worst <= TARGETS["mia_auc_max_at_eps_le_1"] else "NO") \
            if eps is not None and eps <= 1 else "-"
        print(f"{label:36} {row['model_auc']:9.4f} {loss.get('auc_mean', float('nan')):9.4f} "
              f"{loss.get('tpr_at_1pct_fpr_mean', float('nan')):7.4f} "
              f"{lira.get('auc_mean', float('nan')):9.4f} "
              f"{lira.get('tpr_at_1pct_fpr_mean', float('nan')):7.4f} {met:>7}")


# --------------------------------------------------------------------------- main


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "note": "shared 2-core machine; load averages are recorded per run",
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("poisoning", "mia"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5],
                        help="split seeds to report (defences were tuned on 0-2)")
    parser.add_argument("--purpose", default="report", help="'tune' or 'report' (recorded)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--honest-repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--resume", action="store_true", help="skip scenarios already logged")
    parser.add_argument("--mia-seeds", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--shadows", type=int, default=32)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 8.0])
    parser.add_argument("--mlp-epochs-factor", type=int, default=10)
    parser.add_argument("--mlp-shadows", type=int, default=16,
                        help="LiRA shadows for the (slow) non-DP MLP contrast")
    parser.add_argument("--out", type=Path, default=RESULTS / "security.json")
    args = parser.parse_args(argv)
    global RUNS_LOG
    RUNS_LOG = args.out.with_name(f"{args.out.stem}_runs.jsonl")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

    results: dict[str, Any] = {}
    results["machine"] = machine_info()
    results["targets"] = TARGETS
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedcrm-security-") as tmp:
        if args.only in (None, "poisoning"):
            runs: list[dict[str, Any]] = []
            for seed in args.seeds:
                runs += poisoning_seed(
                    seed, strategies=args.strategies, attacks=args.attacks,
                    honest_repeats=args.honest_repeats, rounds=args.rounds, resume=args.resume,
                    tmp=Path(tmp), purpose=args.purpose,
                )
            summary = summarize_poisoning(runs)
            print_poisoning(summary, args.seeds)
            results[f"poisoning_{args.purpose}"] = {
                "seeds": args.seeds, "rounds": args.rounds,
                "honest_repeats": args.honest_repeats, "summary": summary,
                "runs": [{k: v for k, v in r.items()
                          if k not in ("honest_update_norms", "malicious_sent_norms")}
                         for r in runs],
                "update_norms": _norm_stats(runs),
            }
        if args.only in (None, "mia"):
            mia_runs: list[dict[str, Any]] = []
            for seed in args.mia_seeds:
                mia_runs += mia_seed(seed, shadows=args.shadows, epsilons=args.epsilons,
                                     mlp_epochs_factor=args.mlp_epochs_factor,
                                     mlp_shadows=args.mlp_shadows,
                                     rounds=args.rounds, resume=args.resume, tmp=Path(tmp))
            mia_summary = summarize_mia(mia_runs)
            print_mia(mia_summary, args.mia_seeds, args.shadows)
            results["membership_inference"] = {
                "seeds": args.mia_seeds, "shadows": args.shadows, "rounds": args.rounds,
                "summary": mia_summary, "runs": mia_runs,
            }
    results["seconds"] = round(time.perf_counter() - started, 1)
    if args.out.exists():  # keep the other part's results (read now: it may have run meanwhile)
        results = {**json.loads(args.out.read_text()), **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"\nwrote {args.out}")
    return results


def _norm_stats(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Distribution of the honest firms' update norms (what a norm bound must let through)."""
    import numpy as np

    honest = np.asarray([n for r in runs for n in r["honest_update_norms"]], dtype=float)
    ratios = np.asarray([x for r in runs for x in r.get("honest_norm_over_round_median", [])])
    if honest.size == 0:
        return {}
    return {
        "honest_median": float(np.median(honest)),
        "honest_p99": float(np.quantile(honest, 0.99)),
        "honest_max": float(honest.max()),
        "n": int(honest.size),
        "honest_over_round_median_max": float(ratios.max()) if ratios.size else None,
        "honest_over_round_median_p99": float(np.quantile(ratios, 0.99)) if ratios.size else None,
    }


if __name__ == "__main__":
    main()
