"""The vocabulary of PII handling: what kind of personal data a column holds and what to do with it.

These enums are parsed from partner configs and written into masking decisions, so a typo in a
config ("pseudonymise") fails at parse time instead of silently leaving a column unmasked.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class PiiKind(StrEnum):
    """Kinds of personal data that fedcrm detects and masks."""

    NAME = "name"
    EMAIL = "email"
    PHONE = "phone"
    NATIONAL_ID = "national_id"
    BANK_CARD = "bank_card"
    IP_ADDRESS = "ip_address"
    ADDRESS = "address"
    BIRTH_DATE = "birth_date"
    POSTCODE = "postcode"
    CUSTOMER_ID = "customer_id"


class MaskingPolicy(StrEnum):
    """What `privacy.masking.apply_policy` does to a column.

    - ``PSEUDONYMIZE``: keyed HMAC token; joinable within one firm and key version, not invertible.
    - ``PARTIAL``: keep a few characters for human recognisability (``138****5678``).
    - ``GENERALIZE``: coarsen (age band, postcode prefix, amount bin, IP network).
    - ``DROP``: the column does not leave the raw source at all.
    """

    PSEUDONYMIZE = "pseudonymize"
    PARTIAL = "partial"
    GENERALIZE = "generalize"
    DROP = "drop"


SUGGESTED_POLICY: Mapping[PiiKind, MaskingPolicy] = MappingProxyType(
    {
        # Names are never a model feature; dropping beats a pseudonym that still links rows.
        PiiKind.NAME: MaskingPolicy.DROP,
        # Contact details: dropped by default; a firm that needs a join key should pseudonymize.
        PiiKind.EMAIL: MaskingPolicy.DROP,
        PiiKind.PHONE: MaskingPolicy.DROP,
        # Identifiers that may be the only join key between tables: keyed pseudonym.
        PiiKind.NATIONAL_ID: MaskingPolicy.PSEUDONYMIZE,
        PiiKind.CUSTOMER_ID: MaskingPolicy.PSEUDONYMIZE,
        # Payment data must not travel even partially masked (PCI DSS scope).
        PiiKind.BANK_CARD: MaskingPolicy.DROP,
        PiiKind.IP_ADDRESS: MaskingPolicy.DROP,
        PiiKind.ADDRESS: MaskingPolicy.DROP,
        # Quasi-identifiers with analytic value: coarsen them.
        PiiKind.BIRTH_DATE: MaskingPolicy.GENERALIZE,
        PiiKind.POSTCODE: MaskingPolicy.GENERALIZE,
    }
)
"""Default policy per PII kind, offered by `privacy.detection.scan_frame`.

Suggestions are conservative: anything that is not needed as a join key or a coarse feature is
dropped. ``PARTIAL`` is never suggested because partially masked values are for human display
(support screens, reports), not for analytics that leave the firm.
"""
