"""Reading a firm's source tables in chunks: CSV (UTF-8, GB18030/GBK, Big5), Parquet, SQL.

Every reader yields ``(first_row_number, DataFrame)`` chunks of at most ``chunk_rows`` rows, so a
10-million-row source never needs 10 million rows in memory. CSV cells are read as text (nothing
is coerced here; validation parses and quarantines). Failures become one-line
:class:`~privacy.errors.SchemaError` / :class:`~privacy.errors.ConfigError` messages that name the
file and the fix and never quote a data value.

For a bare file (``fedcrm scan``) the CSV encoding and delimiter are detected
(`fedcrm.data.csv_format`) unless given, and :func:`source_for_file` says how each was chosen.
"""

from __future__ import annotations

import codecs
import csv
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedcrm.data.contract import SourceKind, SourceSpec
from fedcrm.data.csv_format import FormatChoice, Provenance, detect_delimiter, detect_encoding
from fedcrm.privacy.errors import ConfigError, SchemaError

Chunk = tuple[int, pd.DataFrame]

def _first_undecodable(path: Path, encoding: str) -> str:
    """Where ``path`` first fails to decode, as a line number and byte offset (pandas reports an
    offset inside its read buffer, not in the file)."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    offset, line = 0, 1
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                # exc.start counts from the bytes the decoder still held from the last block
                bad = max(0, offset + exc.start - (len(exc.object) - len(block)))
                fh.seek(0)
                line = 1 + fh.read(bad).count(b"\n")
                return f"undecodable bytes on line {line:,}, byte offset {bad:,}"
            offset += len(block)
    return "undecodable bytes"


def _decode_hint(spec: SourceSpec, *, flags: bool) -> str:
    """The fix for an undecodable file: the detected encoding, as a flag or a config line."""
    assert spec.path is not None
    try:
        found: FormatChoice | None = detect_encoding(spec.path)
    except (SchemaError, OSError):
        found = None
    if found is not None and found.value != spec.encoding:
        fix = (
            f"pass --encoding {found.value}" if flags
            else f'set encoding = "{found.value}" in its source section'
        )
        return f"{fix} (detected{'' if found.sure else ', unsure'}: {found.evidence})"
    how = "with --encoding" if flags else "in its source section"
    if found is not None:  # read as detected up to there: the rest is in another encoding
        return (f"its first part reads as {found.value}, so the export mixes encodings or is "
                f"damaged: re-export it in one encoding, or give the right one {how}")
    return f"give its encoding {how} (e.g. gb18030, big5, utf-8)"


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


def _csv_chunks(spec: SourceSpec, expected: int, *, flags: bool) -> Iterator[Chunk]:
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
                    found = detect_delimiter(path, spec.encoding).value
                    hint = (
                        f"it looks {found!r}-delimited: set delimiter = {found!r}"
                        if found != spec.delimiter
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
    except UnicodeDecodeError:
        raise SchemaError(
            f"{path} is not valid {spec.encoding} ({_first_undecodable(path, spec.encoding)}); "
            f"{_decode_hint(spec, flags=flags)}"
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


def iter_chunks(
    spec: SourceSpec, *, expected_columns: int, flags: bool = False
) -> Iterator[Chunk]:
    """Yield ``(first_row_number, frame)`` chunks from any supported source (rows from 1).

    ``flags``: name a fix as the command-line flag (``--encoding``) rather than the config's
    source section, for a source that came from the command line (``fedcrm scan``).
    """
    if spec.kind is SourceKind.CSV:
        yield from _csv_chunks(spec, expected_columns, flags=flags)
    elif spec.kind is SourceKind.PARQUET:
        yield from _parquet_chunks(spec)
    else:
        yield from _sql_chunks(spec)


@dataclass(frozen=True)
class FileSource:
    """A bare file as a source, with how its CSV settings were chosen (``None`` for Parquet)."""

    spec: SourceSpec
    encoding: FormatChoice | None = None
    delimiter: FormatChoice | None = None

    @property
    def sure(self) -> bool:
        return all(c is None or c.sure for c in (self.encoding, self.delimiter))

    def to_json(self) -> dict[str, object]:
        return {
            "path": str(self.spec.path),
            "kind": self.spec.kind.value,
            "encoding": None if self.encoding is None else self.encoding.to_json(),
            "delimiter": None if self.delimiter is None else self.delimiter.to_json(),
        }

    def describe(self) -> str:
        if self.encoding is None or self.delimiter is None:
            return self.spec.kind.value
        return f"encoding {self.encoding.describe()}; delimiter {self.delimiter.describe()}"


def read_sample(source: FileSource, *, rows: int = 5000) -> pd.DataFrame:
    """The first ``rows`` rows of a file given on the command line (for ``fedcrm scan``)."""
    small = source.spec.model_copy(update={"chunk_rows": max(1000, rows)})
    for _, frame in iter_chunks(small, expected_columns=0, flags=True):
        return frame.head(rows)
    raise SchemaError(f"{small.describe()} has no rows")


def source_for_file(
    path: Path, *, encoding: str | None = None, delimiter: str | None = None
) -> FileSource:
    """A bare CSV or Parquet file (by extension) as a source; a CSV's encoding and delimiter
    are detected unless given, and the result says how each was chosen."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return FileSource(SourceSpec(kind=SourceKind.PARQUET, path=path))
    if suffix not in (".csv", ".txt", ".tsv"):
        raise SchemaError(f"{path}: unsupported file type {suffix!r}; use .csv or .parquet")
    if not path.is_file():
        raise SchemaError(f"source file {path} not found")
    if path.stat().st_size == 0:
        raise SchemaError(f"source file {path} is empty")
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ConfigError(
                f"--encoding {encoding!r} is not an encoding Python knows (try utf-8, gb18030 "
                "or big5)"
            ) from None
        enc = FormatChoice(encoding, Provenance.GIVEN, True, "--encoding")
    else:
        enc = detect_encoding(path)
    if delimiter is not None:
        if len(delimiter) != 1:
            raise ConfigError(f"--delimiter must be one character, not {delimiter!r}")
        sep = FormatChoice(delimiter, Provenance.GIVEN, True, "--delimiter")
    elif suffix == ".tsv":
        sep = FormatChoice("\t", Provenance.DETECTED, True, "the .tsv extension")
    else:
        sep = detect_delimiter(path, enc.value)
    spec = SourceSpec(kind=SourceKind.CSV, path=path, encoding=enc.value, delimiter=sep.value)
    return FileSource(spec, enc, sep)
