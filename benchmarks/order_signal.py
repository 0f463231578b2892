"""How much purchase signal lies in the *order* of events, and which runs capture it.

A diagnostic for the simulator's "revisit" journey (a view, in a later session, of an item the
user carted and has not bought: the step before most purchases). For each built example it
computes, from events before the cutoff only, three order-aware quantities that the 55 features do
not have: revisits of pending carts, hours since the last one, and pending carts. Then:

1. LightGBM (the baseline's defaults) on the built features, with and without them: the AUC the
   order signal is worth to a model that is handed it;
2. for each run given, a logistic regression stacked on the test window (fit on one half of the
   users, scored on the other) of LightGBM's logit, the run's logit and "a revisit in the last 48
   hours": a large weight on the indicator means the run did not learn it.

    python benchmarks/order_signal.py --workspace /tmp/pi-bq/sim-45000u --runs transformer,tx_sequence

Runs are read from ``runs/NAME/predictions.parquet`` (test rows only, so a backtested run works);
"lightgbm" is always included as the reference logit.

The three quantities are a measuring stick, not features of the product: the point of the
sequence model is to find such patterns without being told.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import duckdb
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

ORDER_SQL = """
WITH carts AS (SELECT user_id, item_id, min(ts) AS cart_ts FROM ev WHERE event = 'cart' GROUP BY ALL),
ex_c AS (SELECT ex.example_id, ex.user_id, ex.cutoff, c.item_id, c.cart_ts
         FROM ex JOIN carts c ON c.user_id = ex.user_id AND c.cart_ts < ex.cutoff
                              AND c.cart_ts >= ex.cutoff - INTERVAL 28 DAY),
pending AS (SELECT e.* FROM ex_c e WHERE NOT EXISTS (
              SELECT 1 FROM ev b WHERE b.user_id = e.user_id AND b.item_id = e.item_id
                AND b.event = 'purchase' AND b.ts >= e.cart_ts AND b.ts < e.cutoff)),
revisits AS (SELECT p.example_id, count(*) AS n_revisits, max(v.ts) AS last_revisit
             FROM pending p JOIN ev v ON v.user_id = p.user_id AND v.item_id = p.item_id
               AND v.event = 'view' AND v.ts > p.cart_ts + INTERVAL 30 MINUTE AND v.ts < p.cutoff
             GROUP BY 1)
SELECT ex.example_id, coalesce(r.n_revisits, 0) AS n_revisits,
       coalesce(date_diff('second', r.last_revisit, ex.cutoff) / 3600.0, 1e4) AS hours_since_revisit,
       (SELECT count(*) FROM pending p WHERE p.example_id = ex.example_id) AS n_pending_carts
FROM ex LEFT JOIN revisits r USING (example_id) ORDER BY ex.example_id
"""


def test_logits(ws: str, run: str, index: pd.Index) -> pd.Series:
    """The run's logit for each test example in ``index``, from its predictions.parquet.

    predictions.parquet holds one row per example *and split*: an evaluated run has "valid" and
    "test" rows, a backtested one also "backtest" rows (one per fold) that reuse the example ids
    of earlier windows. Only the test rows are the run's scores of the test window.
    """
    path = f"{ws}/runs/{run}/predictions.parquet"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: evaluate run {run!r} first")
    pred = pd.read_parquet(path, columns=["example_id", "split", "probability"])
    p = pred[pred["split"] == "test"].set_index("example_id")["probability"]
    missing = index.difference(p.index)
    if len(missing):
        raise ValueError(f"run {run!r} has no test prediction for {len(missing)} test examples: was it evaluated "
                         "on this workspace's current build?")
    p = p.loc[index].clip(1e-9, 1 - 1e-9)
    return np.log(p / (1 - p))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", required=True, help="a built workspace (user task)")
    ap.add_argument("--runs", default="", help="comma-separated runs to check (logits from predictions.parquet)")
    args = ap.parse_args(argv)
    from purchase_intent import runs
    from purchase_intent.models import LightGBMModel

    ws = args.workspace
    built = runs.load_built(ws)
    con = duckdb.connect()
    con.sql(f"CREATE VIEW ev AS SELECT * FROM '{ws}/events/*.parquet'")
    con.register("ex_df", built.examples[["example_id", "user_id", "cutoff"]])
    con.sql("CREATE VIEW ex AS SELECT * FROM ex_df")
    order = con.sql(ORDER_SQL).df().set_index("example_id").loc[built.examples["example_id"]]
    y = built.examples["label"].to_numpy()
    X0 = built.features.to_frame().to_numpy(np.float64)  # a small build: the whole matrix
    X1 = np.column_stack([X0, order.to_numpy(np.float64)])
    tr, va, te = (built.mask(s) for s in ("train", "valid", "test"))
    result: dict = {"lightgbm_test_auc": {}, "stacked": {}}
    for name, X in (("built features", X0), ("built features + order quantities", X1)):
        m = LightGBMModel(random_state=0).fit(X[tr], y[tr], X[va], y[va])
        result["lightgbm_test_auc"][name] = auc = roc_auc_score(y[te], m.predict_proba(X[te])[:, 1])
        print(f"LightGBM on {name}: test ROC-AUC {auc:.4f}")

    test = built.examples.loc[te, ["example_id", "user_id", "label"]].set_index("example_id")
    test["recent_revisit"] = (order.loc[test.index, "hours_since_revisit"] < 48).astype(float)
    print(f"test examples with a revisit in the last 48 h: {int(test.recent_revisit.sum()):,} of {len(test):,}; "
          f"their buy rate {test.label[test.recent_revisit == 1].mean():.3f} vs {test.label.mean():.3f} overall")
    names = ["lightgbm"] + [r for r in args.runs.split(",") if r]
    for r in names:
        test[r] = test_logits(ws, r, test.index)
    half = pd.util.hash_array(test.user_id.to_numpy(dtype=object)) % 2 == 0
    print(test.groupby("recent_revisit")[names].mean().round(3).to_string())
    for r in names[1:]:
        cols = ["lightgbm", r, "recent_revisit"]
        lr = LogisticRegression(max_iter=1000).fit(test.loc[half, cols], test.label[half])
        auc = roc_auc_score(test.label[~half], lr.decision_function(test.loc[~half, cols]))
        result["stacked"][r] = {"weights": lr.coef_[0].tolist(), "held_out_auc": auc}
        print(f"stacked on {cols}: weights {np.round(lr.coef_[0], 2).tolist()}, held-out ROC-AUC {auc:.4f}")
    return result


if __name__ == "__main__":
    main()
