"""A generated corpus of bad input: every case fails cleanly and damages nothing.

Hypothesis draws the cases: CSV bytes (encodings, BOM, NUL, delimiters, quotes, huge fields,
duplicate headers, empty and header-only files), firm configs (wrong types, ranges, nan/inf,
missing and unknown sections and keys, paths that are files, folders, missing or under a file),
command-line arguments (negative, zero, nan, inf, markup characters, non-ASCII paths) and damaged
artifacts (manifest, encrypted store, keys, models, run folders). Every command runs in-process
(typer's CliRunner) against one small generated firm that is prepared, trained and scored once.

Every bad case must end with a non-zero exit code that is not "internal error" (70), no
traceback and no escaped exception, a message naming what it refers to, and every file that
existed before byte-for-byte (and mode) as it was; only lock files, and a refused prepare's list of
rejected rows, may appear. Cases that may be
valid (a BOM, CRLF line ends, an existing non-ASCII path) must succeed instead.

Cases whose handling belongs to CSV encoding detection (UTF-16, Latin-1, NUL bytes) are drawn
too but only held to "no traceback, no internal error, nothing damaged": whether such a file is
read or refused is that feature's decision.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import tomli_w
from click.testing import Result
from conftest import customers_columns, make_customers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedcrm.cli import app

RUNNER = CliRunner()
CASES = settings(
    deadline=None,
    database=None,
    derandomize=bool(os.environ.get("CI")),  # CI: the same generated cases on every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)
MARKUP = ["[/x]", "[bold]", "[red]x[/red]"]
NAMES = ["客户", "Müller-Łódź", "[/x]", "[bold]b", "[red]x[/red]", "a b", "ø"]


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """One small firm, prepared, with a trained churn model and its risk list."""

    root: Path
    scratch: Path
    counter: list[int] = field(default_factory=lambda: [0])

    @property
    def firm(self) -> Path:
        return self.root / "acme"

    @property
    def config(self) -> Path:
        return self.firm / "firm.toml"

    @property
    def model(self) -> Path:
        return self.root / "churn.pt"

    @property
    def risks(self) -> Path:
        return self.root / "risks.csv"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def fresh(self, name: str = "case") -> Path:
        """A new empty folder for one case's outputs (outside what is checked)."""
        self.counter[0] += 1
        path = self.scratch / f"{name}-{self.counter[0]}"
        path.mkdir(parents=True)
        return path


def _firm_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "firm": {"name": "acme", "keys_dir": "keys", "store_dir": "store"},
        "budget": {"epsilon": 50.0, "delta": 1e-5},
        "tables": {"customers": {"source": {"kind": "csv", "path": "customers.csv"},
                                 "columns": customers_columns()}},
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from test_audit import build_run

    from fedcrm.privacy.keys import init_keys

    root = tmp_path_factory.mktemp("corpus")
    w = World(root=root / "world", scratch=root / "scratch")
    w.firm.mkdir(parents=True)
    make_customers(300).to_csv(w.firm / "customers.csv", index=False)
    w.config.write_text(tomli_w.dumps(_firm_config()), encoding="utf-8")
    init_keys(w.firm / "keys", firm="acme")
    for args in (["prepare", "--config", str(w.config)],
                 ["train", "--config", str(w.config), "--out", str(w.model), "--epsilon", "2"],
                 ["score", "--model", str(w.model), "--config", str(w.config), "--out",
                  str(w.risks)]):
        r = RUNNER.invoke(app, args)
        assert r.exit_code == 0, r.output
    build_run(w.run)  # a signed run folder: coordinator + two firms (tests/test_audit.py)
    (w.run / "summary.json").write_text(json.dumps({
        "run_id": "r1", "task": "churn", "strategy": "fedavg", "rounds": 2, "firms": [],
        "status": "completed"}))
    return w


# --------------------------------------------------------------------------- the checks


def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    files: dict[str, tuple[str, int]] = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                mode = stat.S_IMODE(path.stat().st_mode)
                files[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), mode)
    return files


#: Files a refused command may write: lock files, and the rows a refused prepare rejected
#: (written for the user to fix the export; the store's own quarantine.csv stays as it was).
MAY_WRITE = (".lock", "quarantine.rejected.csv")


def assert_unchanged(before: dict[str, tuple[str, int]], after: dict[str, tuple[str, int]],
                     what: str) -> None:
    changed = [p for p, h in before.items() if after.get(p) != h and not p.endswith(MAY_WRITE)]
    assert not changed, f"{what} changed or removed existing files: {changed[:5]}"
    new = [p for p in after if p not in before and not p.endswith(MAY_WRITE)]
    assert not new, f"{what} left new files: {new[:5]}"


def invoke(args: list[str], *, wide: bool = False) -> Result:
    """One in-process command; ``wide`` renders tables 300 columns wide (no wrapped cells)."""
    return RUNNER.invoke(app, args, catch_exceptions=True, env={"COLUMNS": "300"} if wide else None)


