"""Human-readable audit report and the auditor's export bundle.

:func:`render_report` turns :func:`privacy.audit.verify_run` into one self-contained HTML file
(inline CSS, figures as base64 PNG): verdict first, then per firm the ε spent against its cap,
releases by purpose, masking policy per column and row counts, then per round the participants,
rejected updates and model hashes, then the global model's metrics, and - when the run folder
has a ``mia.json`` (``fedcrm audit mia``) - what membership-inference attacks achieved against
the global model. It shows only what the logs and that file hold, which by construction is
counts, hashes, key ids, policies, DP parameters and attack scores; every string is
HTML-escaped. :func:`export_bundle` zips the logs, public keys, the report and a verification
summary for an auditor, and never any private key.
"""

from __future__ import annotations

import base64
import html
import io
import json
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedcrm.audit.log import (
    FEDERATION_DIR,
    FIRMS_DIR,
    KEYS_DIR,
    LOG_FILE,
    PUBLIC_KEY_FILE,
    TRUSTED_FILE,
)
from fedcrm.audit.verify import (
    FirmSummary,
    VerificationReport,
    require_run_folder,
    verify_run,
)
from fedcrm.privacy.durable import check_output_file, write_atomic
from fedcrm.privacy.errors import AuditError

SUMMARY_FILE = "summary.json"
MIA_FILE = "mia.json"
#: The membership-inference AUC fedcrm aims to stay under at ε ≤ 1 (docs/audit.md).
MIA_AUC_TARGET = 0.52
REPORT_FILE = "report.html"
VERIFICATION_FILE = "verification.json"

