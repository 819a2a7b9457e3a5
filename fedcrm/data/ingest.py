"""Reading a firm's source tables in chunks: CSV (UTF-8, GB18030/GBK), Parquet, SQL.

Every reader yields ``(first_row_number, DataFrame)`` chunks of at most ``chunk_rows`` rows, so a
10-million-row source never needs 10 million rows in memory. CSV cells are read as text (nothing
is coerced here; validation parses and quarantines). Failures become one-line
:class:`~privacy.errors.SchemaError` / :class:`~privacy.errors.ConfigError` messages that name the
file and the fix and never quote a data value.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from fedcrm.data.contract import SourceKind, SourceSpec
from fedcrm.privacy.errors import ConfigError, SchemaError

Chunk = tuple[int, pd.DataFrame]


def _sniff_delimiter(path: Path, encoding: str) -> str | None:
    try:
        with path.open("r", encoding=encoding, errors="replace", newline="") as fh:
            head = fh.readline()
        return csv.Sniffer().sniff(head, delimiters=",;\t|").delimiter
    except (csv.Error, OSError):
        return None


def _decode_hint(spec: SourceSpec) -> str:
    if spec.encoding.lower().replace("-", "") in ("utf8", "utf8sig"):
        return 'if it is a Chinese (GBK) export, set encoding = "gb18030" in its source section'
    return "check the file's encoding and set 'encoding' in its source section (e.g. \"utf-8\")"


def _source_file(spec: SourceSpec) -> Path:
    """The source's file, checked to exist and to be non-empty."""
    assert spec.path is not None
    path = spec.path
    if not path.exists():
        raise SchemaError(f"source file {path} not found")
    if path.is_dir():
        raise SchemaError(
            f"source {path} is a folder; set 'path' in its source section to the export file"
        )
    if path.stat().st_size == 0:
        raise SchemaError(f"source file {path} is empty")
    return path


def _check_header(path: Path, spec: SourceSpec, columns: list[str]) -> None:
    """Refuse header names that pandas would silently rename: blank or repeated ones."""
    for position, name in enumerate(columns, start=1):
        if not name.strip() or name.startswith("Unnamed: "):
            raise SchemaError(
                f"{path}: header column {position} has no name; name every column in the "
                "export's first line"
            )
    try:  # pandas renames a repeated name to "name.1": count the names as written
        with path.open("r", encoding=spec.encoding, errors="replace", newline="") as fh:
            header = next(csv.reader(fh, delimiter=spec.delimiter), [])
    except (OSError, csv.Error):
        return
    repeated = [n for n, k in Counter(h.lstrip("\ufeff") for h in header).items() if k > 1]
    if repeated:
        raise SchemaError(
            f"{path}: the header names column {repeated[0]!r} more than once; give each column "
            "its own name in the export's first line"
        )


def _parser_problem(path: Path, exc: Exception, spec: SourceSpec) -> str:
    """One line for a CSV the parser rejected: the line it stopped at and what to check."""
    text = str(exc)
    quote = re.search(r"EOF inside string starting at row (\d+)", text)
    if quote:  # pandas counts rows from 0 with the header as row 0: file line = row + 1
        return (
            f"{path}: line {int(quote[1]) + 1}: a quoted value is never closed (a \" without its "
            "closing \"); fix the quoting in the export"
        )
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
    if fields:
        return (
            f"{path}: line {fields[2]} has {fields[3]} values but the header has {fields[1]}; "
            f"check 'delimiter' (now {spec.delimiter!r}) and the quoting of values that contain it"
        )
    return (
        f"{path}: not a readable CSV file ({text.split(':')[0].strip()[:80]}); check that it is "
        f"a CSV export, its 'delimiter' (now {spec.delimiter!r}) and its quoting"
    )


