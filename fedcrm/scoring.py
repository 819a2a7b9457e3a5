"""Churn scoring on the firm's own machine: the early-warning list, and the list to act on.

``score_customers`` scores every customer of the firm's store with a saved churn model:
pseudonymous id, churn probability, risk band and RFM segment, highest risk first.
``contact_list`` joins that list back to the firm's own customer numbers (and the columns of its
export it chooses, e.g. name and phone) by pseudonymizing the ids of its own export again with
its own pseudonym key. Nothing of either leaves the firm, and neither releases anything, so they
spend no budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedcrm.data.contract import ColumnRole, FirmConfig, TableName
from fedcrm.data.ingest import iter_chunks
from fedcrm.data.store import load_store
from fedcrm.data.validation import customer_id_text
from fedcrm.learning.models import load_churn_predictor
from fedcrm.privacy.errors import ConfigError, SchemaError
from fedcrm.privacy.keys import FirmKeys, load_keys
from fedcrm.privacy.masking import pseudonymize, token_key_id
from fedcrm.tasks.churn import layout_from_config

RISK_BANDS = ((0.5, "high"), (0.25, "medium"), (0.0, "low"))


def risk_band(p: np.ndarray) -> np.ndarray:
    bands = np.full(len(p), RISK_BANDS[-1][1], dtype=object)
    for threshold, name in reversed(RISK_BANDS):
        bands[p >= threshold] = name
    return bands


def score_customers(
    cfg: FirmConfig, *, model_path: Path, keys: FirmKeys | None = None
) -> pd.DataFrame:
    """The churn early-warning list for the firm's own customers, sorted by risk."""
    keys = keys or load_keys(cfg.firm.keys_dir, firm=cfg.firm.name)
    keys.require_signing_key(cfg.firm.keys_dir)  # fail closed, like every firm command
    predict, provenance = load_churn_predictor(model_path)
    layout = layout_from_config(cfg)
    if provenance.get("layout_fingerprint") != layout.fingerprint():
        raise ConfigError(
            f"model {model_path} was trained on feature layout "
            f"{str(provenance.get('layout_fingerprint'))[:12]}..., this firm's config declares "
            f"{layout.fingerprint()[:12]}...; use a model trained for this schema"
        )
    store = load_store(cfg.prepared_dir, keys=keys)
    customers = store.customers
    if customers is None:
        raise ConfigError(f"firm '{cfg.firm.name}' has no customers table to score")
    p = predict(layout.encode(customers))
    out = pd.DataFrame(
        {
            "customer_id": customers["customer_id"].to_numpy(),
            "churn_probability": np.round(p, 6),
            "risk_band": risk_band(p),
        }
    )
    feats = store.features
    if "segment" in feats.columns:
        seg = (
            feats.set_index("customer_id")["segment"]
            if "customer_id" in feats.columns
            else feats["segment"]
        )
        out["segment"] = out["customer_id"].map(seg.astype(str)).fillna("unknown")
    return out.sort_values("churn_probability", ascending=False, kind="stable").reset_index(
        drop=True
    )


#: Columns of ``fedcrm score``'s CSV that the contact list carries over (when present).
RISK_COLUMNS = ("churn_probability", "risk_band", "segment")


def read_risk_list(path: Path) -> pd.DataFrame:
    """A ``fedcrm score`` CSV, checked to hold pseudonymous ids and probabilities."""
    try:
        risks = pd.read_csv(path, dtype={"customer_id": str}, keep_default_na=False)
    except FileNotFoundError:
        raise ConfigError(f"risk list {path} not found; make it with `fedcrm score`") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError):
        raise SchemaError(f"{path} is not a readable risk list; make it again with "
                          "`fedcrm score`") from None
    missing = [c for c in ("customer_id", "churn_probability") if c not in risks.columns]
    if missing:
        raise SchemaError(f"{path} lacks column(s) {', '.join(missing)}: it is not a "
                          "`fedcrm score` risk list")
    try:
        for token in risks["customer_id"].astype(str):
            token_key_id(token)
    except ConfigError:
        raise SchemaError(f"{path}: column customer_id holds something other than fedcrm "
                          "pseudonyms; give the CSV that `fedcrm score` wrote") from None
    return risks