_ROW_ORDER = ("rows_read", "rows_kept", "rows_quarantined", "rows")

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1000px;color:#1d2430;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #d8dde6;
padding-bottom:.3rem}h3{margin-bottom:.3rem}
.verdict{font-size:1.4rem;font-weight:700;padding:.8rem 1rem;border-radius:6px;margin:1rem 0}
.pass{background:#e5f5ea;color:#17612d;border:1px solid #9bd3ab}
.fail{background:#fdeaea;color:#8a1c1c;border:1px solid #efa3a3}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #d8dde6;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f3f5f8}code,.hash{font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:.82rem}.muted{color:#667085;font-size:.9rem}
.firm{border:1px solid #d8dde6;border-radius:6px;padding:0 1rem 1rem;margin:1rem 0}
img{max-width:100%;height:auto}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def _short(h: str | None) -> str:
    if not h:
        return "<span class=muted>none</span>"
    return f'<span class="hash" title="{_e(h)}">{_e(h[:16])}…</span>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # Agg; no pyplot global state
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="figure">'


def _epsilon_figure(summary: FirmSummary) -> str:
    fig = Figure(figsize=(7.5, 3.0))
    ax = fig.add_subplot()
    xs = list(range(1, len(summary.releases) + 1))
    if xs:
        ax.step(xs, [r["cumulative_recomputed"] for r in summary.releases], where="post",
                color="#1f5fbf", label="ε spent (recomputed, composed)")
        ax.plot(xs, [r["cumulative_epsilon"] for r in summary.releases], "o", color="#1f5fbf",
                markersize=4, alpha=0.6, label="ε spent (as logged)")
    if summary.epsilon_cap is not None:
        ax.axhline(summary.epsilon_cap, color="#c0392b", linestyle="--",
                   label=f"cap ε={summary.epsilon_cap:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("release #")
    ax.set_ylabel("cumulative ε")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{summary.firm}: privacy budget spent", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a firm with no release and no cap: no legend
        ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def _metrics_figure(report: VerificationReport) -> str:
    series: dict[str, list[tuple[int, float]]] = {}
    for r in report.rounds:
        for name, value in r.metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault(str(name), []).append((r.round, float(value)))
    if not series:
        return ""
    fig = Figure(figsize=(7.5, 3.0))
    ax = fig.add_subplot()
    for name, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_title("global model metrics", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _verdict(report: VerificationReport) -> str:
    if report.ok:
        return ('<div class="verdict pass">PASS: every log verifies, every release is within '
                "its budget and every accepted update is covered</div>")
    rows = [(f"<code>{_e(f.file)}</code>", _e(f.line), f"<b>{_e(f.kind.value)}</b>", _e(f.detail))
            for f in report.failures]
    return (f'<div class="verdict fail">FAIL: {len(report.failures)} problem(s) found</div>'
            + _table(["file", "line", "kind", "detail"], rows))


def _firm_section(summary: FirmSummary) -> str:
    parts = [f'<div class="firm"><h3>{_e(summary.firm)}</h3>',
             f'<p class="muted">{summary.log_length} log entries, head {_short(summary.head)}, '
             f"signed by {_e(', '.join(summary.signers) or 'nobody')}; "
             f"{summary.updates_sent} updates sent, {summary.queries_answered} "
             f"analytics queries answered, {summary.overlaps_counted} customer overlaps "
             "counted</p>"]
    cap = "not logged" if summary.epsilon_cap is None else f"{summary.epsilon_cap:g}"
    delta = "" if summary.delta is None else f" at δ={summary.delta:g}"
    parts.append(f"<p>ε spent <b>{summary.epsilon_spent:.4g}</b> of cap <b>{_e(cap)}</b>"
                 f"{_e(delta)} over {len(summary.releases)} release(s).</p>")
    parts.append(_epsilon_figure(summary))
    if summary.budget_changes:
        parts.append("<h4>Budget changes (signed)</h4>")
        parts.append(_table(["time", "ε cap", "δ", "reason"], [
            (_e(c["time"]), _num(c["epsilon_cap"]), _e(f"{c['delta']:g}"), _e(c["reason"]))
            for c in summary.budget_changes]))
    parts.append("<h4>Releases by purpose</h4>")
    parts.append(_table(["purpose", "releases", "Σ ε of releases (before composition)"], [
        (_e(p), _num(int(v["count"])), _num(v["epsilon"]))
        for p, v in sorted(summary.releases_by_purpose.items())]))
    if summary.releases:
        parts.append("<h4>Releases</h4>")
        parts.append(_table(["line", "time", "purpose", "mechanism", "ε logged", "ε recomputed",
                             "cumulative (recomputed)"], [
            (_e(r["line"]), _e(r["time"]), _e(r["purpose"]), _e(r["mechanism"]),
             _num(r["epsilon"]), _num(r["epsilon_recomputed"]), _num(r["cumulative_recomputed"]))
            for r in summary.releases]))
    for table, policies in sorted(summary.masking.items()):
        parts.append(f"<h4>Masking policy: {_e(table)}</h4>")
        parts.append(_table(["column", "policy / role"],
                            [(f"<code>{_e(c)}</code>", _e(p)) for c, p in policies.items()]))
    if summary.rows:
        parts.append("<h4>Rows</h4>")
        present = {k for counts in summary.rows.values() for k in counts}
        keys = [k for k in _ROW_ORDER if k in present] + sorted(present - set(_ROW_ORDER))
        parts.append(_table(["table", *keys], [
            (_e(t), *(_num(counts.get(k, "")) for k in keys))
            for t, counts in sorted(summary.rows.items())]))
    parts.append("</div>")
    return "".join(parts)


def _rounds_section(report: VerificationReport) -> str:
    rows = []
    for r in report.rounds:
        rejected = "<br>".join(
            f"{_e(x.get('firm'))} ({_e(x.get('node_id'))}): {_e(x.get('reason'))}"
            for x in r.rejected) or "<span class=muted>none</span>"
        metrics = ", ".join(f"{_e(k)}={_num(v)}" for k, v in sorted(r.metrics.items()))
        rows.append((_e(r.round), _e(", ".join(r.participants) or "none"), rejected,
                     _short(r.model_hash), metrics))
    return _table(["round", "participants", "rejected updates", "global model", "metrics"], rows)


def _queries_section(report: VerificationReport) -> str:
    rows = []
    for q in report.queries:
        spec = q.get("spec", {})
        asked = (f"{spec.get('kind', '?')}, ε={spec.get('epsilon', '?')} per firm, "
                 f"min_firms={spec.get('min_firms', '?')}") if spec else ""
        rows.append((_e(q.get("query_id", "")), _e(q.get("query", "")), _e(asked),
                     _e(", ".join(q.get("offered_to", []))),
                     _e(", ".join(q.get("answered_by", []))), _e(q.get("status", "unfinished")),
                     _short(str(q.get("result_hash", "")))))
    return _table(["query id", "query", "asked", "offered to", "answered by", "status",
                   "result"], rows)


def _overlaps_section(report: VerificationReport) -> str:
    rows = []
    for o in report.overlaps:
        spec = o.get("spec", {})
        asked = (f"{spec.get('key', '?')}, ε={spec.get('epsilon', '?')} per firm"
                 if spec else "")
        estimate = o.get("estimate")
        rows.append((_e(o.get("overlap_id", "")), _e(o.get("overlap", "")), _e(asked),
                     _e(", ".join(o.get("firms", []))), _e(o.get("status", "unfinished")),
                     _e("-" if estimate is None else estimate)))
    return _table(["overlap id", "overlap", "asked", "firms", "status", "noisy count"], rows)


def load_membership(run_dir: Path) -> dict[str, Any] | None:
    """``mia.json`` of a run folder, if there is one (written by ``fedcrm audit mia``)."""
    path = Path(run_dir) / MIA_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {"unreadable": f"{path.name} is unreadable ({type(exc).__name__})"}
    return data if isinstance(data, dict) else {"unreadable": f"{path.name} is not an object"}


def _membership_section(mia: Mapping[str, Any]) -> str:
    if "unreadable" in mia:
        return f"<h2>Membership inference</h2><p class=muted>{_e(mia['unreadable'])}</p>"
    attacks = mia.get("attacks")
    if not isinstance(attacks, dict) or not attacks:
        return "<h2>Membership inference</h2><p class=muted>mia.json holds no attack</p>"
    first = next(iter(attacks.values()))
    eps = mia.get("epsilon_max")
    model = ("the released global model (DP, ε ≤ " + _num(eps) + " per firm)" if mia.get("dp")
             else "a non-DP model trained by the same procedure (contrast)")
    rows = []
    for name, a in attacks.items():
        value = a.get("auc") if isinstance(a, dict) else None
        flag = (" <b>(above " + _num(MIA_AUC_TARGET) + ")</b>"
                if isinstance(value, int | float) and value > MIA_AUC_TARGET else "")
        rows.append((_e(name), _num(value) + flag,
                     _num(a.get("tpr_at_low_fpr")) if isinstance(a, dict) else "",
                     _num(a.get("low_fpr")) if isinstance(a, dict) else ""))
    notes = "".join(f"<li>{_e(n)}</li>" for n in mia.get("notes") or [])
    return "".join([
        "<h2>Membership inference</h2>",
        f"<p>Attacks on {model}, run {_e(mia.get('run_id', '?'))}: "
        f"{_num(first.get('members'))} members (training customers) against "
        f"{_num(first.get('non_members'))} non-members (held-out customers); "
        f"{_num(mia.get('shadows'))} LiRA shadow models. AUC 0.5 is a coin toss; fedcrm aims "
        f"for at most {_num(MIA_AUC_TARGET)} at ε ≤ 1.</p>",
        _table(["attack", "AUC", "TPR at low FPR", "FPR"], rows),
        f"<ul>{notes}</ul>" if notes else "",
        f'<p class="muted">{_e(mia.get("method", ""))}. Computed by <code>fedcrm audit mia'
        "</code> where the members' data is (a simulation); not covered by the signatures "
        "above.</p>",
    ])


def render_html(report: VerificationReport, membership: Mapping[str, Any] | None = None) -> str:
    """The report for an already computed verification (see :func:`render_report`), with the
    membership-inference results of ``mia.json`` when given."""
    run = report.run
    title = f"fedcrm audit report: run {run.get('run_id', '(no run_started entry)')}"
    info = ", ".join(f"{k}: {run[k]}" for k in ("strategy", "task", "rounds") if k in run)
    final = _table(["metric", "value"], [(_e(k), _num(v)) for k, v in
                                         sorted(report.final_metrics.items())])
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">{_e(info)}; started {_e(run.get("started", "?"))}, finished '
        f'{_e(run.get("finished", "not recorded"))}; config hash '
        f'{_short(str(run.get("config_hash", "")))}</p>',
        _verdict(report),
        "<h2>Firms</h2>",
        *(_firm_section(s) for _, s in sorted(report.firms.items())),
        *(["<h2>Analytics queries</h2>", _queries_section(report)] if report.queries else []),
        *(["<h2>Customer overlaps</h2>", _overlaps_section(report)] if report.overlaps
          else []),
        *(["<h2>Rounds</h2>", _rounds_section(report)]
          if report.rounds or not (report.queries or report.overlaps) else []),
        "<h2>Global model</h2>",
        _metrics_figure(report),
        final if report.final_metrics else "<p class=muted>no global model recorded</p>",
        _membership_section(membership) if membership is not None else "",
        '<p class="muted">Built only from the signed audit logs and public keys of this run. '
        "ε is recomputed with dp_accounting's RDP accountant from the logged mechanism "
        "parameters.</p>",
    ]
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}'
            f"</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


def render_report(run_dir: Path, out: Path) -> Path:
    """Verify ``run_dir`` and write the self-contained HTML report to ``out``."""
    require_run_folder(Path(run_dir))
    out = check_output_file(Path(out), what="--out report")
    report = verify_run(Path(run_dir))
    write_atomic(out, render_html(report, load_membership(Path(run_dir))).encode("utf-8"),
                 mode=0o644)
    return out


def _bundle_files(root: Path) -> list[Path]:
    files = [root / FEDERATION_DIR / LOG_FILE, root / FEDERATION_DIR / PUBLIC_KEY_FILE,
             root / KEYS_DIR / TRUSTED_FILE, root / SUMMARY_FILE, root / MIA_FILE]
    for firm_dir in sorted(p for p in (root / FIRMS_DIR).glob("*") if p.is_dir()):
        files += [firm_dir / LOG_FILE, firm_dir / PUBLIC_KEY_FILE]
    return [f for f in files if f.is_file()]


def export_bundle(run_dir: Path, out_zip: Path) -> Path:
    """Zip what an auditor needs: logs, public keys, ``summary.json`` if present, the HTML report
    and ``verification.json``. Refuses to include anything that holds a private key."""
    root = require_run_folder(Path(run_dir))
    if not (root / FEDERATION_DIR / LOG_FILE).is_file():
        raise AuditError(
            f"{root} has no {FEDERATION_DIR}/{LOG_FILE}; pass a fedcrm run directory")
    out_zip = check_output_file(Path(out_zip), what="--out bundle")
    report = verify_run(root)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in _bundle_files(root):
            data = path.read_bytes()
            if b"PRIVATE KEY" in data:
                raise AuditError(f"{path} contains a private key; remove it before exporting")
            zf.writestr(str(path.relative_to(root)), data)
        zf.writestr(REPORT_FILE, render_html(report, load_membership(root)))
        zf.writestr(VERIFICATION_FILE, report.to_json())
    write_atomic(out_zip, buffer.getvalue(), mode=0o644)  # all or nothing: no half-written zip
    return out_zip


def bundle_manifest(out_zip: Path) -> Mapping[str, int]:
    """Names and sizes in an exported bundle (for a CLI to print)."""
    with zipfile.ZipFile(out_zip) as zf:
        return {i.filename: i.file_size for i in zf.infolist()}