def assert_clean_failure(r: Result, args: list[str], *, names: list[str] = ()) -> None:
    """Non-zero, not an internal error, no traceback or escaped exception, says where."""
    shown = f"{args!r} ->\n{r.output}"
    assert r.exit_code not in (0, 70), shown
    if r.exception is not None:
        assert isinstance(r.exception, SystemExit), f"{shown}\nescaped: {r.exception!r}"
    text = r.output
    assert "Traceback" not in text and "internal error" not in text, shown
    assert text.strip(), f"{shown}: no message at all"
    if names:  # the message names the file, folder, option or key it is about
        assert any(n in text for n in names), f"{shown}: names none of {names}"


def run_case(world: World, args: list[str], *, names: list[str] = (), expect: str = "fail",
             roots: tuple[Path, ...] = ()) -> Result:
    """Run one case; ``expect`` is "fail", "ok" or "either" (then only: clean, no damage)."""
    checked = (world.root, *roots)
    before = snapshot(*checked)
    r = invoke(args)
    if expect == "ok":
        assert r.exit_code == 0, f"{args!r} ->\n{r.output}"
        return r
    if r.exit_code == 0 and expect == "either":
        return r
    assert_clean_failure(r, args, names=list(names))
    assert_unchanged(before, snapshot(*checked), f"{args!r}")
    return r


# --------------------------------------------------------------------------- CSV bytes


@dataclass(frozen=True)
class CsvCase:
    label: str
    data: bytes
    expect: str  # fail | ok | either
    delimiter: str = ","


def _base_csv(rows: int, seed: int) -> str:
    frame = make_customers(rows, seed=seed)
    # a churn export needs both classes; a small random draw can hold only one, which prepare
    # rightly refuses, so the "ok" cases pin one customer of each class
    frame.loc[frame.index[0], "churned"] = "Yes"
    frame.loc[frame.index[1], "churned"] = "No"
    return frame.to_csv(index=False)


@st.composite
def csv_cases(draw: st.DrawFn) -> CsvCase:
    rows = draw(st.integers(5, 60))
    text = _base_csv(rows, draw(st.integers(0, 5)))
    lines = text.splitlines(keepends=True)
    line = draw(st.integers(1, len(lines) - 1))
    kind = draw(st.sampled_from([
        "bom", "crlf", "cr", "delimiter", "delimiter_declared", "unterminated_quote",
        "extra_field", "missing_field", "huge_field", "duplicate_header", "blank_header",
        "empty", "header_only", "blank_lines", "binary", "truncated", "utf16", "latin1",
        "gb18030", "nul", "markup_column", "non_ascii_column",
    ]))
    if kind == "bom":
        return CsvCase(kind, "\ufeff".encode() + text.encode(), "ok")
    if kind == "crlf":
        return CsvCase(kind, text.replace("\n", "\r\n").encode(), "ok")
    if kind == "cr":
        return CsvCase(kind, text.replace("\n", "\r").encode(), "either")
    if kind in ("delimiter", "delimiter_declared"):
        sep = draw(st.sampled_from([";", "\t", "|"]))
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        data = frame.to_csv(index=False, sep=sep).encode()
        if kind == "delimiter_declared":
            return CsvCase(kind, data, "ok", delimiter=sep)
        return CsvCase(kind, data, "fail")
    if kind == "unterminated_quote":
        lines[line] = '"' + lines[line]
        return CsvCase(kind, "".join(lines).encode(), "fail")
    if kind == "extra_field":
        lines[line] = lines[line].rstrip("\n") + ",extra,more\n"
        return CsvCase(kind, "".join(lines).encode(), "fail")
    if kind == "missing_field":  # a short row: pandas pads it with blanks -> quarantined
        lines[line] = lines[line].split(",", 1)[0] + "\n"
        return CsvCase(kind, "".join(lines).encode(), "either")
    if kind == "huge_field":
        size = draw(st.integers(100_000, 3_000_000))
        cells = lines[line].rstrip("\n").split(",")
        cells[-1] = "x" * size  # the dropped notes column
        lines[line] = ",".join(cells) + "\n"
        return CsvCase(kind, "".join(lines).encode(), "either")
    if kind == "duplicate_header":
        header = lines[0].rstrip("\n").split(",")
        i, j = draw(st.lists(st.integers(0, len(header) - 1), min_size=2, max_size=2,
                             unique=True))
        header[j] = header[i]
        lines[0] = ",".join(header) + "\n"
        return CsvCase(kind, "".join(lines).encode(), "fail")
    if kind == "blank_header":
        header = lines[0].rstrip("\n").split(",")
        header[draw(st.integers(0, len(header) - 1))] = ""
        lines[0] = ",".join(header) + "\n"
        return CsvCase(kind, "".join(lines).encode(), "fail")
    if kind == "empty":
        return CsvCase(kind, b"", "fail")
    if kind == "header_only":
        return CsvCase(kind, lines[0].encode() if draw(st.booleans()) else
                       lines[0].rstrip("\n").encode(), "fail")
    if kind == "blank_lines":
        return CsvCase(kind, b"\n" * draw(st.integers(1, 5)), "fail")
    if kind == "binary":
        return CsvCase(kind, draw(st.binary(min_size=1, max_size=2000)), "fail")
    if kind == "truncated":
        data = text.encode()
        return CsvCase(kind, data[:draw(st.integers(1, len(data) - 1))], "either")
    if kind == "markup_column":
        header = lines[0].rstrip("\n").split(",")
        header[-1] = draw(st.sampled_from(MARKUP))  # the dropped notes column, renamed
        lines[0] = ",".join(header) + "\n"
        return CsvCase(kind, "".join(lines).encode(), "fail")
    if kind == "non_ascii_column":
        header = lines[0].rstrip("\n").split(",")
        header[-1] = draw(st.sampled_from(["备注", "Notizen-ß", "заметки"]))
        lines[0] = ",".join(header) + "\n"
        return CsvCase(kind, "".join(lines).encode(), "fail")
    # the encoding cases: whether they are read or refused is encoding detection's decision
    names = "".join(lines)
    if kind == "utf16":
        return CsvCase(kind, names.encode("utf-16"), "either")
    if kind == "latin1":
        return CsvCase(kind, names.replace("Anna", "Anaïs").encode("latin-1"), "either")
    if kind == "gb18030":
        return CsvCase(kind, names.replace("Anna", "王秀英").encode("gb18030"), "either")
    cut = draw(st.integers(0, len(names) - 1))  # nul
    return CsvCase(kind, (names[:cut] + "\x00" + names[cut:]).encode(), "either")


