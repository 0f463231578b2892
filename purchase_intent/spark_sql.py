"""The DuckDB SQL of ``labels``, ``features`` and ``privacy`` run on Apache Spark: transpiled, never rewritten by hand.

:func:`to_spark` parses a DuckDB query with SQLGlot and writes it in Spark's dialect. SQLGlot does most
of it (FILTER clauses, ``list`` -> ``collect_list``, ``range`` -> ``sequence``, casts, NULLS LAST where
DuckDB sorts nulls last); the rewrites below cover what it leaves in DuckDB's own words, each one a
rule on the syntax tree, so a new feature written in the same constructs runs on both engines:

* ``a ASOF [LEFT] JOIN r k ON a.x >= k.t`` (the last ``t`` at or before ``x``) and ``... ON a.x < k.t``
  (the first ``t`` after ``x``): Spark has no as-of join. ``r`` is a small table of distinct times
  (cutoffs, bucket edges), so it becomes a range join on each row's interval ``[t, next t)`` (or
  ``[previous t, t)``), which picks the same single row;
* ``epoch_us(t)`` -> ``unix_micros(t)``; ``isodow(t)`` -> ``extract(DAYOFWEEK_ISO FROM t)`` (SQLGlot's
  form is off by one for Sunday); ``timezone(tz, t AT TIME ZONE 'UTC')`` -> ``from_utc_timestamp(t, tz)``;
  ``length(list)`` -> ``size(list)``; ``strftime`` with a literal ``T`` quoted for Java's pattern;
* ``SELECT * EXCLUDE (...)``: only used on ``USING`` joins (whose key columns Spark already keeps once)
  and on helper columns nothing downstream reads, so it becomes ``*``;
* ``isfinite(x)`` -> ``NOT isnan(x) AND abs(x) < Infinity``; ``TRY(x)`` -> ``x`` (ANSI mode is off: NULL on error);
* ``$name`` parameters become columns of a one-row relation ``_pi_params`` cross-joined into the query:
  the pseudonymisation key blocks travel to the executors as data, never in the SQL text (which Spark
  logs and shows in its UI).

Timestamps are Spark ``TIMESTAMP`` values read in a session whose time zone is UTC, which matches
DuckDB's naive UTC ``TIMESTAMP``; :func:`spark_session` sets it, and ANSI mode off (DuckDB returns NULL
where Spark's ANSI mode raises; every division of the definitions is already guarded with ``nullif``).
"""
from __future__ import annotations

import sqlglot
from sqlglot import exp

# settings every session of ours needs, whatever the user's own configuration says
SESSION_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.ansi.enabled": "false",
    "spark.sql.legacy.sizeOfNull": "false",  # size(NULL) is NULL, as DuckDB's length(NULL)
    "spark.sql.parquet.inferTimestampNTZ.enabled": "false",  # DuckDB's TIMESTAMP read as Spark TIMESTAMP (UTC)
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.crossJoin.enabled": "true",
}
PARAMS = "_pi_params"  # the one-row relation of the query's parameters (see run_sql)


def _asof(join: exp.Join, n: int) -> exp.Join:
    """``ASOF [LEFT] JOIN r k ON a.x >= k.t`` / ``ON a.x < k.t`` as a range join (see the module doc)."""
    on = join.args["on"]
    right = join.this
    alias = right.alias_or_name
    if isinstance(on, exp.GTE):  # a.x >= k.t: the last t at or before x -> x in [t, next t)
        x, t, nb, lower = on.this, on.expression, "_asof_next", True
    elif isinstance(on, exp.LT):  # a.x < k.t: the first t after x -> x in [previous t, t)
        x, t, nb, lower = on.this, on.expression, "_asof_prev", False
    else:
        raise ValueError(f"an ASOF join on {on.sql('duckdb')} has no Spark form here (use >= or <)")
    if not (isinstance(t, exp.Column) and t.table == alias):
        raise ValueError(f"an ASOF join must compare with a column of {alias}: {on.sql('duckdb')}")
    nb = f"{nb}{n}"
    fn = "lead" if lower else "lag"
    table = right.copy()
    table.set("alias", None)
    sub = sqlglot.parse_one(f"SELECT *, {fn}({t.name}) OVER (ORDER BY {t.name}) AS {nb} FROM {table.sql('duckdb')}",
                            read="duckdb")
    other = exp.column(nb, alias)
    if lower:
        cond = exp.and_(exp.GTE(this=x.copy(), expression=t.copy()),
                        exp.or_(exp.Is(this=other, expression=exp.null()),
                                exp.LT(this=x.copy(), expression=other.copy())))
    else:
        cond = exp.and_(exp.LT(this=x.copy(), expression=t.copy()),
                        exp.or_(exp.Is(this=other, expression=exp.null()),
                                exp.GTE(this=x.copy(), expression=other.copy())))
    return exp.Join(this=exp.Subquery(this=sub, alias=exp.TableAlias(this=exp.to_identifier(alias))),
                    on=cond, side="LEFT" if join.side == "LEFT" else None)


