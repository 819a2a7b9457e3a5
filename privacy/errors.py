"""Typed, user-facing errors.

Every error here is something a user can fix. Messages are one line, name the
file / column / budget involved and say what to do. They never contain a raw
data value (which could be PII) or key material.
"""

from __future__ import annotations


class FedcrmError(Exception):
    """Base class for errors the CLI reports as one line with a non-zero exit."""

    exit_code: int = 1


class ConfigError(FedcrmError):
    """A config file is missing, unreadable or invalid."""

    exit_code = 2


class SchemaError(FedcrmError):
    """Input data does not match the declared schema (missing column, bad encoding, ...)."""

    exit_code = 3


class UnmaskedColumn(SchemaError):
    """A column has no declared policy; fedcrm fails closed instead of passing it through."""


class QuarantineThresholdExceeded(SchemaError):
    """Too many rows failed validation."""


class KeyFileError(FedcrmError):
    """A key file is missing, malformed or has unsafe permissions."""

    exit_code = 4


class DecryptionError(FedcrmError):
    """A prepared store could not be decrypted (wrong key, tampered or truncated chunk)."""

    exit_code = 5


class BudgetExhausted(FedcrmError):
    """A DP release would exceed the firm's privacy budget; nothing was released."""

    exit_code = 6

    def __init__(self, *, epsilon_spent: float, epsilon_cap: float, epsilon_requested: float,
                 purpose: str, ledger: str = "") -> None:
        self.epsilon_spent = epsilon_spent
        self.epsilon_cap = epsilon_cap
        self.epsilon_requested = epsilon_requested
        self.purpose = purpose
        where = f" (ledger {ledger})" if ledger else ""
        super().__init__(
            f"privacy budget exhausted{where}: spent ε={epsilon_spent:.4f} of cap "
            f"ε={epsilon_cap:.4f} (remaining ε={max(epsilon_cap - epsilon_spent, 0.0):.4f}); "
            f"'{purpose}' would bring the total to ε={epsilon_requested:.4f}. Nothing was "
            "released. Ask for less, or raise the cap with `fedcrm budget raise` (a governance "
            "decision, signed and logged)."
        )


class LedgerTampered(FedcrmError):
    """A firm's ledger, audit log or their record disagree, are missing or shrank: the budget
    cannot be trusted, so nothing is released until it is restored or rebuilt."""

    exit_code = 6


class BudgetRaiseRequired(FedcrmError):
    """The config asks for a larger cap than the firm's recorded one; raising it is an explicit,
    signed command (``fedcrm budget raise``)."""

    exit_code = 6


class PlanDoesNotFit(FedcrmError):
    """A training plan cannot meet the requested (ε, δ) with any usable noise level."""

    exit_code = 6


class AuditError(FedcrmError):
    """An audit log failed verification or could not be written."""

    exit_code = 7


class SecureSumError(FedcrmError):
    """A secure sum cannot go on: a value outside its declared range, a peer key that does not
    verify, a request that breaks the protocol, or too few firms left to finish it."""

    exit_code = 9


class ValueOutOfRange(SecureSumError):
    """A value to be summed lies outside the sum's declared range (never clipped)."""


class PeerKeyRefused(SecureSumError):
    """A peer's secure-sum key is unsigned, signed by a key the firm does not trust, or
    tampered with."""


class SumAborted(SecureSumError):
    """Too few firms are left (or a recovered secret does not match its commitment) to finish
    a secure sum; nothing about any firm's input is revealed."""
