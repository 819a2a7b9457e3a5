"""Fixed feature encoding: declared ranges/categories, never fitted on data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.data.encoding import (
    BooleanSpec,
    CategoricalSpec,
    FeatureLayout,
    NumericSpec,
    layout_from_declared,
)
from fedcrm.privacy.errors import ConfigError, SchemaError

LAYOUT = FeatureLayout(
    [
        NumericSpec("tenure", 0, 72),
        NumericSpec("charges", 0, 100, missing_indicator=True),
        BooleanSpec("partner"),
        CategoricalSpec("plan", ("basic", "plus")),
    ]
)


def test_feature_names_and_dim_follow_the_specs() -> None:
    assert LAYOUT.feature_names == (
        "tenure", "charges", "charges__missing", "partner", "plan=basic", "plan=plus",
        "plan=__other__",
    )
    assert LAYOUT.dim == 7


def test_encodes_by_declared_ranges_not_by_the_data() -> None:
    df = pd.DataFrame(
        {
            "tenure": [36, 0, 100, -5],
            "charges": [50.0, np.nan, 25.0, 100.0],
            "partner": ["Yes", "no", "TRUE", 0],
            "plan": ["plus", "basic", "gold", None],
            "ignored": ["x", "y", "z", "w"],
        }
    )
    X = LAYOUT.encode(df)
    assert X.dtype == np.float32
    np.testing.assert_allclose(
        X,
        [
            [0.5, 0.5, 0, 1, 0, 1, 0],
            [0.0, 0.0, 1, 0, 1, 0, 0],  # missing charge → 0 plus indicator
            [1.0, 0.25, 0, 1, 0, 0, 1],  # 100 clipped to 1; unknown plan → other
            [0.0, 1.0, 0, 0, 0, 0, 1],  # -5 clipped to 0; missing plan → other
        ],
    )
    # the same rows encode the same, whatever else the firm holds
    np.testing.assert_array_equal(LAYOUT.encode(df.iloc[[1]]), X[[1]])


def test_numeric_strings_and_blanks_are_accepted() -> None:
    layout = FeatureLayout([NumericSpec("total", 0, 10)])
    X = layout.encode(pd.DataFrame({"total": ["5", " ", "", None, "10.0"]}))
    np.testing.assert_allclose(X[:, 0], [0.5, 0, 0, 0, 1])


def test_booleans_accept_common_spellings() -> None:
    layout = FeatureLayout([BooleanSpec("flag")])
    values = [True, False, 1, 0, "1", "0", "yes", "No", "TRUE", "false", "y", "N", None]
    X = layout.encode(pd.DataFrame({"flag": pd.Series(values, dtype=object)}))
    np.testing.assert_array_equal(X[:, 0], [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0])
    X = layout.encode(pd.DataFrame({"flag": [True, False]}))
    np.testing.assert_array_equal(X[:, 0], [1, 0])


@pytest.mark.parametrize(
    "spec, values",
    [(NumericSpec("age", 0, 100), ["12", "anna.meyer@mail.example.com"]),
     (BooleanSpec("vip"), ["yes", "anna.meyer@mail.example.com"])],
)
def test_bad_values_name_the_column_and_never_the_value(spec: NumericSpec | BooleanSpec,
                                                        values: list[str]) -> None:
    with pytest.raises(SchemaError) as err:
        FeatureLayout([spec]).encode(pd.DataFrame({spec.name: values}))
    assert spec.name in str(err.value) and "1 value(s)" in str(err.value)
    assert "anna" not in str(err.value)


def test_missing_declared_column_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="charges, partner, plan"):
        LAYOUT.encode(pd.DataFrame({"tenure": [1]}))


def test_empty_table_encodes_to_zero_rows() -> None:
    empty = pd.DataFrame({c: [] for c in LAYOUT.columns})
    assert LAYOUT.encode(empty).shape == (0, LAYOUT.dim)


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: NumericSpec("x", 5, 5), "low < high"),
        (lambda: NumericSpec("x", 0, float("inf")), "finite"),
        (lambda: CategoricalSpec("c", ()), "non-empty"),
        (lambda: CategoricalSpec("c", ("a", "a")), "distinct"),
        (lambda: CategoricalSpec("c", ("a", "__other__")), "reserved"),
        (lambda: FeatureLayout([BooleanSpec("x"), NumericSpec("x", 0, 1)]), "twice"),
        (lambda: FeatureLayout([]), "empty"),
    ],
)
def test_invalid_declarations_are_config_errors(build: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build()  # type: ignore[operator]


def test_fingerprint_is_stable_and_order_independent_for_declarations() -> None:
    a = layout_from_declared({"plan": ("basic", "plus"), "region": ("n", "s")}, ["vip", "partner"],
                             {"tenure": (0, 72), "charges": (0, 100)})
    b = layout_from_declared({"region": ("n", "s"), "plan": ("basic", "plus")}, ["partner", "vip"],
                             {"charges": (0.0, 100.0), "tenure": (0.0, 72.0)})
    assert a == b and a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64
    assert a.feature_names[:4] == ("charges", "tenure", "partner", "vip")


@pytest.mark.parametrize(
    "changed",
    [
        lambda: layout_from_declared({"plan": ("basic", "plus")}, ["vip"], {"tenure": (0, 60)}),
        lambda: layout_from_declared({"plan": ("plus", "basic")}, ["vip"], {"tenure": (0, 72)}),
        lambda: layout_from_declared({"plan": ("basic", "plus")}, ["gold"], {"tenure": (0, 72)}),
        lambda: layout_from_declared({"plan": ("basic", "plus")}, ["vip"], {"tenure": (0, 72)},
                                     missing_indicators=True),
    ],
)
def test_fingerprint_changes_with_any_declaration(changed: object) -> None:
    base = layout_from_declared({"plan": ("basic", "plus")}, ["vip"], {"tenure": (0, 72)})
    assert changed().fingerprint() != base.fingerprint()  # type: ignore[operator]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False)),
            st.one_of(st.none(), st.sampled_from(["basic", "plus", "gold", ""])),
            st.sampled_from(["yes", "no", None, 1, 0]),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_every_encoding_is_in_unit_range_with_exactly_one_category(
    rows: list[tuple[float | None, str | None, object]],
) -> None:
    layout = FeatureLayout([NumericSpec("n", -10, 10), CategoricalSpec("c", ("basic", "plus")),
                            BooleanSpec("b")])
    df = pd.DataFrame(rows, columns=["n", "c", "b"])
    X = layout.encode(df)
    assert X.shape == (len(rows), layout.dim)
    assert np.all((X >= 0) & (X <= 1))
    np.testing.assert_array_equal(X[:, 1:4].sum(axis=1), 1)


@pytest.mark.data
def test_telco_encodes_with_the_declared_layout() -> None:
    from fedcrm.simulations.datasets import (
        TELCO_BOOLEAN,
        TELCO_CATEGORICAL,
        TELCO_NUMERIC,
        load_telco,
    )

    layout = layout_from_declared(TELCO_CATEGORICAL, TELCO_BOOLEAN, TELCO_NUMERIC)
    df = load_telco()
    X = layout.encode(df)
    assert X.shape == (7043, 3 + 6 + sum(len(c) + 1 for c in TELCO_CATEGORICAL.values()))
    assert np.isfinite(X).all() and X.min() >= 0 and X.max() <= 1
    other = [i for i, f in enumerate(layout.feature_names) if f.endswith("=__other__")]
    assert X[:, other].sum() == 0  # every Telco category is declared
    blank = df["total_charges"].isna().to_numpy()
    assert blank.sum() == 11 and np.all(X[blank, layout.feature_names.index("total_charges")] == 0)


def test_the_shipped_telco_schema_is_the_telco_data_dictionary() -> None:
    from pathlib import Path

    from fedcrm.config_file import load_toml
    from fedcrm.data.encoding import FeatureSchemaFile
    from fedcrm.simulations.datasets import telco_schema

    path = Path(__file__).resolve().parents[1] / "configs" / "schemas" / "telco.toml"
    shipped = load_toml(path, FeatureSchemaFile, what="schema").layout()
    assert shipped == telco_schema()
    assert FeatureLayout.from_json(shipped.canonical_json()) == shipped  # as firms receive it


def test_a_churn_run_without_a_public_schema_is_refused() -> None:
    import pytest

    from fedcrm.coordinator.run_config import RunConfig
    from fedcrm.privacy.errors import ConfigError

    with pytest.raises(ConfigError, match="public feature schema"):
        RunConfig(task="churn").run_spec("r1")


@pytest.mark.data
def test_public_outcome_tables_encode_with_their_declared_layouts() -> None:
    from fedcrm.simulations.datasets import (
        OUTCOME_DATASETS,
        DatasetRole,
        Split,
        load_outcomes,
        load_telco,
        telco_is_test,
    )

    assert {d.role for d in OUTCOME_DATASETS.values()} == set(DatasetRole)
    assert sum(d.role is DatasetRole.CHECK for d in OUTCOME_DATASETS.values()) >= 3
    for name in OUTCOME_DATASETS:
        table = load_outcomes(name)
        assert table.x.shape == (len(table.y), table.layout.dim), name
        assert np.isfinite(table.x).all() and table.x.min() >= 0 and table.x.max() <= 1, name
        assert 0.02 < table.y.mean() < 0.5, name  # both outcomes present, positives the minority
        fractions = {s: float(np.mean(table.split == s.value)) for s in Split}
        assert fractions[Split.TEST] == pytest.approx(0.2, abs=0.03), name
        assert fractions[Split.DEV] == pytest.approx(0.2, abs=0.03), name
        other = [i for i, f in enumerate(table.layout.feature_names) if f.endswith("=__other__")]
        # every category is declared: only blanks (a few in credit_data) fall in "other"
        assert table.x[:, other].sum() <= 0.01 * len(table.y), name
    telco = load_outcomes("telco")
    np.testing.assert_array_equal(telco.split == Split.TEST.value,
                                  telco_is_test(load_telco()["customer_id"]))
