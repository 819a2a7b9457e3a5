"""Masking of PII columns: keyed pseudonyms, partial masks and generalization.

Everything here is a pure function over a `pandas.Series`; key bytes are injected by the caller
(``privacy.keys.FirmKeys.pseudonym_key``, which owns the key derivation and checks the key when
it is loaded), nothing reads files or the environment. Missing values stay missing
under every policy: a shared token for "unknown" would link unrelated customers.

Pseudonym tokens
----------------
``pseudonymize`` writes ``"<key_id>:<24 hex>"``, for example
``"pseudonym-v2-1f0c9e4b7a:5d41402abc4b2a76b9719d91"``:

- the hex part is the first 96 bits of HMAC-SHA256(key, UTF-8 text of the value). 96 bits keep
  the chance of any collision below 1e-9 for up to 10^10 distinct values per key;
- ``key_id`` is the public id of the master key version (``privacy.keys.FirmKeys.pseudonym_key_id``,
  e.g. ``"pseudonym-v2-1f0c9e4b7a"``), so a store says which key produced it and a rotation can
  find stale tokens (`plan_rotation`). It must be 1-48 characters of ``[A-Za-z0-9_.-]``.

Tokens are stable for one key and unrelated across keys. They are not invertible, so rotating to a
new key version means pseudonymizing again from the raw source (`plan_rotation` explains which).
Values are hashed exactly as given (after `str()` for non-strings, with whole floats written as
integers so ``12345.0`` and ``12345`` agree); normalize formats (``+86 138...`` vs ``138...``)
before pseudonymizing if they must match.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import multiprocessing
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.keys import PSEUDONYM_INFO_PREFIX, derive_pseudonym_key
from fedcrm.privacy.pii_vocabulary import CN_COUNTRY_PREFIX, CN_DATE_RE, COMPOUND_SURNAMES, HAN
from fedcrm.privacy.policies import MaskingPolicy, PiiKind

# derive_pseudonym_key and PSEUDONYM_INFO_PREFIX live in privacy.keys (the owner of every key
# derivation); they stay importable from here for existing callers.
__all__ = [
    "PSEUDONYM_HEX_CHARS",
    "PSEUDONYM_INFO_PREFIX",
    "RotationPlan",
    "apply_policy",
    "derive_pseudonym_key",
    "generalize",
    "partial_mask",
    "plan_rotation",
    "pseudonymize",
    "token_key_id",
]

PSEUDONYM_HEX_CHARS = 24
"""Hex characters of HMAC output kept in a token (96 bits)."""

_KEY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,48}")

# Below this many values a process pool costs more than it saves (fork + pipe ~10 ms).
_PARALLEL_MIN_VALUES = 200_000

_STRING_DTYPE = pd.StringDtype("pyarrow", na_value=np.nan)


# --------------------------------------------------------------------------------------------
# Pseudonymization
# --------------------------------------------------------------------------------------------


class _Sha256(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...
    def copy(self) -> _Sha256: ...


def _sha256_factory() -> Callable[[bytes], _Sha256]:
    """CPython's built-in SHA-256 if present: its ``copy()`` is a struct copy, ~1.4x faster than
    OpenSSL's EVP context copy for the short inputs we hash. Same digests either way."""
    for name in ("_sha256", "_sha2"):  # CPython 3.11 / 3.12+
        try:
            module = __import__(name)
        except ImportError:
            continue
        factory = getattr(module, "sha256", None)
        if factory is not None:
            return factory  # type: ignore[no-any-return]
    return hashlib.sha256


_SHA256 = _sha256_factory()