def contact_list(
    cfg: FirmConfig,
    risks: pd.DataFrame,
    *,
    include: Sequence[str] = (),
    bands: Sequence[str] = (),
    keys: FirmKeys | None = None,
) -> tuple[pd.DataFrame, int]:
    """The risk list with the firm's own customer numbers and the chosen export columns.

    Reads the firm's customers export in chunks, pseudonymizes each row's id with the firm's
    current pseudonym key (exactly as ``prepare`` does) and keeps the rows whose pseudonym is on
    the risk list, in the risk list's order. Returns the list and how many listed customers were
    not found in the export (gone since it was scored). Runs only where the keys are.
    """
    keys = keys or load_keys(cfg.firm.keys_dir, firm=cfg.firm.name)
    keys.require_signing_key(cfg.firm.keys_dir)  # fail closed, like every firm command
    if TableName.CUSTOMERS not in cfg.tables:
        raise ConfigError(f"firm '{cfg.firm.name}' has no customers table to join a risk list to")
    spec = cfg.tables[TableName.CUSTOMERS]
    id_column = next(c for c, s in spec.columns.items() if s.role is ColumnRole.ID)
    unknown = [c for c in include if c not in spec.columns]
    if unknown:
        raise ConfigError(
            f"--include {unknown[0]!r} is not a column of the customers table in "
            f"{cfg.config_path or 'the firm config'}; choose from: {', '.join(spec.columns)}"
        )
    if bands:
        risks = risks[risks["risk_band"].isin(bands)] if "risk_band" in risks else risks.iloc[:0]
    wanted = risks["customer_id"].astype(str)
    key_ids = {token_key_id(t) for t in wanted.head(1000)} if len(wanted) else set()
    if key_ids - {keys.pseudonym_key_id}:
        raise ConfigError(
            f"the risk list was scored under pseudonym key {sorted(key_ids)[0]}, the firm's keys "
            f"are now at {keys.pseudonym_key_id} (rotated?); run `fedcrm prepare` and "
            "`fedcrm score` again, then join"
        )
    order = pd.Series(np.arange(len(wanted)), index=pd.Index(wanted, name="customer_id"))
    if order.index.has_duplicates:
        raise SchemaError("the risk list names a customer twice; make it again with "
                          "`fedcrm score`")
    columns = list(dict.fromkeys([id_column, *include]))
    found: list[pd.DataFrame] = []
    for _, chunk in iter_chunks(spec.source, expected_columns=len(spec.columns)):
        missing = [c for c in columns if c not in chunk.columns]
        if missing:
            raise SchemaError(f"{spec.source.describe()}: column {missing[0]!r} is missing from "
                              "the export; export it again or fix the config")
        ids = customer_id_text(chunk[id_column])
        tokens = pseudonymize(ids, key=keys.pseudonym_key(), key_id=keys.pseudonym_key_id)
        hit = tokens.isin(order.index).to_numpy()
        if hit.any():
            part = chunk.loc[hit, columns].copy()
            part.insert(0, "_position", order.loc[tokens[hit]].to_numpy())
            found.append(part)
    joined = (pd.concat(found, ignore_index=True) if found
              else pd.DataFrame(columns=["_position", *columns]))
    joined = joined.drop_duplicates("_position")
    listed = risks.reset_index(drop=True)
    carried = [c for c in RISK_COLUMNS if c in listed.columns]
    result = joined.join(listed[carried], on="_position").sort_values("_position", kind="stable")
    result = result[[id_column, *carried, *[c for c in columns if c != id_column]]]
    return result.reset_index(drop=True), len(wanted) - len(joined)
