"""A real PostgreSQL source: a throwaway server, a CRM table with Chinese text and PII, read in
chunks through a server-side cursor, prepared into the same store as the same data from CSV, and
no password or row value in any log line or error (wrong password and missing table included).

The server is PostgreSQL's own ``initdb`` + ``pg_ctl`` (found under
``/usr/lib/postgresql/*/bin``) in a temporary folder, listening on 127.0.0.1 on a free port, and
stopped and deleted afterwards. Without those binaries the tests skip and say what to install.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.data.contract import SourceKind, SourceSpec, load_firm_config
from fedcrm.data.ingest import iter_chunks
from fedcrm.data.store import load_store
from fedcrm.privacy.keys import load_keys

psycopg = pytest.importorskip("psycopg", reason="psycopg (the 'postgres' extra) is not installed")

RUNNER = CliRunner()
ROWS = 3_500
CHUNK = 1_000
SURNAMES = ["王", "李", "张", "刘", "陈", "杨", "黄", "赵"]
GIVEN = ["秀英", "伟", "芳", "娜", "敏", "静", "磊", "洋"]


def _server_binaries() -> Path | None:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Server:
    port: int
    user: str
    password: str

    def url(self, *, password: str | None = None, database: str = "crm") -> str:
        return (f"postgresql+psycopg://{self.user}:{password or self.password}@127.0.0.1:"
                f"{self.port}/{database}")

    def connect(self, database: str = "crm") -> Any:
        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.user,
                               password=self.password, dbname=database, autocommit=True)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under "
                    "/usr/lib/postgresql/*/bin; install them (Debian: apt-get install "
                    "postgresql-15) to run the PostgreSQL source tests")
    # PostgreSQL refuses to run as root: then the server runs as the 'postgres' system user,
    # in a folder it owns (pytest's tmp folders are private to root).
    run_as: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="fedcrm-pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, account.pw_uid, account.pw_gid)
        run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    password = secrets.token_urlsafe(18)
    (root / "pw").write_text(password + "\n")
    if run_as:
        os.chown(root / "pw", run_as["user"], run_as["group"])
    port = _free_port()
    data = root / "data"

    def pg(*args: str) -> None:
        subprocess.run([str(binaries / args[0]), *args[1:]], check=True, capture_output=True,
                       timeout=120, cwd=root, **run_as)

    try:
        pg("initdb", "-D", str(data), "-U", "fedcrm", "--auth=scram-sha-256",
           f"--pwfile={root / 'pw'}", "-E", "UTF8", "--no-locale")
        pg("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
           f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')[-500:]}")
    srv = Server(port=port, user="fedcrm", password=password)
    try:
        with srv.connect("postgres") as conn:
            conn.execute("CREATE DATABASE crm ENCODING 'UTF8' TEMPLATE template0")
        yield srv
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _crm_table(n: int) -> pd.DataFrame:
    """A CRM customers table with Chinese names and notes, PII columns and typed columns."""
    rng = np.random.default_rng(3)
    tenure = rng.integers(1, 72, n)
    monthly = rng.uniform(10, 110, n).round(2)
    churn_p = 1 / (1 + np.exp(-(0.03 * monthly - 0.05 * tenure)))
    return pd.DataFrame({
        "cust_id": [f"PG{i:06d}" for i in range(n)],
        "full_name": [f"{rng.choice(SURNAMES)}{rng.choice(GIVEN)}" for _ in range(n)],
        "email": [f"kehu{i}@mail.example.cn" for i in range(n)],
        "phone": [f"138-{i % 10000:04d}-{rng.integers(0, 10000):04d}" for i in range(n)],
        "signup": [date(2020, 1, 1) + timedelta(days=int(d)) for d in rng.integers(0, 1500, n)],
        "plan": rng.choice(["basic", "plus", "premium"], n),
        "tenure": tenure,
        "monthly": [Decimal(f"{v:.2f}") for v in monthly],
        "churned": np.where(rng.random(n) < churn_p, "Yes", "No"),
        "notes": ["客户备注：请勿外传"] * n,
    })


@pytest.fixture(scope="module")
def crm_table(server: Server) -> pd.DataFrame:
    frame = _crm_table(ROWS)
    with server.connect() as conn:
        conn.execute(
            "CREATE TABLE customers (cust_id text PRIMARY KEY, full_name text, email text, "
            "phone text, signup date, plan text, tenure integer, monthly numeric(8, 2), "
            "churned text, notes text)")
        with conn.cursor() as cur, cur.copy(
                "COPY customers (cust_id, full_name, email, phone, signup, plan, tenure, "
                "monthly, churned, notes) FROM STDIN") as copy:
            for row in frame.itertuples(index=False):
                copy.write_row(row)
    return frame


def _secrets_and_values(server: Server, frame: pd.DataFrame) -> list[str]:
    sample = frame.sample(40, random_state=0)
    values = [server.password]
    for column in ("cust_id", "full_name", "email", "phone"):
        values += [str(v) for v in sample[column]]
    return values


def _assert_nothing_leaks(text: str, needles: list[str]) -> None:
    for needle in needles:
        assert needle not in text, "a password or row value appeared in output or logs"


def _sql_firm(write_firm: Callable[..., Path], frame: pd.DataFrame, **source: Any) -> Path:
    return write_firm(frame, firm="pgfirm", source={"kind": "sql", "table": "customers",
                                                    "chunk_rows": CHUNK, **source})


def test_prepare_from_postgres_matches_the_same_data_from_csv(
    server: Server, crm_table: pd.DataFrame, write_firm: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every library's log line, SQLAlchemy's and psycopg's too
    monkeypatch.setenv("FEDCRM_TEST_PG_URL", server.url())
    sql_cfg = _sql_firm(write_firm, crm_table, url_env="FEDCRM_TEST_PG_URL")
    r = RUNNER.invoke(app, ["prepare", "--config", str(sql_cfg)])
    assert r.exit_code == 0, r.output
    # the same rows as the firm's CSV export, same keys: the same store
    csv_cfg = write_firm(crm_table, firm="pgfirm", source={"kind": "csv", "path": "export.csv"})
    crm_table.to_csv(csv_cfg.parent / "export.csv", index=False)
    sql_store_cfg = load_firm_config(sql_cfg)
    keys = load_keys(sql_store_cfg.firm.keys_dir)
    from_sql = load_store(sql_store_cfg.prepared_dir, keys=keys, use_cache=False)
    assert from_sql.manifest["tables"]["customers"]["rows_kept"] == ROWS
    assert from_sql.manifest["tables"]["customers"]["chunks"] >= ROWS // CHUNK
    shutil.move(sql_store_cfg.prepared_dir, sql_store_cfg.prepared_dir.with_name("from_sql"))
    r = RUNNER.invoke(app, ["prepare", "--config", str(csv_cfg)])
    assert r.exit_code == 0, r.output
    from_csv = load_store(load_firm_config(csv_cfg).prepared_dir, keys=keys, use_cache=False)
    pd.testing.assert_frame_equal(from_sql.customers, from_csv.customers, check_dtype=False)
    pd.testing.assert_frame_equal(from_sql.features, from_csv.features, check_dtype=False)
    assert "王" not in from_sql.customers.to_csv()  # names were masked, not stored
    _assert_nothing_leaks(r.output + caplog.text, _secrets_and_values(server, crm_table))


def test_the_table_is_read_through_a_server_side_cursor_in_chunks(
    server: Server, crm_table: pd.DataFrame
) -> None:
    spec = SourceSpec(kind=SourceKind.SQL, url=server.url(), table="customers", chunk_rows=CHUNK)
    chunks = iter_chunks(spec, expected_columns=10)
    first_row, first = next(chunks)
    assert (first_row, len(first)) == (1, CHUNK)
    # While the reader holds its first chunk, the server shows it paging through a cursor:
    # the rest of the table has not been sent.
    with server.connect() as watcher:
        queries = [q for (q,) in watcher.execute(
            "SELECT query FROM pg_stat_activity WHERE datname = 'crm' AND pid <> "
            "pg_backend_pid()").fetchall()]
    assert any(q.lstrip().upper().startswith("FETCH FORWARD") for q in queries), queries
    sizes = [len(first)] + [len(frame) for _, frame in chunks]
    assert sizes == [CHUNK] * (ROWS // CHUNK) + [ROWS % CHUNK]


@pytest.mark.parametrize("problem", ["wrong password", "missing table"])
def test_connection_and_query_errors_name_neither_the_password_nor_any_row(
    server: Server, crm_table: pd.DataFrame, write_firm: Callable[..., Path],
    caplog: pytest.LogCaptureFixture, problem: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "Wr0ng-" + secrets.token_urlsafe(8)
    if problem == "wrong password":
        cfg = _sql_firm(write_firm, crm_table, url=server.url(password=wrong))
    else:
        cfg = write_firm(crm_table, firm="pgfirm", source={
            "kind": "sql", "table": "no_such_table", "url": server.url(), "chunk_rows": CHUNK})
    r = RUNNER.invoke(app, ["prepare", "--config", str(cfg)])
    assert r.exit_code != 0
    assert "cannot read from database postgresql+psycopg://fedcrm:***@127.0.0.1" in r.output
    assert "Traceback" not in r.output and "internal error" not in r.output
    _assert_nothing_leaks(r.output + caplog.text,
                          [wrong, *_secrets_and_values(server, crm_table)])