def _hmac_states(key: bytes) -> tuple[_Sha256, _Sha256]:
    """Inner and outer SHA-256 states after absorbing the padded key (RFC 2104)."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    padded = key.ljust(64, b"\0")
    inner = _SHA256(bytes(b ^ 0x36 for b in padded))
    outer = _SHA256(bytes(b ^ 0x5C for b in padded))
    return inner, outer


def _token_bytes(key: bytes, prefix: bytes, texts: pa.Array) -> bytes:
    """Fixed-width tokens ``prefix + 24 hex`` for every value of a non-null binary array.

    The hot loop of `pseudonymize`: copies precomputed inner/outer HMAC states instead of
    re-keying for each value and binds every method to a local name; hex encoding and the key-id
    prefix are done for the whole chunk at once in numpy.
    """
    inner, outer = _hmac_states(key)
    inner_copy, outer_copy = inner.copy, outer.copy
    digests: list[bytes] = []
    append = digests.append
    for data in texts.to_pylist():
        h = inner_copy()
        h.update(data)
        o = outer_copy()
        o.update(h.digest())
        append(o.digest())
    n = len(digests)
    # 64 hex chars per full digest; keep the first PSEUDONYM_HEX_CHARS of each.
    hex_all = np.frombuffer(b"".join(digests).hex().encode("ascii"), dtype=np.uint8)
    tokens = np.empty((n, len(prefix) + PSEUDONYM_HEX_CHARS), dtype=np.uint8)
    tokens[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    tokens[:, len(prefix):] = hex_all.reshape(n, 64)[:, :PSEUDONYM_HEX_CHARS]
    return tokens.tobytes()


def _tokens_in_child(conn: Any, key: bytes, prefix: bytes, texts: pa.Array) -> None:
    try:
        conn.send_bytes(_token_bytes(key, prefix, texts))
    except BaseException as exc:  # report and exit; the parent raises
        conn.send_bytes(b"!" + type(exc).__name__.encode())
    finally:
        conn.close()


def _parallel_token_bytes(key: bytes, prefix: bytes, texts: pa.Array, workers: int) -> bytes:
    """`_token_bytes` over ``texts`` split across ``workers`` processes.

    Uses ``fork`` so the children inherit the Arrow array without pickling; the parent hashes
    the first chunk itself while ``workers - 1`` children hash the rest and send their tokens
    back through a pipe.
    """
    ctx = multiprocessing.get_context("fork")
    n = len(texts)
    width = len(prefix) + PSEUDONYM_HEX_CHARS
    bounds = [n * i // workers for i in range(workers + 1)]
    children = []
    for i in range(1, workers):
        receiver, sender = ctx.Pipe(duplex=False)
        chunk = texts.slice(bounds[i], bounds[i + 1] - bounds[i])
        proc = ctx.Process(target=_tokens_in_child, args=(sender, key, prefix, chunk), daemon=True)
        proc.start()
        sender.close()
        children.append((proc, receiver))
    try:
        parts = [_token_bytes(key, prefix, texts.slice(0, bounds[1]))]
        for i, (_, receiver) in enumerate(children, start=1):
            part = receiver.recv_bytes()
            if len(part) != (bounds[i + 1] - bounds[i]) * width:
                reason = part[1:].decode(errors="replace") if part[:1] == b"!" else "short result"
                raise RuntimeError(f"pseudonymize worker {i} failed ({reason})")
            parts.append(part)
    finally:
        for proc, receiver in children:
            receiver.close()
            proc.join()
    return b"".join(parts)


def _can_fork() -> bool:
    # fork is the only start method that does not re-import pandas in every worker; it is the
    # default (and safe for this hashing-only child) on Linux. Elsewhere we stay serial.
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def _worker_count(requested: int | None, n_values: int) -> int:
    if requested is not None and requested < 1:
        raise ConfigError(f"pseudonymize workers must be >= 1 or None (auto), got {requested}")
    if n_values < _PARALLEL_MIN_VALUES or not _can_fork():
        return 1
    if requested is None:
        try:
            available = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - non-Linux
            available = os.cpu_count() or 1
        requested = min(available, 8)
    # Keep each worker's share worth a fork.
    return max(1, min(requested, n_values // (_PARALLEL_MIN_VALUES // 2)))


def _text_array(values: pd.Series) -> pa.Array:
    """The values as an Arrow string array (nulls for missing) without per-value Python work
    where pandas already holds Arrow strings."""
    dtype = values.dtype
    if pd.api.types.is_float_dtype(dtype):
        floats = values.to_numpy(dtype=float, na_value=np.nan)
        texts: list[str | None] = [
            None if math.isnan(x) else (str(int(x)) if x.is_integer() else repr(x))
            for x in floats.tolist()
        ]
        return pa.array(texts, type=pa.large_string())
    if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_integer_dtype(dtype):
        return pa.array(values.astype(_STRING_DTYPE), from_pandas=True)
    if isinstance(dtype, pd.StringDtype):
        return pa.array(values, from_pandas=True)
    objects = values.to_numpy(dtype=object)
    mask = pd.isna(values).to_numpy()
    return pa.array(
        [None if missing else (v if isinstance(v, str) else str(v)) for v, missing in
         zip(objects.tolist(), mask.tolist(), strict=True)],
        type=pa.large_string(),
    )


def _token_series(
    tokens: bytes, *, width: int, valid: np.ndarray, index: pd.Index, name: Any
) -> pd.Series:
    """Wrap fixed-width token bytes (one per valid row) as an Arrow-backed string Series."""
    n = len(valid)
    null_count = int(n - np.count_nonzero(valid))
    if null_count:
        data = np.zeros((n, width), dtype=np.uint8)
        data[valid] = np.frombuffer(tokens, dtype=np.uint8).reshape(-1, width)
        buffer = pa.py_buffer(data.reshape(-1))
        validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
    else:
        buffer, validity = pa.py_buffer(tokens), None
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int64)
    array = pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(offsets), buffer, validity, null_count
    )
    return pd.Series(array, dtype=_STRING_DTYPE, index=index, name=name)


def pseudonymize(
    values: pd.Series, *, key: bytes, key_id: str, workers: int | None = None
) -> pd.Series:
    """Replace every value by the keyed token ``"<key_id>:<24 hex of HMAC-SHA256>"``.

    Args:
        values: any Series; non-strings are hashed as their text (see module docstring).
        key: the firm's pseudonym key, ``FirmKeys.pseudonym_key()`` (checked when loaded).
        key_id: recorded in every token, e.g. ``FirmKeys.pseudonym_key_id``.
        workers: processes for large inputs (>= 200,000 values, Linux only); ``None`` uses the
            available cores, ``1`` forces a single process. Small inputs never start a pool.

    Returns:
        A string Series with the same index and name; missing values stay missing.

    Raises:
        ConfigError: ``key_id`` is malformed or ``workers`` < 1.
    """
    if not _KEY_ID_RE.fullmatch(key_id):
        raise ConfigError(
            "pseudonym key id is not valid; use 1-48 letters, digits, '_', '.' or "
            "'-' (use privacy.keys.FirmKeys.pseudonym_key_id)"
        )
    array = _text_array(values)
    valid = np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    present = array if array.null_count == 0 else array.filter(pa.array(valid))
    # As binary, Arrow hands out the UTF-8 bytes directly (zero-copy cast): no per-value encode.
    present = present.cast(pa.large_binary())
    prefix = f"{key_id}:".encode("ascii")
    n_workers = _worker_count(workers, len(present))
    if n_workers > 1:
        tokens = _parallel_token_bytes(key, prefix, present, n_workers)
    else:
        tokens = _token_bytes(key, prefix, present)
    return _token_series(
        tokens, width=len(prefix) + PSEUDONYM_HEX_CHARS, valid=valid, index=values.index,
        name=values.name,
    )


def token_key_id(token: str) -> str:
    """The key id a pseudonym token was made with (``"pseudonym-v2-1f0c9e4b7a:5d41..."`` ->
    ``"pseudonym-v2-1f0c9e4b7a"``).

    Raises:
        ConfigError: the text is not a fedcrm pseudonym token.
    """
    key_id, sep, digest = token.partition(":")
    if (
        not sep
        or not _KEY_ID_RE.fullmatch(key_id)
        or len(digest) != PSEUDONYM_HEX_CHARS
        or any(c not in "0123456789abcdef" for c in digest)
    ):
        # Never echo the text: a value that is not a token may be raw PII.
        raise ConfigError(
            "value is not a fedcrm pseudonym token ('<key_id>:<24 hex>'); was the column "
            "pseudonymized?"
        )
    return key_id


@dataclass(frozen=True)
class RotationPlan:
    """What it takes to move a pseudonymized column to the current key version.

    Tokens cannot be inverted, so rotation never maps old tokens to new ones: the rows that carry
    ``stale_key_ids`` must be pseudonymized again *from the raw source* with the current key
    (re-run ``prepare``), and every table that joins on the column must be re-run together.
    """

    column: str
    current_key_id: str
    stale_key_ids: tuple[str, ...]
    stale_rows: int
    total_rows: int

    @property
    def up_to_date(self) -> bool:
        return self.stale_rows == 0

    def describe(self) -> str:
        if self.up_to_date:
            return (
                f"column '{self.column}' is pseudonymized with {self.current_key_id}; "
                "no rotation needed"
            )
        return (
            f"column '{self.column}': {self.stale_rows} of {self.total_rows} tokens use "
            f"{', '.join(self.stale_key_ids)}; re-run prepare from the raw source with key "
            f"{self.current_key_id} (tokens cannot be converted between keys)"
        )


def plan_rotation(tokens: pd.Series, *, current_key_id: str) -> RotationPlan:
    """Inspect a pseudonymized column and say whether it must be rebuilt for ``current_key_id``.

    Raises:
        ConfigError: a non-missing entry is not a pseudonym token.
    """
    present = tokens.dropna().astype(str)
    key_ids = present.map(token_key_id)
    stale = key_ids[key_ids != current_key_id]
    return RotationPlan(
        column=str(tokens.name),
        current_key_id=current_key_id,
        stale_key_ids=tuple(sorted(set(stale.tolist()))),
        stale_rows=len(stale),
        total_rows=len(present),
    )


# --------------------------------------------------------------------------------------------
# Partial masking
# --------------------------------------------------------------------------------------------

_HAN_RE = re.compile(f"[{HAN}]+")
_CN_PREFIX_RE = re.compile(CN_COUNTRY_PREFIX)


def _mask_phone(text: str) -> str:
    text = _CN_PREFIX_RE.sub("", text)
    digits = "".join(c for c in text if c.isdigit())
    n = len(digits)
    if n >= 10:
        return digits[:3] + "*" * (n - 7) + digits[-4:]
    if n >= 4:
        return "*" * (n - 2) + digits[-2:]
    return "*" * max(n, 1)


def _mask_email(text: str) -> str:
    local, at, domain = text.rpartition("@")
    if not at or not local:
        return _mask_generic(text)
    return f"{local[0]}***@{domain}"


def _mask_national_id(text: str) -> str:
    compact = re.sub(r"[\s-]", "", text)
    if len(compact) <= 8:
        return _mask_generic(compact)
    return compact[:6] + "*" * (len(compact) - 6)


def _mask_card(text: str) -> str:
    digits = "".join(c for c in text if c.isdigit())
    if len(digits) <= 8:
        return "*" * len(digits)
    return "*" * (len(digits) - 4) + digits[-4:]


def _mask_name(text: str) -> str:
    stripped = text.strip()
    if _HAN_RE.fullmatch(stripped):
        surname = stripped[:2] if stripped[:2] in COMPOUND_SURNAMES else stripped[:1]
        return surname + "**"
    words = stripped.split()
    if not words:
        return stripped
    return " ".join(f"{w[0]}***" for w in words)


def _mask_generic(text: str) -> str:
    if len(text) <= 2:
        return "*" * len(text)
    return f"{text[0]}***{text[-1]}"


_PARTIAL_RULES: dict[PiiKind, Callable[[str], str]] = {
    PiiKind.PHONE: _mask_phone,
    PiiKind.EMAIL: _mask_email,
    PiiKind.NATIONAL_ID: _mask_national_id,
    PiiKind.BANK_CARD: _mask_card,
    PiiKind.NAME: _mask_name,
}


def _map_present(values: pd.Series, rule: Callable[[str], str]) -> pd.Series:
    """Apply ``rule`` to the text of each non-missing value; missing stays missing."""
    texts = _text_array(values).to_pylist()
    masked = [None if t is None else rule(t) for t in texts]
    return pd.Series(masked, dtype=_STRING_DTYPE, index=values.index, name=values.name)


def _stars(counts: pa.Array) -> pa.Array:
    return pc.binary_repeat(pa.scalar("*", pa.large_string()), counts)


def _keep_head_tail(
    text: pa.Array, *, head: int, tail: int, min_len: int
) -> tuple[pa.Array, pa.Array]:
    """``text[:head] + "*" * (len - head - tail) + text[-tail:]`` where ``len >= min_len``;
    also returns the mask of rows that were long enough."""
    length = pc.utf8_length(text)
    long_enough = pc.fill_null(pc.greater_equal(length, min_len), False)
    middle = _stars(pc.max_element_wise(pc.subtract(length, head + tail), 0))
    parts = [middle]
    if head:
        parts.insert(0, pc.utf8_slice_codeunits(text, 0, head))
    if tail:
        parts.append(pc.utf8_slice_codeunits(text, -tail))
    separator = pa.scalar("", pa.large_string())
    return pc.binary_join_element_wise(*parts, separator), long_enough


def _vectorised_partial(
    values: pd.Series, *, strip: Sequence[str], head: int, tail: int, min_len: int,
    fallback: Callable[[str], str],
) -> pd.Series:
    """Arrow-vectorised partial mask for digit-like kinds; short values go through ``fallback``."""
    text = _text_array(values).cast(pa.large_string())
    for pattern in strip:
        text = pc.replace_substring_regex(text, pattern, "")
    masked, long_enough = _keep_head_tail(text, head=head, tail=tail, min_len=min_len)
    out = pd.Series(masked, dtype=_STRING_DTYPE, index=values.index, name=values.name)
    short = ~np.asarray(long_enough.to_numpy(zero_copy_only=False), dtype=bool) & values.notna()
    if short.any():
        out[short] = _map_present(values[short], fallback)
    return out


_VECTORISED_PARTIAL: dict[PiiKind, dict[str, Any]] = {
    PiiKind.PHONE: {
        "strip": (CN_COUNTRY_PREFIX, r"\D"), "head": 3, "tail": 4, "min_len": 10,
        "fallback": _mask_phone,
    },
    PiiKind.NATIONAL_ID: {
        "strip": (r"[\s-]",), "head": 6, "tail": 0, "min_len": 9, "fallback": _mask_national_id,
    },
    PiiKind.BANK_CARD: {
        "strip": (r"\D",), "head": 0, "tail": 4, "min_len": 9, "fallback": _mask_card,
    },
}


def partial_mask(values: pd.Series, *, kind: PiiKind | None) -> pd.Series:
    """Keep just enough of each value for a human to recognise it.

    ===================  =====================  ===============================
    kind                 example in             out
    ===================  =====================  ===============================
    ``PHONE``            ``+86 138-1234-5678``  ``138****5678``
    ``EMAIL``            ``jane@example.com``   ``j***@example.com``
    ``NATIONAL_ID``      18-char PRC id         first 6 (region) + 12 ``*``
    ``BANK_CARD``        16-digit card          12 ``*`` + last 4
    ``NAME`` (Chinese)   ``张伟`` / ``欧阳娜娜``  ``张**`` / ``欧阳**``
    ``NAME`` (Latin)     ``Jane Smith``         ``J*** S***``
    anything else        ``abcdef``             ``a***f``
    ===================  =====================  ===============================

    Phone separators and the +86/0086 country code are dropped. Values too short for their rule
    are masked more (never returned whole). Names get a fixed number of stars so the length of
    the given name is not revealed. Missing values stay missing. Phone, id and card masks are
    vectorised in Arrow; the others run per value.
    """
    if kind in _VECTORISED_PARTIAL:
        return _vectorised_partial(values, **_VECTORISED_PARTIAL[kind])
    rule = _PARTIAL_RULES.get(kind, _mask_generic) if kind is not None else _mask_generic
    return _map_present(values, rule)


# --------------------------------------------------------------------------------------------
# Generalization
# --------------------------------------------------------------------------------------------

def _parse_dates(values: pd.Series) -> pd.Series:
    """Parse birth dates given as datetimes, ISO-like text, ``YYYYMMDD`` or ``1990年3月7日``."""
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        return pd.to_datetime(values)
    texts = _text_array(values).to_pylist()
    normalized: list[str | None] = []
    for t in texts:
        if t is None:
            normalized.append(None)
            continue
        m = CN_DATE_RE.fullmatch(t)
        if m:
            t = f"{m.group(1)}-{int(m.group(2)):02d}-{int(m.group(3)):02d}"
        elif re.fullmatch(r"\d{8}", t.strip()):
            s = t.strip()
            t = f"{s[:4]}-{s[4:6]}-{s[6:]}"
        normalized.append(t)
    return pd.to_datetime(
        pd.Series(normalized, dtype=object), errors="coerce", format="mixed"
    )


def _age_bands(values: pd.Series, *, as_of: date, width: int, top: int) -> pd.Series:
    born = _parse_dates(values)
    labels: list[str | None] = []
    for ts in born.tolist():
        if ts is None or pd.isna(ts):
            labels.append(None)
            continue
        age = as_of.year - ts.year - ((as_of.month, as_of.day) < (ts.month, ts.day))
        if age < 0 or age > 130:
            labels.append(None)  # not a plausible birth date: do not invent a band
        elif age >= top:
            labels.append(f"{top}+")
        else:
            low = age // width * width
            labels.append(f"{low}-{low + width - 1}")
    return pd.Series(labels, dtype=_STRING_DTYPE, index=values.index, name=values.name)


def _postcode_prefix(text: str, prefix_len: int) -> str:
    compact = text.replace(" ", "").upper()
    keep = min(prefix_len, max(len(compact) - 2, 0))
    return compact[:keep] + "*"


def _ip_network(text: str) -> str | None:
    import ipaddress

    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _fmt_edge(x: float) -> str:
    return f"{x:g}"


def _bin_labels(values: pd.Series, bins: Sequence[float]) -> pd.Series:
    edges = [float(b) for b in bins]
    if len(edges) < 2 or any(b >= a for a, b in zip(edges[1:], edges[:-1], strict=True)):
        raise ConfigError(
            f"generalize bins for column '{values.name}' must be at least two strictly "
            "increasing numbers, e.g. [0, 100, 200, 500]"
        )
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    labels = [f"[{_fmt_edge(lo)}, {_fmt_edge(hi)})" for lo, hi in itertools.pairwise(edges)]
    labels = [f"< {_fmt_edge(edges[0])}", *labels, f">= {_fmt_edge(edges[-1])}"]
    codes = np.searchsorted(np.asarray(edges), numbers, side="right")
    label_arr = np.asarray(labels, dtype=object)
    out = label_arr[codes]
    out[np.isnan(numbers)] = None
    return pd.Series(out, dtype=_STRING_DTYPE, index=values.index, name=values.name)


def generalize(
    values: pd.Series,
    *,
    kind: PiiKind | None,
    as_of: date | None = None,
    bins: Sequence[float] | None = None,
    prefix_len: int = 3,
    age_band_width: int = 10,
    age_top_code: int = 90,
) -> pd.Series:
    """Coarsen values so they stop identifying one person but keep analytic value.

    - ``BIRTH_DATE``: age at ``as_of`` (default: today) as a band ``"30-39"``; ages from
      ``age_top_code`` up become ``"90+"``; unparseable or implausible dates become missing.
    - ``POSTCODE``: the first ``prefix_len`` characters plus ``"*"`` (``100020`` -> ``100*``),
      never the whole code.
    - ``IP_ADDRESS``: the /24 (IPv4) or /48 (IPv6) network.
    - anything numeric with ``bins``: the half-open bin ``"[100, 200)"``, with ``"< lo"`` and
      ``">= hi"`` for values outside the edges.

    Raises:
        ConfigError: no generalization exists for ``kind`` without ``bins``, or ``bins`` are bad.
    """
    if bins is not None:
        return _bin_labels(values, bins)
    if kind is PiiKind.BIRTH_DATE:
        if age_band_width < 1 or age_top_code < age_band_width:
            raise ConfigError(
                f"age bands for column '{values.name}' need age_band_width >= 1 and "
                "age_top_code >= age_band_width"
            )
        return _age_bands(
            values, as_of=as_of or date.today(), width=age_band_width, top=age_top_code
        )
    if kind is PiiKind.POSTCODE:
        if prefix_len < 1:
            raise ConfigError(f"postcode prefix_len for column '{values.name}' must be >= 1")
        return _map_present(values, lambda t: _postcode_prefix(t, prefix_len))
    if kind is PiiKind.IP_ADDRESS:
        array = _text_array(values)
        nets = [None if t is None else _ip_network(t) for t in array.to_pylist()]
        return pd.Series(nets, dtype=_STRING_DTYPE, index=values.index, name=values.name)
    what = f"PII kind '{kind}'" if kind is not None else "a column without a PII kind"
    raise ConfigError(
        f"cannot generalize column '{values.name}': no rule for {what}; give numeric 'bins', "
        "or use policy 'pseudonymize', 'partial' or 'drop'"
    )


# --------------------------------------------------------------------------------------------
# Policy dispatch
# --------------------------------------------------------------------------------------------

_GENERALIZE_PARAMS = frozenset({"as_of", "bins", "prefix_len", "age_band_width", "age_top_code"})
_PSEUDONYMIZE_PARAMS = frozenset({"workers"})


def _check_params(policy: MaskingPolicy, params: Iterable[str], allowed: frozenset[str],
                  column: object) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        hint = ", ".join(sorted(allowed)) if allowed else "none"
        raise ConfigError(
            f"column '{column}': policy '{policy}' does not take {', '.join(unknown)} "
            f"(accepted: {hint})"
        )


def apply_policy(
    values: pd.Series,
    *,
    policy: MaskingPolicy,
    kind: PiiKind | None,
    key: bytes | None = None,
    key_id: str | None = None,
    **params: Any,
) -> pd.Series | None:
    """Mask one column according to ``policy``; ``None`` means the column is dropped.

    ``params`` go to the policy's function: ``workers`` for pseudonymize; ``as_of``, ``bins``,
    ``prefix_len``, ``age_band_width``, ``age_top_code`` for generalize.

    Raises:
        ConfigError: pseudonymize without ``key``/``key_id``, a parameter the policy does not
            take, or a generalization that does not exist for ``kind``.
    """
    policy = MaskingPolicy(policy)
    column = values.name
    if policy is MaskingPolicy.DROP:
        _check_params(policy, params, frozenset(), column)
        return None
    if policy is MaskingPolicy.PSEUDONYMIZE:
        _check_params(policy, params, _PSEUDONYMIZE_PARAMS, column)
        if key is None or key_id is None:
            raise ConfigError(
                f"column '{column}' is set to pseudonymize but no pseudonym key was loaded; "
                "configure the firm's pseudonym key file (key and key id are both required)"
            )
        return pseudonymize(values, key=key, key_id=key_id, workers=params.get("workers"))
    if policy is MaskingPolicy.PARTIAL:
        _check_params(policy, params, frozenset(), column)
        return partial_mask(values, kind=kind)
    _check_params(policy, params, _GENERALIZE_PARAMS, column)
    return generalize(values, kind=kind, **params)
