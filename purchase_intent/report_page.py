"""The report's page: HTML helpers and ``Page``, whose chart specs ``assets/report.js`` draws as SVG.

The CSS and scripts are package files (``purchase_intent/assets/``) inlined into every page, so
the report opens offline: no CDN, no network.
"""
from __future__ import annotations

import html
import json
import math
from importlib.resources import files
from typing import Any

import numpy as np


def _asset(name: str) -> str:
    return (files("purchase_intent") / "assets" / name).read_text(encoding="utf-8")


CSS = _asset("report.css")
JS = _asset("report.js")  # draws every spec of <script id="chart-data">, marks each figure data-rendered="1"
ERROR_TRAP = _asset("report_errors.js")  # page errors -> <body data-errors>, which the browser test reads


def esc(x: Any) -> str:
    return html.escape(str(x))


def num(x: Any, digits: int = 3) -> str:
    """Integers with thousands separators, floats to ``digits``; "–" for missing or non-finite."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return f"{x:.{digits}f}"


def interval(ci: Any) -> str:
    return f"[{num(ci[0])}, {num(ci[1])}]" if ci and None not in ci else ""


def table(header: list[str], rows: list[list[Any]]) -> str:
    """Header cells are escaped; row cells are HTML already."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>'
                                           for k, v in items) + "</div>"


class Page:
    """Sections of HTML plus the chart specs the inline script draws."""

    def __init__(self, title: str):
        self.title, self.parts, self.specs, self.nav = title, [], [], []

    def section(self, anchor: str, title: str) -> None:
        self.nav.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{esc(title)}</h2>')

    def add(self, text: str) -> None:
        self.parts.append(text)

    def chart(self, title: str, **spec: Any) -> str:
        """A <figure> whose SVG the script draws; returns its HTML (put it where it belongs)."""
        cid = f"chart-{len(self.specs) + 1}"
        self.specs.append({"id": cid, "title": title, **spec})
        wide = " wide" if spec.get("wide") else ""
        return f'<figure class="chart{wide}" id="{cid}"><figcaption>{esc(title)}</figcaption></figure>'

    def html(self, subtitle: str) -> str:
        """The whole document: styles, error trap, sections, chart specs as JSON, chart script."""
        nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in self.nav)
        data = json.dumps(self.specs, allow_nan=False).replace("</", "<\\/")  # no "</script>" inside the JSON
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{esc(self.title)}</title><style>\n{CSS}</style><script>\n{ERROR_TRAP}</script></head>"
                f'<body data-charts-expected="{len(self.specs)}"><main><h1>{esc(self.title)}</h1>'
                f'<p class="sub">{esc(subtitle)}</p><nav>{nav}</nav>{"".join(self.parts)}</main>'
                f'<script type="application/json" id="chart-data">{data}</script><script>\n{JS}</script></body></html>')
