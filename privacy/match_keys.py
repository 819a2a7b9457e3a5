"""Normalising a firm's match key for the customer-overlap count (on the firm's machine only).

Two firms can only find a shared customer if both write the same key the same way, so each kind
has one canonical form, decided by a library that knows its rules:

* ``phone``: E.164 (``+8613912345678``) by ``phonenumbers``; a number without a country code is
  read in the firm's declared region, and a number ``phonenumbers`` does not consider valid
  (impossible length, unassigned range) is skipped;
* ``national_id``: a PRC resident identity number, upper-case, with a valid GB 11643-1999 check
  character (:func:`fedcrm.privacy.detection.is_prc_resident_id`, on ``python-stdnum``);
* ``email``: trimmed and lower-cased, and of e-mail shape.

Invalid and blank values are skipped and only counted; neither they nor the keys ever appear in
a message, a log line or an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import phonenumbers

from fedcrm.privacy.detection import is_prc_resident_id
from fedcrm.privacy.errors import ConfigError
from fedcrm.privacy.pii_vocabulary import EMAIL_RE
from fedcrm.privacy.policies import PiiKind

#: The PII kinds a firm may declare as its overlap match key.
MATCH_KEY_KINDS = frozenset({PiiKind.PHONE, PiiKind.NATIONAL_ID, PiiKind.EMAIL})


@dataclass(frozen=True)
class MatchKeys:
    """A firm's distinct normalised keys (secret: they never leave the process) and how many
    source values were skipped as blank or invalid (reported to the firm only)."""

    keys: frozenset[str]
    skipped: int

    def __repr__(self) -> str:
        return f"MatchKeys(<{len(self.keys)} keys hidden>, skipped={self.skipped})"


def check_region(region: str) -> str:
    """A phone region must be one ``phonenumbers`` knows (ISO 3166 alpha-2, e.g. ``CN``)."""
    code = region.strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise ConfigError(
            f"phone region {region!r} is not an ISO 3166 region phonenumbers knows (e.g. CN, US)"
        )
    return code


def _phone(text: str, region: str) -> str | None:
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def _national_id(text: str) -> str | None:
    value = text.replace(" ", "").upper()
    return value if is_prc_resident_id(value) else None


def _email(text: str) -> str | None:
    value = text.strip().lower()
    return value if EMAIL_RE.fullmatch(value) else None


def normalise_key(text: str, *, kind: PiiKind, region: str = "CN") -> str | None:
    """The canonical form of one value, or None when it is blank or invalid."""
    text = text.strip()
    if not text:
        return None
    if kind is PiiKind.PHONE:
        return _phone(text, region)
    if kind is PiiKind.NATIONAL_ID:
        return _national_id(text)
    if kind is PiiKind.EMAIL:
        return _email(text)
    raise ConfigError(
        f"'{kind.value}' cannot be a match key; use one of "
        f"{', '.join(sorted(k.value for k in MATCH_KEY_KINDS))}"
    )


def normalise_keys(values: Iterable[object], *, kind: PiiKind, region: str = "CN") -> MatchKeys:
    """Every value normalised; the distinct keys and the number skipped (blank or invalid)."""
    keys: set[str] = set()
    skipped = 0
    for value in values:
        text = "" if value is None or (isinstance(value, float) and value != value) else str(value)
        key = normalise_key(text, kind=kind, region=region)
        if key is None:
            skipped += 1
        else:
            keys.add(key)
    return MatchKeys(keys=frozenset(keys), skipped=skipped)