@pytest.fixture(scope="module")
def csv_firm(world: World) -> Path:
    """A second prepared firm whose export the CSV cases overwrite."""
    from fedcrm.privacy.keys import init_keys

    firm = world.root.parent / "csvfirm"
    firm.mkdir()
    make_customers(40).to_csv(firm / "customers.csv", index=False)
    (firm / "firm.toml").write_text(tomli_w.dumps(_firm_config()), encoding="utf-8")
    init_keys(firm / "keys", firm="acme")
    r = RUNNER.invoke(app, ["prepare", "--config", str(firm / "firm.toml")])
    assert r.exit_code == 0, r.output
    return firm


@settings(CASES, max_examples=70)
@given(case=csv_cases())
def test_csv_bytes_fail_cleanly_or_prepare(world: World, csv_firm: Path, case: CsvCase) -> None:
    source = csv_firm / "customers.csv"
    source.write_bytes(case.data)
    config = _firm_config()
    config["tables"]["customers"]["source"]["delimiter"] = case.delimiter
    (csv_firm / "firm.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    before = snapshot(csv_firm)
    # scan reads only: never a traceback, never a change, whatever the bytes
    r = invoke(["scan", str(source), "--delimiter", case.delimiter])
    if r.exit_code != 0:
        assert_clean_failure(r, ["scan", case.label], names=[str(source)])
    elif case.expect == "fail" and case.label not in ("delimiter", "markup_column",
                                                      "non_ascii_column", "binary"):
        pytest.fail(f"scan accepted a {case.label} CSV:\n{r.output}")
    assert_unchanged(before, snapshot(csv_firm), f"scan of a {case.label} CSV")
    # prepare: the firm's good store is replaced only by a good export
    r = invoke(["prepare", "--config", str(csv_firm / "firm.toml"), "--replace-with-fewer"])
    if case.expect == "ok":
        assert r.exit_code == 0, f"{case.label}: {r.output}"
    elif r.exit_code != 0 or case.expect == "fail":
        assert_clean_failure(r, ["prepare", case.label],
                             names=[str(source), "customers", "firm.toml"])
        assert_unchanged(before, snapshot(csv_firm), f"prepare of a {case.label} CSV")


# --------------------------------------------------------------------------- firm configs

_DELETE = object()  # a key to remove

#: (key path, bad values): every value here is invalid for its key.
BAD_VALUES: list[tuple[tuple[str, ...], list[Any]]] = [
    (("firm", "name"), ["", "a b", "[/x]", "客户", "x" * 300, 7, ["acme"]]),
    (("budget", "epsilon"), [-1.0, 0.0, float("nan"), float("inf"), 1e9, "one", [1], True]),
    (("budget", "delta"), [-1e-5, 0.0, 0.5, float("nan"), "tiny", {"x": 1}]),
    (("validation", "max_quarantine_fraction"), [-0.1, 1.5, float("nan"), "all"]),
    (("federation", "public_size"), [0, -5, 10**12, "many", 1.5]),
    (("federation", "evaluation_share"), [0.0, 1.0, float("nan"), float("inf"), -0.2]),
    (("training", "epochs"), [0, -1, float("nan"), float("inf"), "ten"]),
    (("training", "batch_size"), [0, -8, 10**9, 2.5, "big"]),
    (("training", "learning_rate"), [0.0, -0.1, float("nan"), float("inf"), 1e6]),
    (("training", "max_grad_norm"), [0.0, -1.0, float("nan"), float("inf")]),
    (("training", "model"), ["resnet", 3]),
    (("features", "as_of"), ["yesterday", "2024-13-45", 20240101]),
    (("features", "churn_horizon_days"), [0, -30, "ninety"]),
    (("tables", "customers", "source", "kind"), ["excel", 1, ""]),
    (("tables", "customers", "source", "encoding"), ["klingon", "", 8]),
    (("tables", "customers", "source", "delimiter"), ["", ";;", 44]),
    (("tables", "customers", "source", "chunk_rows"), [0, -1, 10, "lots"]),
    (("tables", "customers", "columns", "tenure", "min"), [float("nan"), "low", 500]),
    (("tables", "customers", "columns", "tenure", "kind"), ["integer", _DELETE]),
    (("tables", "customers", "columns", "email", "policy"), ["scramble", "keep", ""]),
    (("tables", "customers", "columns", "email", "role"), ["secret", 1]),
    (("tables", "customers", "columns", "plan", "categories"), [[], "basic"]),
    (("tables", "customers", "columns", "cust_id", "role"), ["feature", "label"]),
    (("firm", "colour"), ["blue"]),  # unknown key
    (("shipping",), [{"fast": True}]),  # unknown section
    (("tables", "orders"), [{"source": {"kind": "csv", "path": "o.csv"}, "columns": {}}]),
]
REQUIRED = [("firm",), ("budget",), ("tables",), ("firm", "name"), ("firm", "keys_dir"),
            ("budget", "epsilon"), ("tables", "customers", "source"),
            ("tables", "customers", "columns", "cust_id")]
FIRM_COMMANDS = ["prepare", "budget", "train", "score", "contact-list"]
_KEYS, _STORE = ("firm", "keys_dir"), ("firm", "store_dir")
_SOURCE, _AUDIT = ("tables", "customers", "source", "path"), ("firm", "audit_log")
_STORE_USERS = ["prepare", "train", "score"]
_SOURCE_USERS = ["prepare", "contact-list"]
_AUDIT_USERS = ["prepare", "budget", "train"]  # score and contact-list release nothing
#: (key, shape, relative path, the commands that use that path): all of them invalid.
PATH_CASES: list[tuple[tuple[str, ...], str, str, list[str]]] = [
    (_KEYS, "a file", "customers.csv", FIRM_COMMANDS),
    (_KEYS, "missing", "nowhere/keys", FIRM_COMMANDS),
    (_KEYS, "under a file", "customers.csv/keys", FIRM_COMMANDS),
    (_KEYS, "an awkward missing name", "{name}/keys", FIRM_COMMANDS),
    (_STORE, "a file", "customers.csv", _STORE_USERS),
    (_STORE, "under a file", "customers.csv/store", _STORE_USERS),
    (_STORE, "empty elsewhere", "{name}/store", ["train", "score"]),
    (_SOURCE, "a folder", "keys", _SOURCE_USERS),
    (_SOURCE, "missing", "nowhere.csv", _SOURCE_USERS),
    (_SOURCE, "under a file", "customers.csv/x.csv", _SOURCE_USERS),
    (_SOURCE, "an awkward missing name", "{name}.csv", _SOURCE_USERS),
    (_SOURCE, "the key file", "keys/data-v1.key", ["prepare"]),
    (_AUDIT, "a folder", "keys", _AUDIT_USERS),
    (_AUDIT, "under a file", "customers.csv/audit.jsonl", _AUDIT_USERS),
]


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc.setdefault(key, {})
    if value is _DELETE:
        doc.pop(path[-1], None)
    else:
        doc[path[-1]] = value



def _command(world: World, name: str, config: Path) -> list[str]:
    out = world.fresh("out")
    return {
        "prepare": ["prepare", "--config", str(config)],
        "budget": ["budget", "status", "--config", str(config)],
        "train": ["train", "--config", str(config), "--out", str(out / "m.pt"), "--epsilon",
                  "0.5"],
        "score": ["score", "--model", str(world.model), "--config", str(config), "--out",
                  str(out / "r.csv")],
        "contact-list": ["contact-list", "--risks", str(world.risks), "--config", str(config),
                         "--out", str(out / "c.csv")],
    }[name]


@st.composite
def config_cases(draw: st.DrawFn) -> tuple[str, dict[str, Any], list[str], list[str]]:
    """(label, config document, commands to run, names the message may give)."""
    kind = draw(st.sampled_from(["value", "value", "value", "missing", "path", "toml"]))
    doc = _firm_config()
    if kind == "value":
        path, values = draw(st.sampled_from(BAD_VALUES))
        value = draw(st.sampled_from(values))
        _set(doc, path, value)
        return (f"{'.'.join(path)} = {value!r}", doc, FIRM_COMMANDS,
                [path[0], ".".join(path[-2:]), path[-1]])
    if kind == "missing":
        path = draw(st.sampled_from(REQUIRED))
        _set(doc, path, _DELETE)
        return f"no {'.'.join(path)}", doc, FIRM_COMMANDS, [path[-1], path[0]]
    if kind == "path":
        key, shape, target, commands = draw(st.sampled_from(PATH_CASES))
        if "{name}" in target:
            target = target.replace("{name}", draw(st.sampled_from(NAMES)))
        _set(doc, key, target)
        return f"{'.'.join(key)} -> {shape}", doc, commands, [target.split("/")[0], key[-1]]
    return "not TOML", {}, FIRM_COMMANDS, ["firm.toml", "TOML"]


@settings(CASES, max_examples=70)
@given(case=config_cases(), pick=st.integers(0, 10))
def test_bad_firm_config_fails_cleanly_everywhere(world: World, case: tuple[Any, ...],
                                                   pick: int) -> None:
    _label, doc, commands, names = case
    folder = world.fresh("cfg")
    config = world.firm / f"case-{folder.name}.toml"  # beside the real config: same relative paths
    try:
        if doc:
            config.write_text(tomli_w.dumps(doc), encoding="utf-8")
        else:
            config.write_bytes(b"[firm\nname = 'acme'\n\x00")
        command = _command(world, commands[pick % len(commands)], config)
        run_case(world, command, names=[*names, config.name], roots=())
    finally:
        config.unlink(missing_ok=True)


# --------------------------------------------------------------------------- arguments


@st.composite
def argument_cases(draw: st.DrawFn) -> tuple[str, list[str], list[str], str]:
    """(label, args with {cfg}/{model}/... placeholders, names, expect)."""
    bad_float = draw(st.sampled_from(["-1", "0", "nan", "inf", "-inf", "1e309", "abc", "[/x]",
                                      "1,5", ""]))
    bad_int = draw(st.sampled_from(["-5", "0", "-1", "x", "1.5", "[red]x[/red]", "1e3"]))
    name = draw(st.sampled_from(NAMES))
    choice = draw(st.sampled_from([
        ("train --epsilon", ["train", "--config", "{cfg}", "--out", "{out}/m.pt",
                             "--epsilon", bad_float], ["--epsilon", "epsilon"], "fail"),
        ("train --epsilon over the cap", ["train", "--config", "{cfg}", "--out", "{out}/m.pt",
                                          "--epsilon", "1000"], ["budget", "ε"], "fail"),
        ("train --out folder", ["train", "--config", "{cfg}", "--out", "{out}"], ["{out}"],
         "fail"),
        ("train --task", ["train", "--config", "{cfg}", "--out", "{out}/m.pt", "--task", name],
         ["--task"], "fail"),
        ("scan --sample-rows", ["scan", "{csv}", "--sample-rows", bad_int], ["--sample-rows"],
         "fail"),
        ("scan missing", ["scan", f"{{out}}/{name}.csv"], [name], "fail"),
        ("scan folder", ["scan", "{out}"], ["{out}"], "fail"),
        ("scan type", ["scan", f"{{out}}/{name}.xlsx"], [name], "fail"),
        ("scan delimiter", ["scan", "{csv}", "--delimiter", draw(st.sampled_from(["", ";;",
                                                                                 "ab"]))],
         ["delimiter"], "fail"),
        ("scan encoding", ["scan", "{csv}", "--encoding", name], ["encoding", name], "fail"),
        ("scan --write-config exists", ["scan", "{csv}", "--write-config", "{cfg}"], ["{cfg}"],
         "fail"),
        ("scan --table", ["scan", "{csv}", "--write-config", "{out}/n.toml", "--table", name],
         ["--table"], "fail"),
        ("keys init --firm", ["keys", "init", "--firm", name, "--out", "{out}/k"], [name],
         "fail"),
        ("keys init --out file", ["keys", "init", "--firm", "acme", "--out", "{csv}"], ["{csv}"],
         "fail"),
        ("keys init --out existing keys", ["keys", "init", "--firm", "acme", "--out",
                                           "{keys}"], ["{keys}"], "fail"),
        ("keys rotate --kind", ["keys", "rotate", "--dir", "{keys}", "--kind", name], ["--kind"],
         "fail"),
        ("budget raise --epsilon", ["budget", "raise", "--config", "{cfg}", "--epsilon",
                                    bad_float, "--reason", "x"], ["--epsilon", "epsilon"],
         "fail"),
        ("budget status both", ["budget", "status", "--config", "{cfg}", "--ledger", "{csv}"],
         ["--config", "--ledger"], "fail"),
        ("budget status --ledger", ["budget", "status", "--ledger", f"{{out}}/{name}.jsonl"],
         [name], "fail"),
        ("score --out folder", ["score", "--model", "{model}", "--config", "{cfg}", "--out",
                                "{out}"], ["{out}"], "fail"),
        ("score --out under a file", ["score", "--model", "{model}", "--config", "{cfg}",
                                      "--out", "{csv}/r.csv"], ["{csv}"], "fail"),
        ("score --model missing", ["score", "--model", f"{{out}}/{name}.pt", "--config",
                                   "{cfg}", "--out", "{out}/r.csv"], [name], "fail"),
        ("score --model is the CSV", ["score", "--model", "{csv}", "--config", "{cfg}", "--out",
                                      "{out}/r.csv"], ["{csv}"], "fail"),
        ("contact-list --include", ["contact-list", "--risks", "{risks}", "--config", "{cfg}",
                                    "--include", name, "--out", "{out}/c.csv"], [name], "fail"),
        ("contact-list --band", ["contact-list", "--risks", "{risks}", "--config", "{cfg}",
                                 "--band", name, "--out", "{out}/c.csv"], ["--band"], "fail"),
        ("contact-list --risks not a risk list", ["contact-list", "--risks", "{csv}",
                                                  "--config", "{cfg}", "--out", "{out}/c.csv"],
         ["{csv}"], "fail"),
        ("contact-list --out the risks", ["contact-list", "--risks", "{risks}", "--config",
                                          "{cfg}", "--out", "{risks}"], ["{risks}"], "fail"),
        ("prepare --config folder", ["prepare", "--config", "{out}"], ["{out}"], "fail"),
        ("prepare --config missing", ["prepare", "--config", f"{{out}}/{name}.toml"], [name],
         "fail"),
        ("simulate --config missing", ["simulate", "--config", f"{{out}}/{name}.toml"], [name],
         "fail"),
        ("simulate --config firm", ["simulate", "--config", "{cfg}"], ["{cfg}"], "fail"),
        ("deploy local --firms", ["deploy", "local", "--config", "{out}/d.toml", "--firms",
                                  bad_int], ["--firms", "d.toml"], "fail"),
        ("run --timeout", ["run", "--config", "{out}/r.toml", "--timeout", bad_float],
         ["--timeout", "r.toml"], "fail"),
        ("node start --max-retries", ["node", "start", "--config", "{out}/f.toml",
                                      "--superlink", "127.0.0.1:1", "--ca", "{out}/ca.crt",
                                      "--auth-key", "{out}/k.key", "--max-retries", bad_int],
         ["--max-retries", "f.toml", "ca.crt"], "fail"),
        ("node start --max-wait-time", ["node", "start", "--config", "{out}/f.toml",
                                        "--superlink", "127.0.0.1:1", "--ca", "{out}/ca.crt",
                                        "--auth-key", "{out}/k.key", "--max-wait-time",
                                        bad_float],
         ["--max-wait-time", "f.toml", "ca.crt"], "fail"),
        ("link start --config", ["link", "start", "--config", f"{{out}}/{name}.toml"], [name],
         "fail"),
        ("link register", ["link", "register", "--firm", name, "--public-key", "{csv}",
                           "--config", "{out}/c.toml"], ["c.toml", name], "fail"),
        ("certs server --ca missing", ["certs", "server", "--ca", f"{{out}}/{name}", "--out",
                                       "{out}/s"], [name], "fail"),
        ("certs node-key --firm", ["certs", "node-key", "--firm", name, "--out", "{out}/n"],
         [name, "firm"], "fail"),
        ("certs ca --out file", ["certs", "ca", "--out", "{csv}"], ["{csv}"], "fail"),
        ("runs list --root", ["runs", "show", name, "--root", "{out}"], [name, "{out}"], "fail"),
        ("audit verify missing", ["audit", "verify", f"{{out}}/{name}"], [name], "fail"),
        ("audit verify a firm folder", ["audit", "verify", "{firm}"], ["{firm}"], "fail"),
        ("audit verify --key", ["audit", "verify", "{run}", "--key", "{csv}"], ["--key"],
         "fail"),
        ("audit verify log with a bad key", ["audit", "verify", "{firm}/store/audit.jsonl",
                                             "--key", "{csv}"], ["{csv}"], "fail"),
        ("audit report missing", ["audit", "report", f"{{out}}/{name}", "--out",
                                  "{out}/r.html"], [name], "fail"),
        ("audit report --out folder", ["audit", "report", "{run}", "--out", "{out}"], ["{out}"],
         "fail"),
        ("audit export not a run", ["audit", "export", "{firm}", "--out", "{out}/b.zip"],
         ["{firm}"], "fail"),
        ("datasets export --out file", ["datasets", "export", "--out", "{csv}"], ["{csv}"],
         "fail"),
        ("scan a non-ASCII or markup name", ["scan", f"{{out}}/{name}.csv"], [name], "copy"),
        ("keys init a non-ASCII or markup folder", ["keys", "init", "--firm", "acme2", "--out",
                                                    f"{{out}}/{name}"], [name], "ok"),
    ]))
    return choice


@settings(CASES, max_examples=110)
@given(case=argument_cases())
def test_bad_arguments_fail_cleanly(world: World, case: tuple[Any, ...]) -> None:
    _label, template, names, expect = case
    out = world.fresh("arg")
    keys = world.firm / "keys"
    places = {"{cfg}": str(world.config), "{out}": str(out), "{model}": str(world.model),
              "{csv}": str(world.firm / "customers.csv"), "{keys}": str(keys),
              "{risks}": str(world.risks), "{run}": str(world.run), "{firm}": str(world.firm)}

    def fill(text: str) -> str:
        for k, v in places.items():
            text = text.replace(k, v)
        return text

    args = [fill(a) for a in template]
    if expect == "copy":  # an existing export under an awkward name: scanned like any other
        Path(args[1]).parent.mkdir(parents=True, exist_ok=True)  # a "/" in the name: a folder
        shutil.copy(world.firm / "customers.csv", args[1])
        r = run_case(world, args, expect="ok")
        assert Path(args[1]).name in r.output  # the name is shown as written, never as markup
        return
    r = run_case(world, args, names=[fill(n) for n in names], expect=expect)
    if expect == "ok":
        assert args[-1] in r.output


# --------------------------------------------------------------------------- damaged artifacts


def _copy_firm(world: World) -> tuple[Path, Path]:
    """A copy of the prepared firm to damage (its keys still find the world's ledger)."""
    copy = world.fresh("firm") / "acme"
    shutil.copytree(world.firm, copy)
    return copy, copy / "firm.toml"


def _damage_bytes(path: Path, how: str, draw: Callable[[Any], Any]) -> None:
    data = path.read_bytes()
    if how == "truncate":
        # cut at least one byte that matters: dropping only trailing whitespace (a JSON file's
        # final newline) leaves the same document, which is not damage
        meaningful = len(data.rstrip())
        path.write_bytes(data[:draw(st.integers(0, max(0, meaningful - 1)))])
    elif how == "flip":
        i = draw(st.integers(0, len(data) - 1))
        path.write_bytes(data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:])
    elif how == "garbage":
        path.write_bytes(draw(st.binary(min_size=0, max_size=300)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "delete":
        path.unlink()
    elif how == "folder":
        path.unlink()
        path.mkdir()


def _keys(doc: Any, prefix: str = "") -> set[str]:
    if not isinstance(doc, dict):
        return {f"{prefix}:{type(doc).__name__}"}
    return set().union(*(_keys(v, f"{prefix}/{k}") for k, v in doc.items()), {prefix})


def _same_shape(world: World, firm: Path, name: str) -> bool:
    """Whether a damaged JSON file is still JSON with the good one's fields and value types."""
    good = json.loads((world.firm / name).read_text())
    try:
        bad = json.loads((firm / name).read_bytes())
    except ValueError:
        return False
    return _keys(bad) == _keys(good)


def _same_signing_key(world: World, firm: Path) -> bool:
    from cryptography.hazmat.primitives import serialization

    def raw(path: Path) -> bytes | None:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except Exception:  # any refusal means the key did change
            return None
        return key.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)

    good = raw(world.firm / "keys" / "signing.key")
    return good is not None and raw(firm / "keys" / "signing.key") == good


MANIFEST_SHAPES: list[Any] = [[], {}, {"tables": "x"}, {"firm": "acme", "tables": {},
                                                         "store_hash": 1}, "manifest", None]


@settings(CASES, max_examples=70)
@given(data=st.data())
def test_damaged_artifacts_are_refused_cleanly(world: World, data: st.DataObject) -> None:
    draw = data.draw
    firm, config = _copy_firm(world)
    prepared = firm / "store" / "prepared"
    target = draw(st.sampled_from(["manifest", "manifest_shape", "manifest_firm", "store",
                                   "keys_meta", "pseudonym_key", "data_key", "signing_key",
                                   "key_mode", "model", "run_log", "run_pub", "run_summary",
                                   "run_trusted"]))
    how = draw(st.sampled_from(["truncate", "flip", "garbage", "empty", "delete", "folder"]))
    out = world.fresh("dmg")
    model = world.model
    if target == "manifest":
        _damage_bytes(prepared / "manifest.json", how, draw)
    elif target == "manifest_shape":
        (prepared / "manifest.json").write_text(json.dumps(draw(st.sampled_from(
            MANIFEST_SHAPES))))
    elif target == "manifest_firm":
        doc = json.loads((prepared / "manifest.json").read_text())
        doc["firm"] = draw(st.sampled_from(["globex", "[/x]", ""]))
        (prepared / "manifest.json").write_text(json.dumps(doc))
    elif target == "store":
        name = draw(st.sampled_from(["customers.fcs", "features.fcs"]))
        _damage_bytes(prepared / name, how if how != "flip" else "flip", draw)
    elif target in ("keys_meta", "pseudonym_key", "data_key", "signing_key"):
        name = {"keys_meta": "keys.json", "pseudonym_key": "pseudonym-v1.key",
                "data_key": "data-v1.key", "signing_key": "signing.key"}[target]
        _damage_bytes(firm / "keys" / name, how, draw)
    elif target == "key_mode":
        os.chmod(firm / "keys" / draw(st.sampled_from(["data-v1.key", "pseudonym-v1.key",
                                                       "signing.key"])), 0o644)
    elif target == "model":
        model = out / "churn.pt"
        shutil.copy(world.model, model)
        _damage_bytes(model, how, draw)
    if target.startswith("run_"):
        run = out / "run"
        shutil.copytree(world.run, run)
        path = {"run_log": run / "firms" / "acme" / "audit.jsonl",
                "run_pub": run / "federation" / "signing.pub",
                "run_summary": run / "summary.json",
                "run_trusted": run / "keys" / "trusted.json"}[target]
        if path.exists():
            _damage_bytes(path, how, draw)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(draw(st.binary(max_size=200)))
        command = draw(st.sampled_from([
            ["audit", "verify", str(run)],
            ["audit", "verify", str(run), "--json"],
            ["audit", "report", str(run), "--out", str(out / "r.html")],
            ["audit", "export", str(run), "--out", str(out / "b.zip")],
            ["runs", "show", "run", "--root", str(out)],
        ]))
        before = snapshot(world.root, run)
        r = invoke(command)
        if target == "run_summary" or command[1] in ("report", "export") or r.exit_code == 0:
            # a damaged summary only matters to `runs show`; report/export write the verdict
            assert r.exception is None or isinstance(r.exception, SystemExit), r.output
            assert "Traceback" not in r.output and "internal error" not in r.output, r.output
            assert r.exit_code != 70
        else:
            assert_clean_failure(r, command, names=[str(run), "FAIL"])
        assert_unchanged(before, snapshot(world.root, run), f"{command!r} on damaged {target}")
        return
    command = draw(st.sampled_from(["score", "budget", "train", "contact-list"]
                                   if target != "model" else ["score"]))
    args = _command(world, command, config)
    if target == "model":
        args[args.index("--model") + 1] = str(model)
    if command == "budget" and target in ("manifest", "manifest_shape", "manifest_firm",
                                          "store", "model"):
        return  # the budget reads neither the store nor a model: nothing to refuse
    if command == "contact-list" and target in ("manifest", "manifest_shape", "manifest_firm",
                                                "store", "data_key"):
        return  # the contact list reads the export and the pseudonym key only
    if target == "signing_key" and how == "flip" and _same_signing_key(world, firm) \
            and invoke(args).exit_code == 0:
        return  # the flip hit PEM whitespace (a line break): the key itself is unchanged
    shaped = {"manifest": "store/prepared/manifest.json", "keys_meta": "keys/keys.json"}
    if target in shaped and how == "flip" and _same_shape(world, firm, shaped[target]) \
            and invoke(args).exit_code == 0:
        # the flipped byte sits inside a descriptive value (a date, a version, a count); every
        # value that matters (hashes, key ids, columns) is checked against the store and keys
        return
    if target == "model" and how == "flip" and invoke(args).exit_code == 0:
        # a flipped byte outside the weights (a zip field torch ignores): the loader checked the
        # weights against the model's provenance, so scoring it is right, not a failure to refuse
        return
    run_case(world, args, names=[str(firm), str(model), "key", "manifest", "store", "model"],
             roots=(firm,))


# --------------------------------------------------------------------------- markup and help


def test_user_text_is_never_read_as_markup(world: World) -> None:
    """File, column and firm names holding markup are shown exactly as written, everywhere."""
    from fedcrm.privacy.keys import init_keys

    for text in MARKUP:
        out = world.fresh("markup")
        folder = out / f"export{text}"
        folder.mkdir(parents=True)
        export = folder / f"customers{text.replace('/', '-')}.csv"  # "/" would make a folder
        frame = make_customers(30)
        frame[f"notes{text}"] = "x"
        frame.to_csv(export, index=False)
        r = invoke(wide=True, args=["scan", str(export)])
        assert r.exit_code == 0 and str(export) in r.output and f"notes{text}" in r.output, \
            r.output
        cfg = _firm_config()
        cfg["tables"]["customers"]["source"]["path"] = export.name
        cfg["firm"]["store_dir"] = f"store{text}"
        (folder / "firm.toml").write_text(tomli_w.dumps(cfg), encoding="utf-8")
        init_keys(folder / "keys", firm="acme")
        r = invoke(wide=True, args=["prepare", "--config", str(folder / "firm.toml")])
        assert r.exit_code != 0 and f"'notes{text}'" in r.output, r.output
        frame.drop(columns=[f"notes{text}"]).to_csv(export, index=False)
        r = invoke(wide=True, args=["prepare", "--config", str(folder / "firm.toml")])
        assert r.exit_code == 0 and f"store{text}" in r.output, r.output
        for args, shown in [
            (["keys", "init", "--firm", text, "--out", str(out / "k")], text),
            (["keys", "init", "--firm", "ok", "--out", str(folder / f"keys{text}")],
             f"keys{text}"),
            (["score", "--model", str(world.model), "--config", str(world.config), "--out",
              str(folder / f"risks{text}.csv")], f"risks{text}.csv"),
            (["contact-list", "--risks", str(world.risks), "--config", str(world.config),
              "--out", str(folder / f"c{text}.csv"), "--include", text], text),
            (["audit", "verify", str(folder)], str(folder)),
            (["audit", "report", str(folder), "--out", str(folder / "r.html")], str(folder)),
            (["runs", "list", "--root", str(folder)], str(folder)),
            (["certs", "node-key", "--firm", text, "--out", str(out / "n")], text),
            (["budget", "status", "--ledger", str(folder / f"b{text}.jsonl")],
             f"b{text}.jsonl"),
            (["simulate", "--config", str(folder / f"s{text}.toml")], f"s{text}.toml"),
            (["train", "--config", str(world.config), "--out", str(out), "--epsilon", text],
             text),
        ]:
            r = invoke(args, wide=True)
            assert "Traceback" not in r.output and r.exit_code != 70, (args, r.output)
            assert shown in r.output, (args, r.output)


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    import click

    for name, command in getattr(group, "commands", {}).items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_help_text_shows_its_brackets() -> None:
    """Help is rich markup in typer: a bracketed word in a help text must still be shown."""
    import re

    import typer

    root = typer.main.get_command(app)
    seen = 0
    for path, command in _commands(root):
        r = invoke([*path, "--help"])
        assert r.exit_code == 0, (path, r.output)
        text = " ".join(r.output.split())
        for param in command.params:
            for word in re.findall(r"\\?\[([^\]]+)\]", getattr(param, "help", "") or ""):
                seen += 1
                assert f"[{word}]" in text, (path, param.name, word, r.output)
        assert "\\[" not in r.output, (path, r.output)
    assert seen >= 4  # [deploy], [run], [link] ...