def _rewrite(node: exp.Expression) -> exp.Expression:
    if isinstance(node, exp.Anonymous):
        name = node.name.lower()
        args = node.expressions
        if name == "epoch_us":
            return exp.Anonymous(this="unix_micros", expressions=args)
        if name == "isfinite":
            return sqlglot.parse_one(f"(NOT isnan({args[0].sql('spark')}) AND abs({args[0].sql('spark')}) "
                                     "< CAST('Infinity' AS DOUBLE))", read="spark")
        if name == "timezone" and len(args) == 2 and isinstance(args[1], exp.AtTimeZone):
            return exp.Anonymous(this="from_utc_timestamp", expressions=[args[1].this, args[0]])
    if isinstance(node, exp.Try):  # DuckDB's TRY(expr): NULL on error, as Spark without ANSI mode
        return node.this
    if isinstance(node, exp.DayOfWeekIso):
        return exp.Extract(this=exp.var("DAYOFWEEK_ISO"), expression=node.this)
    if isinstance(node, exp.Length) and isinstance(node.this, (exp.ArrayDistinct, exp.Flatten, exp.ArrayConcat,
                                                                exp.ArrayAgg, exp.Array)):
        return exp.ArraySize(this=node.this)
    if isinstance(node, exp.Star) and (node.args.get("except_") or node.args.get("except")):
        return exp.Star()
    if isinstance(node, exp.Placeholder) and node.name:
        return exp.column(node.name, PARAMS)
    return node


def split_ctes(sql: str) -> tuple[list[tuple[str, str, int]], str]:
    """A query's top-level CTEs, each as ``(name, Spark SQL, times referenced)``, and the final SELECT.

    Spark inlines a CTE at every reference, so the per-event window of the feature SQL would be computed
    once per use; the caller registers each CTE as a view instead, cached when it is read more than once.
    """
    tree = sqlglot.parse_one(sql, read="duckdb")
    with_ = tree.args.get("with_") or tree.args.get("with")
    if with_ is None:
        return [], to_spark(sql)
    ctes = list(with_.expressions)
    tree.set("with_" if "with_" in tree.args else "with", None)
    rest = [c.this for c in ctes] + [tree]
    out = []
    for i, cte in enumerate(ctes):
        name = cte.alias
        uses = sum(1 for node in rest[i + 1:] for t in node.find_all(exp.Table) if t.name == name and not t.db)
        out.append((name, to_spark(cte.this.sql("duckdb")), uses))
    return out, to_spark(tree.sql("duckdb"))


def to_spark(sql: str, pretty: bool = False) -> str:
    """A DuckDB query written in Spark SQL (SQLGlot plus the rewrites of the module doc).

    A query with ``$name`` parameters reads them from a one-row relation ``_pi_params`` that the caller
    registers (``run_sql``); the query gets it as a cross join in each SELECT that uses one.
    """
    tree = sqlglot.parse_one(sql, read="duckdb")
    for n, join in enumerate(list(tree.find_all(exp.Join))):
        if (join.args.get("kind") or "").upper() == "ASOF" or (join.args.get("method") or "").upper() == "ASOF":
            join.replace(_asof(join, n))
    for select in list(tree.find_all(exp.Select)):
        uses = [p for p in select.find_all(exp.Placeholder)
                if p.find_ancestor(exp.Select) is select and p.name]
        if uses:
            select.join(exp.to_table(PARAMS), join_type="cross", copy=False)
    # a replaced node's arguments are not visited again in the same pass; rewrites nest at most twice
    tree = tree.transform(_rewrite).transform(_rewrite)
    text = tree.sql(dialect="spark", pretty=pretty, unsupported_level=sqlglot.ErrorLevel.RAISE)
    # Java's date pattern takes letters as fields: a literal T must be quoted
    return text.replace("'yyyy-MM-ddTHH", "'yyyy-MM-dd\\'T\\'HH")