def _csv_chunks(spec: SourceSpec, expected: int) -> Iterator[Chunk]:
    path = _source_file(spec)
    try:
        reader = pd.read_csv(
            path,
            sep=spec.delimiter,
            encoding=spec.encoding,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            chunksize=spec.chunk_rows,
            skipinitialspace=False,
        )
        start = 1
        first = True
        for chunk in reader:
            if first:
                first = False
                _check_header(path, spec, [str(c) for c in chunk.columns])
                if not isinstance(chunk.index, pd.RangeIndex):
                    # pandas reads a first row with more values than the header as an index
                    raise SchemaError(
                        f"{path}: line 2 has more values than the header's "
                        f"{len(chunk.columns)}; check 'delimiter' (now {spec.delimiter!r}) and "
                        "the quoting of values that contain it"
                    )
                if len(chunk.columns) == 1 and expected > 1:
                    found = _sniff_delimiter(path, spec.encoding)
                    hint = (
                        f"it looks {found!r}-delimited: set delimiter = {found!r}"
                        if found and found != spec.delimiter
                        else f"check 'delimiter' (now {spec.delimiter!r})"
                    )
                    raise SchemaError(
                        f"{path}: the header has a single column but the config maps {expected}; "
                        f"{hint}"
                    )
            if len(chunk):
                yield start, chunk
            start += len(chunk)
        if start == 1:
            raise SchemaError(
                f"source file {path} has a header but no data rows; export the data again"
            )
    except UnicodeDecodeError as exc:
        raise SchemaError(
            f"{path} is not valid {spec.encoding} (undecodable byte at offset {exc.start}); "
            f"{_decode_hint(spec)}"
        ) from None
    except pd.errors.EmptyDataError:
        raise SchemaError(f"source file {path} is empty (no header row)") from None
    except pd.errors.ParserError as exc:
        raise SchemaError(_parser_problem(path, exc, spec)) from None


def _parquet_chunks(spec: SourceSpec) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _source_file(spec)
    try:
        pf = pq.ParquetFile(path)
        start = 1
        for batch in pf.iter_batches(batch_size=spec.chunk_rows):
            frame = batch.to_pandas()
            yield start, frame
            start += len(frame)
        if start == 1:
            raise SchemaError(f"source file {path} has no rows")
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{path} is not a readable Parquet file ({type(exc).__name__})") from None


def redact_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def _sql_chunks(spec: SourceSpec) -> Iterator[Chunk]:
    import sqlalchemy as sa
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    url = spec.database_url()
    shown = redact_url(url)
    try:
        engine = sa.create_engine(url)
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ConfigError(
            f"cannot use database URL {shown}: {type(exc).__name__} (expected e.g. "
            "sqlite:///path/crm.db or postgresql+psycopg://user@host/db)"
        ) from None
    except ImportError as exc:
        raise ConfigError(
            f"database driver for {shown} is not installed ({exc.name}); for PostgreSQL "
            "install fedcrm[postgres]"
        ) from None
    if spec.query is not None:
        query = spec.query
    else:
        assert spec.table is not None
        query = f"SELECT * FROM {engine.dialect.identifier_preparer.quote(spec.table)}"
    try:
        with engine.connect().execution_options(stream_results=True) as conn:
            start = 1
            for frame in pd.read_sql_query(sa.text(query), conn, chunksize=spec.chunk_rows):
                yield start, frame
                start += len(frame)
            if start == 1:
                raise SchemaError(f"query on {shown} returned no rows")
    except (SQLAlchemyError, pd.errors.DatabaseError) as exc:  # pandas wraps some driver errors
        raise ConfigError(
            f"cannot read from database {shown}: {type(exc).__name__}; check the URL, that the "
            "database is reachable and that the table/query exists"
        ) from None
    finally:
        engine.dispose()


def iter_chunks(spec: SourceSpec, *, expected_columns: int) -> Iterator[Chunk]:
    """Yield ``(first_row_number, frame)`` chunks from any supported source (rows from 1)."""
    if spec.kind is SourceKind.CSV:
        yield from _csv_chunks(spec, expected_columns)
    elif spec.kind is SourceKind.PARQUET:
        yield from _parquet_chunks(spec)
    else:
        yield from _sql_chunks(spec)


def read_sample(spec: SourceSpec, *, rows: int = 5000) -> pd.DataFrame:
    """The first ``rows`` rows of a source (for ``fedcrm scan``)."""
    small = spec.model_copy(update={"chunk_rows": max(1000, rows)})
    for _, frame in iter_chunks(small, expected_columns=0):
        return frame.head(rows)
    raise SchemaError(f"{spec.describe()} has no rows")


def source_for_file(
    path: Path, *, encoding: str = "utf-8", delimiter: str | None = None
) -> SourceSpec:
    """A SourceSpec for a bare file path (CSV or Parquet by extension)."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return SourceSpec(kind=SourceKind.PARQUET, path=path)
    if suffix not in (".csv", ".txt", ".tsv"):
        raise SchemaError(f"{path}: unsupported file type {suffix!r}; use .csv or .parquet")
    try:
        "x".encode(encoding)
    except LookupError:
        raise ConfigError(f"--encoding {encoding!r} is not a known encoding (try utf-8 or "
                          "gb18030)") from None
    if delimiter is None:
        delimiter = "\t" if suffix == ".tsv" else (_sniff_delimiter(path, encoding) or ",")
    if len(delimiter) != 1:
        raise ConfigError(f"--delimiter must be one character, not {delimiter!r}")
    return SourceSpec(kind=SourceKind.CSV, path=path, encoding=encoding, delimiter=delimiter)
