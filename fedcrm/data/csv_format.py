"""A CSV export's encoding and delimiter, detected, with how sure the detection is.

The encoding: a byte-order mark; else plain ASCII or valid UTF-8; else ``charset-normalizer`` on
the lines that hold non-ASCII bytes (the only ones on which encodings disagree). A guess is
*sure* only when no other encoding reads those bytes about as well and enough characters were
seen; a 3-line GBK file also decodes as Korean, so it is read as GB18030 and called unsure. The
delimiter: the candidate that splits every sampled line into the same number (> 1) of fields.
Evidence strings name encodings, counts and fields, never a data value.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from fedcrm.privacy.errors import SchemaError

SAMPLE_BYTES = 1 << 20
"""Bytes of a file that detection reads (plus, when they are all ASCII, the first MiB that is
not: an ASCII prefix reads the same in every candidate encoding and tells nothing)."""
SURE_CHARACTERS = 20
"""Non-ASCII characters a legacy (non-UTF) encoding needs to be read with before the guess is
called sure: a few characters decode in several CJK encodings alike."""
SURE_UTF8_CHARACTERS = 8
"""The same for UTF-8, whose multi-byte structure rarely fits text in another encoding."""
PLAUSIBLE_CHAOS = 0.05
"""An encoding whose reading is at most this much messier (charset-normalizer's mess ratio)
than the best one is also plausible, and the guess is then not sure."""
CHINESE_ENCODINGS = ("gb18030", "big5")
"""Among equally plausible readings the Chinese one is preferred: fedcrm's non-UTF-8 exports are
Chinese CRM exports, and a tiny GBK file also decodes as Korean (cp949) or Thai (cp874)."""
DELIMITERS = (",", "\t", ";", "|")
"""Candidate delimiters; when several fit, the one giving more columns, then this order."""
_SAMPLE_RECORDS = 50
_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)
_NON_ASCII = re.compile(rb"[\x80-\xff]")


class Provenance(StrEnum):
    """Where a CSV setting of a scanned file came from."""

    GIVEN = "given"  # on the command line
    DETECTED = "detected"


@dataclass(frozen=True)
class FormatChoice:
    """One CSV setting of a scanned file - its encoding or its delimiter - and why.

    ``evidence`` names encodings, counts and columns, never a data value.
    """

    value: str
    provenance: Provenance
    sure: bool
    evidence: str

    @property
    def shown(self) -> str:
        """The value as a reader wants it: an encoding's name, a quoted delimiter, "tab"."""
        return _shown(self.value) if len(self.value) == 1 else self.value

    def to_json(self) -> dict[str, object]:
        return {"value": self.value, "provenance": self.provenance.value, "sure": self.sure,
                "evidence": self.evidence}

    def describe(self) -> str:
        """E.g. ``gb18030 (detected: ...)`` or ``gb18030 (detected, UNSURE: ...)``."""
        if self.provenance is Provenance.GIVEN:
            return f"{self.shown} (given)"
        return f"{self.shown} (detected{'' if self.sure else ', UNSURE'}: {self.evidence})"


def _whole_lines(data: bytes) -> bytes:
    """``data`` up to its last line break (a cut multi-byte character would read as an error)."""
    end = data.rfind(b"\n")
    return data[: end + 1] if end >= 0 else data


def _detection_sample(path: Path) -> bytes:
    """The first MiB of ``path``; if it is plain ASCII, also the first MiB from the first line
    that is not. All ASCII only when the whole file is."""
    with path.open("rb") as fh:
        head = fh.read(SAMPLE_BYTES)
        if len(head) < SAMPLE_BYTES:
            return head
        head = _whole_lines(head)
        if not head.isascii():
            return head
        fh.seek(len(head))
        while block := fh.read(SAMPLE_BYTES):
            found = _NON_ASCII.search(block)
            if found is not None:
                # The blocks before were ASCII, so the block starts on a character boundary.
                start = block.rfind(b"\n", 0, found.start()) + 1
                return head + _whole_lines(block[start:] + fh.read(SAMPLE_BYTES))
        return head


def _non_ascii_lines(data: bytes) -> bytes:
    """The lines that hold a non-ASCII byte: the only ones on which encodings disagree."""
    return b"\n".join(line for line in data.split(b"\n") if not line.isascii())


def _codec_name(name: str) -> str:
    """Python's name for an encoding; the GB family (GB2312, GBK, HZ) as its superset GB18030."""
    codec = codecs.lookup(name).name
    return "gb18030" if codec in ("gb2312", "gbk", "hz", "gb18030") else codec


def _count_non_ascii(text: str) -> int:
    return sum(1 for ch in text if ord(ch) > 127)


def detect_encoding(path: Path) -> FormatChoice:
    """The encoding of a text file, and whether the detection is sure (see module docstring)."""
    from charset_normalizer import from_bytes

    data = _detection_sample(path)
    for bom, codec, what in _BOMS:
        if data.startswith(bom):
            return FormatChoice(codec, Provenance.DETECTED, True, f"{what} byte-order mark")
    evidence = _non_ascii_lines(data)
    if not evidence:
        return FormatChoice("utf-8", Provenance.DETECTED, True, "plain ASCII")
    try:
        n = _count_non_ascii(evidence.decode("utf-8"))
        sure = n >= SURE_UTF8_CHARACTERS
        return FormatChoice("utf-8", Provenance.DETECTED, sure, f"valid UTF-8, {n:,} non-ASCII "
                            f"characters{'' if sure else ', too few to be sure'}")
    except UnicodeDecodeError:
        pass
    readings: dict[str, tuple[float, int]] = {}  # codec -> (mess ratio, characters), best first
    for match in from_bytes(evidence):
        codec = _codec_name(match.encoding)
        if codec in readings:
            continue
        try:  # charset-normalizer may have tried only some chunks of a large sample
            readings[codec] = (match.chaos, _count_non_ascii(evidence.decode(codec)))
        except UnicodeDecodeError:
            continue
    if not readings:
        raise SchemaError(
            f"{path}: no known encoding reads its non-ASCII bytes (a damaged export, or one "
            "that mixes encodings?); pass its encoding with --encoding (e.g. --encoding gb18030)"
        )
    best = next(iter(readings))
    plausible = [c for c, (chaos, _) in readings.items()
                 if chaos <= readings[best][0] + PLAUSIBLE_CHAOS]
    chosen = best if best in CHINESE_ENCODINGS else next(
        (c for c in plausible if c in CHINESE_ENCODINGS), best
    )
    n = readings[chosen][1]
    others = [c for c in plausible if c != chosen]
    sure = not others and n >= SURE_CHARACTERS
    why = [f"{n:,} non-ASCII characters read"]
    if others:
        why.append(f"also readable as {', '.join(others[:4])}")
    if chosen != best:
        why.append("the Chinese reading preferred")
    if n < SURE_CHARACTERS:
        why.append("too few to be sure")
    return FormatChoice(chosen, Provenance.DETECTED, sure, "; ".join(why))


def _field_counts(text: str, delimiter: str) -> list[int]:
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        return [len(row) for _, row in zip(range(_SAMPLE_RECORDS), reader, strict=False) if row]
    except csv.Error:
        return []


def detect_delimiter(path: Path, encoding: str) -> FormatChoice:
    """The delimiter that splits every sampled line (up to 50) into the same number (> 1) of
    fields; unsure when several do, or none."""
    with path.open("r", encoding=encoding, errors="replace", newline="") as fh:
        text = fh.read(64 * 1024)
        cut = bool(fh.read(1))
    if cut:  # the last line may be partial: leave it out
        text = text[: text.rfind("\n") + 1] or text
    counts = {d: _field_counts(text, d) for d in DELIMITERS}
    lines = max((len(c) for c in counts.values()), default=0)
    fits = [d for d, c in counts.items() if c and c[0] > 1 and len(set(c)) == 1]
    if len(fits) == 1:
        d = fits[0]
        sure = lines >= 3
        return FormatChoice(d, Provenance.DETECTED, sure,
                            f"{counts[d][0]} fields on each of {lines} sampled lines"
                            + ("" if sure else "; too few lines to be sure"))
    if fits:
        widest = max(fits, key=lambda d: counts[d][0])
        return FormatChoice(widest, Provenance.DETECTED, False,
                            f"{' and '.join(_shown(d) for d in fits)} each split every sampled "
                            "line evenly; chose the one giving more columns")
    header = {d: c[0] for d, c in counts.items() if c and c[0] > 1}
    if not header:
        return FormatChoice(",", Provenance.DETECTED, False,
                            "the header has a single column under every candidate delimiter")
    d = max(header, key=lambda k: header[k])
    return FormatChoice(d, Provenance.DETECTED, False,
                        f"splits the header into {header[d]} columns, but sampled lines differ "
                        "in their number of fields")


def _shown(delimiter: str) -> str:
    return "tab" if delimiter == "\t" else repr(delimiter)


