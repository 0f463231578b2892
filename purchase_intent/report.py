"""The HTML report: one self-contained file a person can open offline and understand.

    purchase-intent report [--run NAME ...] [--out report.html]

It reads only workspace files (``events/manifest.json``, the events, ``examples/``, and each
run's ``run.json``, ``metrics.json`` and ``predictions.parquet``) and loads each run's model to
explain a sample of test examples. Charts are drawn in the browser as SVG by a small inline
script from JSON data embedded in the page: no CDN, no network. Every chart marks itself
``data-rendered="1"`` once drawn and page errors are recorded on ``<body data-errors>``, which
the browser test reads.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from .evaluate import reliability_curve
from .workspace import Workspace, atomic_write_text

MAX_POINTS = 200  # points per curve
N_EXPLAIN_SAMPLE = {"logreg": 2000, "lightgbm": 2000, "transformer": 200}  # test examples for importance


# ---------------------------------------------------------------------------------------------
# curves (the metrics themselves are evaluate.py's; these are their plotted shapes)
def _thin(*cols: np.ndarray) -> list[list[float]]:
    n = len(cols[0])
    idx = np.unique(np.linspace(0, n - 1, min(n, MAX_POINTS)).round().astype(int)) if n else np.zeros(0, int)
    rows = [[float(c[i]) for c in cols] for i in idx]
    return [[round(v, 5) for v in r] for r in rows if all(math.isfinite(v) for v in r)]


def curves(y: np.ndarray, p: np.ndarray) -> dict[str, list]:
    """ROC, precision-recall, cumulative gain and lift as thinned [x, y] point lists."""
    order = np.argsort(-p, kind="mergesort")
    y, p = y[order].astype(float), p[order]
    last = np.r_[np.flatnonzero(np.diff(p) != 0), len(p) - 1]  # last index of each tied score
    tp, fp = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    P, N = max(y.sum(), 1), max(len(y) - y.sum(), 1)
    k = (last + 1) / len(y)  # share of users targeted
    return {
        "roc": _thin(np.r_[0, fp / N], np.r_[0, tp / P]),
        "pr": _thin(tp / P, tp / (tp + fp)),
        "gain": _thin(np.r_[0, k], np.r_[0, tp / P]),
        "lift": _thin(k, (tp / P) / k),
    }


def histogram(p: np.ndarray, y: np.ndarray, bins: int = 25) -> dict:
    """Score distribution per class: share of each class's examples per probability bin."""
    edges = np.linspace(0, max(float(p.max()) if len(p) else 1.0, 1e-6), bins + 1)
    mids = (edges[:-1] + edges[1:]) / 2
    out = {}
    for label, name in ((1, "buyers"), (0, "non-buyers")):
        h = np.histogram(p[y == label], edges)[0].astype(float)
        out[name] = [[round(float(m), 5), round(float(v), 5)] for m, v in zip(mids, h / max(h.sum(), 1))]
    return out


# ---------------------------------------------------------------------------------------------
# page assets: CSS and the chart script (SVG drawn from the JSON specs embedded in the page)
CSS = """
:root{--ink:#1d2433;--muted:#5b6577;--line:#e3e7ee;--bg:#fbfcfe;--accent:#0b62a4}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.55 -apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 32px 80px}
h1{font-size:28px;margin:0 0 4px}h2{font-size:21px;margin:42px 0 8px;padding-top:12px;border-top:1px solid var(--line)}
h3{font-size:16px;margin:22px 0 6px}.sub{color:var(--muted);margin:0 0 18px}
nav a{color:var(--accent);margin-right:14px;text-decoration:none;font-size:14px}
p.note{color:var(--muted);font-size:13.5px;max-width:900px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 16px;min-width:140px}
.card b{display:block;font-size:22px}.card span{color:var(--muted);font-size:13px}
table{border-collapse:collapse;background:#fff;margin:10px 0;font-size:14px}
th,td{border-bottom:1px solid var(--line);padding:6px 10px;text-align:right;white-space:nowrap}
th{background:#f2f5f9;font-weight:600}td:first-child,th:first-child{text-align:left}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:16px}
figure.chart{margin:0;background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 12px 6px}
figure.chart figcaption{font-weight:600;font-size:14px;margin-bottom:2px}
figure.chart svg{display:block;width:100%;height:auto}figure.wide{grid-column:1/-1}
.legend{font-size:12px;color:var(--muted);min-height:16px}.legend span{margin-right:14px;white-space:nowrap}
.legend i{display:inline-block;width:14px;height:3px;margin:0 5px 3px 0;vertical-align:middle}
.axis text{font-size:11px;fill:var(--muted)}.axis line,.axis path{stroke:#aab2bf}
.gridline{stroke:#eef1f5}.label{font-size:11.5px;fill:var(--ink)}
.expl{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 14px;margin:10px 0}
.expl h4{margin:0 0 6px;font-size:14px}.expl .p{color:var(--accent)}
.reason{display:grid;grid-template-columns:70px 110px 1fr;gap:10px;align-items:center;font-size:13.5px}
.bar{height:10px;border-radius:2px}.pos{background:#c0392b}.neg{background:#2e86c1}
code{background:#eef1f5;padding:1px 4px;border-radius:3px;font-size:13px}
"""

JS = r"""
(function(){
var NS='http://www.w3.org/2000/svg',COLORS=['#0072B2','#E69F00','#009E73','#D55E00','#CC79A7','#56B4E9','#8c6d31','#000000'];
function el(tag,attrs,parent,text){var e=document.createElementNS(NS,tag);for(var k in attrs)if(attrs[k]!=null)e.setAttribute(k,attrs[k]);
  if(text!==undefined)e.textContent=text;if(parent)parent.appendChild(e);return e;}
function ticks(lo,hi,n){var span=hi-lo||1,step=Math.pow(10,Math.floor(Math.log10(span/n))),err=span/n/step;
  step*=err>=7.5?10:err>=3.5?5:err>=1.5?2:1;var t=[];for(var v=Math.ceil(lo/step)*step;v<=hi+step*1e-9;v+=step)t.push(+v.toFixed(12));return t;}
function fmt(v,kind){if(kind==='pct')return (v*100).toFixed(Math.abs(v)<0.1&&v!==0?1:0)+'%';
  if(kind==='date'){var d=new Date(v*86400000);return d.toISOString().slice(5,10);}
  var a=Math.abs(v);if(a>0&&a<1e-3)return v.toExponential(0);return a>=1e6?(v/1e6).toFixed(1)+'M':a>=1e3?(v/1e3).toFixed(a>=1e4?0:1)+'k':a>=10||v===0?v.toFixed(0):+v.toPrecision(2)+'';}
function line(fig,s){
  var W=s.wide?980:480,H=300,m={l:58,r:14,t:12,b:46},w=W-m.l-m.r,h=H-m.t-m.b;
  var svg=el('svg',{viewBox:'0 0 '+W+' '+H,role:'img','aria-label':s.title},fig);
  var xs=[],ys=[];s.series.forEach(function(se){se.points.forEach(function(p){xs.push(p[0]);ys.push(p[1]);});});
  var ly=!!s.ylog,tr=function(v){return ly?Math.log10(Math.max(v,0.5)):v;};
  var x0=s.xmin!==undefined?s.xmin:Math.min.apply(null,xs),x1=s.xmax!==undefined?s.xmax:Math.max.apply(null,xs);
  var y0=s.ymin!==undefined?s.ymin:Math.min(0,Math.min.apply(null,ys)),y1=s.ymax!==undefined?s.ymax:Math.max.apply(null,ys)*1.05;
  if(ly){y0=tr(Math.max(Math.min.apply(null,ys.filter(function(v){return v>0;})),1))-0.05;y1=tr(Math.max.apply(null,ys))+0.1;}
  if(x1<=x0)x1=x0+1;if(y1<=y0)y1=y0+1;
  var X=function(v){return m.l+(v-x0)/(x1-x0)*w;},Y=function(v){return m.t+h-(tr(v)-y0)/(y1-y0)*h;};
  var ax=el('g',{'class':'axis'},svg);
  var yt=ly?ticks(Math.ceil(y0),Math.floor(y1),4).filter(function(v){return v%1===0;}).map(function(v){return Math.pow(10,v);}):ticks(y0,y1,5);
  yt.forEach(function(v){var yy=Y(v);el('line',{x1:m.l,x2:m.l+w,y1:yy,y2:yy,'class':'gridline'},ax);
    el('text',{x:m.l-6,y:yy+4,'text-anchor':'end'},ax,fmt(v,s.yfmt));});
  ticks(x0,x1,s.xtype==='date'?6:5).forEach(function(v){var xx=X(v);el('line',{x1:xx,x2:xx,y1:m.t+h,y2:m.t+h+4},ax);
    el('text',{x:xx,y:m.t+h+16,'text-anchor':'middle'},ax,fmt(v,s.xtype==='date'?'date':s.xfmt));});
  el('path',{d:'M'+m.l+','+m.t+'V'+(m.t+h)+'H'+(m.l+w),fill:'none'},ax);
  el('text',{x:m.l+w/2,y:H-6,'text-anchor':'middle','class':'label'},svg,s.xlabel);
  el('text',{x:12,y:m.t+h/2,'text-anchor':'middle','class':'label',transform:'rotate(-90 12 '+(m.t+h/2)+')'},svg,s.ylabel);
  if(s.diagonal)el('path',{d:'M'+X(x0)+','+Y(x0)+'L'+X(Math.min(x1,y1))+','+Y(Math.min(x1,y1)),stroke:'#9aa3b0','stroke-dasharray':'4 4',fill:'none'},svg);
  if(s.hline!==undefined)el('path',{d:'M'+m.l+','+Y(s.hline)+'H'+(m.l+w),stroke:'#9aa3b0','stroke-dasharray':'4 4',fill:'none'},svg);
  var marks=0,lg=document.createElement('div');lg.className='legend';fig.insertBefore(lg,svg);
  s.series.forEach(function(se,i){var c=se.color||COLORS[i%COLORS.length],d='';
    se.points.forEach(function(p,j){d+=(j?'L':'M')+X(p[0]).toFixed(1)+','+Y(p[1]).toFixed(1);});
    if(d){el('path',{d:d,fill:'none',stroke:c,'stroke-width':2,'stroke-dasharray':se.dash?'5 3':null,'class':'series'},svg);marks++;}
    if(se.dots)se.points.forEach(function(p){el('circle',{cx:X(p[0]),cy:Y(p[1]),r:3,fill:c},svg);});
    var item=document.createElement('span'),sw=document.createElement('i');sw.style.background=c;
    if(se.dash)sw.style.background='repeating-linear-gradient(90deg,'+c+' 0 5px,transparent 5px 8px)';item.appendChild(sw);item.appendChild(document.createTextNode(se.name));lg.appendChild(item);});
  return marks;}
function bars(fig,s){
  var n=s.bars.length,W=480,lw=s.labelWidth||190,rh=20,m={t:6,b:36,r:16},H=m.t+m.b+n*rh,w=W-lw-m.r;
  var svg=el('svg',{viewBox:'0 0 '+W+' '+H,role:'img','aria-label':s.title},fig);
  var vs=s.bars.map(function(b){return b.value;}),lo=Math.min(0,Math.min.apply(null,vs)),hi=Math.max(0,Math.max.apply(null,vs));
  if(hi<=lo)hi=lo+1;var X=function(v){return lw+(v-lo)/(hi-lo)*w;},ax=el('g',{'class':'axis'},svg);
  ticks(lo,hi,4).forEach(function(v){el('line',{x1:X(v),x2:X(v),y1:m.t,y2:m.t+n*rh,'class':'gridline'},ax);
    el('text',{x:X(v),y:m.t+n*rh+14,'text-anchor':'middle'},ax,fmt(v,s.xfmt));});
  el('text',{x:lw+w/2,y:H-4,'text-anchor':'middle','class':'label'},svg,s.xlabel);
  s.bars.forEach(function(b,i){var y=m.t+i*rh,x=X(Math.min(0,b.value)),bw=Math.max(Math.abs(X(b.value)-X(0)),1);
    var r=el('rect',{x:x,y:y+4,width:bw,height:rh-8,fill:b.value<0?'#2e86c1':(s.color||'#c0392b'),rx:2},svg);
    el('title',{},r,b.label+': '+b.value.toPrecision(3));
    el('text',{x:lw-6,y:y+rh/2+4,'text-anchor':'end','class':'label'},svg,b.label.length>30?b.label.slice(0,29)+'…':b.label);});
  el('line',{x1:X(0),x2:X(0),y1:m.t,y2:m.t+n*rh,stroke:'#66707f'},svg);
  return n;}
var specs=JSON.parse(document.getElementById('chart-data').textContent),done=0;
specs.forEach(function(s){var fig=document.getElementById(s.id);if(!fig)throw new Error('no figure '+s.id);
  var marks=s.kind==='bar'?bars(fig,s):line(fig,s),svg=fig.querySelector('svg'),box=svg.getBoundingClientRect();
  if(marks>0&&box.width>0&&box.height>0){fig.setAttribute('data-rendered','1');done++;}});
document.body.setAttribute('data-charts-rendered',String(done));
})();
"""

ERROR_TRAP = """
window.__errors=[];function __rec(m){window.__errors.push(String(m));document.body&&document.body.setAttribute('data-errors',window.__errors.join(' | '));}
window.addEventListener('error',function(e){__rec(e.message||e.type);});
var __ce=console.error;console.error=function(){__rec(Array.prototype.join.call(arguments,' '));__ce.apply(console,arguments);};
"""


# ---------------------------------------------------------------------------------------------
# page building blocks
def _e(x: Any) -> str:
    return html.escape(str(x))


def _n(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return f"{x:.{digits}f}"


def _ci(ci: Any) -> str:
    return f"[{_n(ci[0])}, {_n(ci[1])}]" if ci and None not in ci else ""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                                           for k, v in items) + "</div>"


class Page:
    """Sections of HTML plus the chart specs the inline script draws."""

    def __init__(self, title: str):
        self.title, self.parts, self.specs, self.nav = title, [], [], []

    def section(self, anchor: str, title: str) -> None:
        self.nav.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{_e(title)}</h2>')

    def add(self, text: str) -> None:
        self.parts.append(text)

    def chart(self, title: str, **spec: Any) -> str:
        """A <figure> whose SVG the script draws; returns its HTML (put it where it belongs)."""
        cid = f"chart-{len(self.specs) + 1}"
        self.specs.append({"id": cid, "title": title, **spec})
        wide = " wide" if spec.get("wide") else ""
        return f'<figure class="chart{wide}" id="{cid}"><figcaption>{_e(title)}</figcaption></figure>'

    def html(self, subtitle: str) -> str:
        nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in self.nav)
        data = json.dumps(self.specs, allow_nan=False).replace("</", "<\\/")
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{_e(self.title)}</title><style>{CSS}</style><script>{ERROR_TRAP}</script></head>"
                f'<body data-charts-expected="{len(self.specs)}"><main><h1>{_e(self.title)}</h1>'
                f'<p class="sub">{_e(subtitle)}</p><nav>{nav}</nav>{"".join(self.parts)}</main>'
                f'<script type="application/json" id="chart-data">{data}</script><script>{JS}</script></body></html>')


# ---------------------------------------------------------------------------------------------
# sections
def _data_section(page: Page, ws: Workspace) -> None:
    page.section("data", "The data")
    manifest = ws.read_manifest()
    con = ws.connect()
    s = con.execute("""SELECT count(*), count(DISTINCT user_id), count(DISTINCT session_id), count(DISTINCT item_id),
                              min(ts), max(ts) FROM events""").fetchall()[0]
    page.add(_cards([("events", f"{s[0]:,}"), ("users", f"{s[1]:,}"),
                     ("sessions", f"{s[2]:,}" if s[2] else "from gaps"), ("items", f"{s[3]:,}"),
                     ("first event (UTC)", str(s[4])[:16]), ("last event (UTC)", str(s[5])[:16])]))
    daily = con.execute("""SELECT CAST(ts AS DATE) AS day, event, count(*) AS n FROM events
                           GROUP BY ALL ORDER BY day""").df()
    epoch = pd.Timestamp("1970-01-01")
    daily["x"] = (pd.to_datetime(daily["day"]) - epoch).dt.days
    series = [{"name": ev, "points": g[["x", "n"]].astype(float).values.tolist()}
              for ev, g in daily.groupby("event", sort=False)]
    series.sort(key=lambda se: -sum(p[1] for p in se["points"]))
    page.add('<div class="grid">' + page.chart(
        "Events per day by type", kind="line", series=series, xtype="date", ylog=True, wide=True,
        xlabel="day (UTC, month-day)", ylabel="events per day (log scale)") + "</div>")
    rows = []
    for f in manifest.get("files", []):
        rej = f.get("rejected") or {}
        rows.append([_e(Path(str(f.get("source", "?"))).name), _e(f.get("format", "")), _n(f.get("rows_read")),
                     _n(f.get("accepted")), _n(sum(rej.values())),
                     _e(", ".join(f"{k}: {v:,}" for k, v in sorted(rej.items())) or "none"), _n(f.get("filtered"))])
    if rows:
        page.add("<h3>Ingested files and rejected rows</h3>" + _table(
            ["file", "format", "rows read", "accepted", "rejected", "rejected by reason", "filtered (time window)"],
            rows) + f'<p class="note">Rejected rows are kept with their reason in <code>{_e(ws.rejects_dir)}</code>.</p>')


def label_text(cfg: dict) -> str:
    """The label definition in one paragraph."""
    if cfg.get("task") == "session":
        gap = cfg.get("session_gap") or "the data's session ids (else 30min of inactivity)"
        prefix = f"the first {cfg['prefix']} events of" if cfg.get("prefix") else "the events so far in"
        return (f"One example per session (sessions: {gap}). The model sees {prefix} the session and the "
                f"user's earlier history; the label is 1 when the session ends with a purchase. "
                f"Periods of {cfg.get('step')} split the data in time.")
    return (f"Every {cfg.get('step')} (at midnight {cfg.get('tz', 'UTC')}) each user with an event in the previous "
            f"{cfg.get('lookback')} is an example. Its label is 1 when the user buys within the next "
            f"{cfg.get('horizon')}. Features and event sequences read only events before the cutoff.")


def _task_section(page: Page, ws: Workspace) -> Optional[dict]:
    page.section("task", "Task, split and label")
    info_path = ws.examples_dir / "build.json"
    if not info_path.exists():
        page.add('<p class="note">No examples built yet.</p>')
        return None
    info = json.loads(info_path.read_text())
    page.add(f"<p>{_e(label_text(info['label_config']))}</p>")
    ex = pd.read_parquet(ws.examples_dir / "examples.parquet", columns=["cutoff", "label", "split"])
    rows = []
    for split in ("train", "gap", "valid", "test"):
        g = ex[ex["split"] == split]
        if len(g):
            rows.append([split, str(g["cutoff"].min())[:16], str(g["cutoff"].max())[:16], _n(g["cutoff"].nunique()),
                         _n(len(g)), _n(int(g["label"].sum())), f"{g['label'].mean():.2%}"])
    page.add(_table(["split", "first cutoff", "last cutoff", "cutoffs", "examples", "buyers", "positive rate"], rows))
    if info["label_config"].get("task", "user") == "user":
        by = ex.groupby("cutoff")["label"].agg(["mean", "size"]).reset_index()
        x = ((pd.to_datetime(by["cutoff"]) - pd.Timestamp("1970-01-01")).dt.total_seconds() / 86400).tolist()
        series = [{"name": "positive rate", "points": [[a, float(b)] for a, b in zip(x, by["mean"])], "dots": True}]
        page.add('<div class="grid">' + page.chart(
            "Positive rate per cutoff", kind="line", series=series, xtype="date", yfmt="pct", ymin=0,
            xlabel="cutoff (month-day)", ylabel="share of examples that buy") + "</div>")
    page.add('<p class="note">Splits are by time only: train, then (gap), then validation, then test cutoffs; '
             "the gap keeps label windows of train from overlapping the later splits.</p>")
    return info


def _comparison_section(page: Page, ws: Workspace, runs: list[str]) -> dict[str, pd.DataFrame]:
    page.section("models", "Model comparison (test window)")
    rows, preds = [], {}
    for r in runs:
        m = json.loads((ws.run_dir(r) / "metrics.json").read_text())
        t = m["test"]
        paired = (m.get("paired") or {}).get("test")
        delta = (f"{paired['diff']:+.4f} {_ci(paired.get('ci'))} vs {_e(m['paired'].get('reference'))}"
                 if paired and paired.get("diff") is not None else "reference" if m["model"] in ("logreg", "lightgbm")
                 else "")
        lift = t.get("lift") or {}
        rows.append([f"<b>{_e(r)}</b>", _n(t.get("n")), _n(t.get("positives")),
                     f"{_n(t.get('roc_auc'), 4)} {_ci(t.get('roc_auc_ci'))}", _n(t.get("pr_auc"), 4),
                     _n(t.get("log_loss"), 4), _n(t.get("brier"), 4), _n(t.get("ece"), 4),
                     _n(lift.get("top_1pct"), 2), _n(lift.get("top_10pct"), 2), delta])
        p = ws.run_dir(r) / "predictions.parquet"
        if p.exists():
            preds[r] = pd.read_parquet(p)
    page.add(_table(["model", "n", "buyers", "ROC-AUC [95% CI]", "PR-AUC", "log loss", "Brier", "ECE",
                     "lift top 1%", "lift top 10%", "ΔAUC [95% CI]"], rows))
    page.add('<p class="note">Intervals: stratified bootstrap. ΔAUC: paired bootstrap difference to the best '
             "baseline (same resamples for both models). Lift: buyers among the top-scored share divided by "
             "the overall rate.</p>")
    test = {r: d[d["split"] == "test"] for r, d in preds.items() if (d["split"] == "test").any()}
    if not test:
        return preds
    cv = {r: curves(d["label"].to_numpy(), d["probability"].to_numpy()) for r, d in test.items()}
    rel = {r: reliability_curve(d["label"].to_numpy(), d["probability"].to_numpy(), 10) for r, d in test.items()}
    base_rate = float(next(iter(test.values()))["label"].mean())
    charts = [
        page.chart("ROC curve", kind="line", diagonal=True, xmin=0, xmax=1, ymin=0, ymax=1, xfmt="pct", yfmt="pct",
                   series=[{"name": r, "points": c["roc"]} for r, c in cv.items()],
                   xlabel="false positive rate (non-buyers flagged)", ylabel="true positive rate (buyers found)"),
        page.chart("Precision-recall curve", kind="line", xmin=0, xmax=1, ymin=0, ymax=1, xfmt="pct", yfmt="pct",
                   hline=base_rate, series=[{"name": r, "points": c["pr"]} for r, c in cv.items()],
                   xlabel="recall (share of buyers found)", ylabel="precision (share of flagged who buy)"),
        page.chart("Calibration (reliability)", kind="line", diagonal=True, xmin=0, ymin=0, xfmt="pct", yfmt="pct",
                   series=[{"name": r, "dots": True, "points": [[a, b] for a, b in zip(c["mean_predicted"],
                                                                                     c["fraction_positive"])]}
                           for r, c in rel.items()],
                   xlabel="mean predicted probability (10 equal-size bins)", ylabel="observed share buying"),
        page.chart("Cumulative gain", kind="line", diagonal=True, xmin=0, xmax=1, ymin=0, ymax=1, xfmt="pct",
                   yfmt="pct", series=[{"name": r, "points": c["gain"]} for r, c in cv.items()],
                   xlabel="share of users targeted, highest scores first", ylabel="share of all buyers reached"),
        page.chart("Lift", kind="line", xmin=0, xmax=1, ymin=0, xfmt="pct", hline=1.0,
                   series=[{"name": r, "points": [pt for pt in c["lift"] if pt[0] >= 0.01]} for r, c in cv.items()],
                   xlabel="share of users targeted, highest scores first", ylabel="lift (× the overall buying rate)"),
    ]
    for r, d in test.items():
        h = histogram(d["probability"].to_numpy(), d["label"].to_numpy())
        charts.append(page.chart(f"Score distribution by class: {r}", kind="line", ymin=0, xmin=0, xfmt="pct",
                                 yfmt="pct", series=[{"name": k, "points": v} for k, v in h.items()],
                                 xlabel="predicted probability of buying", ylabel="share of the class"))
    page.add('<div class="grid">' + "".join(charts) + "</div>")
    return preds


def _reason_html(r: dict, scale: float) -> str:
    c = r["contribution"]
    width = max(2.0, 100 * abs(c) / scale) if scale > 0 else 2.0
    what = r.get("feature") or f"{r.get('event', 'event')} event"
    return (f'<div class="reason"><span>{c:+.3f}</span><span><span class="bar {"pos" if c > 0 else "neg"}" '
            f'style="display:inline-block;width:{width:.0f}px"></span></span>'
            f'<span>{_e(r["text"])} <code>{_e(what)}</code></span></div>')


def _explain_run(page: Page, ws: Workspace, run: str, built: Any, preds: Optional[pd.DataFrame],
                 n_explain: Optional[int] = None, seed: int = 0) -> list[str]:
    """Global importance (+ event type / time / faithfulness for sequence models) and example reasons."""
    from . import explain, pipeline

    meta, model = pipeline.load_run(run, ws)
    if built.info["build_id"] != meta["build_id"]:
        page.add(f'<p class="note">{_e(run)}: trained on another build; retrain it to see its explanations.</p>')
        return []
    test_idx = np.flatnonzero(built.mask("test"))
    if len(test_idx) == 0:
        return []
    rng = np.random.default_rng(seed)
    cap = n_explain or N_EXPLAIN_SAMPLE.get(meta["model"], 500)
    sample = np.sort(rng.choice(test_idx, size=min(cap, len(test_idx)), replace=False))
    # the highest- and lowest-scored test examples are always explained
    if preds is not None and (preds["split"] == "test").any():
        t = preds[preds["split"] == "test"].sort_values("probability")
        pos = pd.Series(np.arange(len(built.examples)), index=built.examples["example_id"].to_numpy())
        picks = pos.reindex(np.r_[t["example_id"].to_numpy()[-3:][::-1], t["example_id"].to_numpy()[:2]]).dropna()
        picks = picks.astype(int).to_numpy()
    else:
        picks = sample[:3]
    idx = np.unique(np.r_[sample, picks])
    X = pipeline.model_inputs(meta["model"], built, idx, ws, pipeline._model_vocab(model))
    attr = explain.attribute(meta, model, X)
    imp = explain.global_importance(attr).head(15)
    charts = [page.chart(f"What drives the scores: {run}", kind="bar", labelWidth=200,
                         bars=[{"label": n, "value": v} for n, v in zip(imp["name"], imp["mean_abs"])],
                         xlabel=f"mean |contribution| (log-odds), {len(idx):,} test examples")]
    if attr.events is not None:
        by_type = explain.attribution_by_event_type(attr)
        charts.append(page.chart(f"Attribution by event type: {run}", kind="bar", labelWidth=130,
                                 bars=[{"label": k, "value": v["mean_per_example"]} for k, v in by_type.items()],
                                 xlabel="mean summed attribution per user (log-odds)"))
        by_time = [b for b in explain.attribution_by_time(attr) if b["n_events"]]
        charts.append(page.chart(f"Attribution by time before the cutoff: {run}", kind="bar", labelWidth=130,
                                 bars=[{"label": b["bin"], "value": b["mean_per_event"]} for b in by_time],
                                 xlabel="mean attribution per event (log-odds)"))
        f = explain.faithfulness(model, X, attr, seed=seed)
        charts.append(page.chart(
            f"Faithfulness: removing the most-attributed events: {run}", kind="line", xmin=0, ymin=0,
            series=[{"name": "highest attribution removed", "points": f["top_points"], "dots": True},
                    {"name": "random events removed", "points": f["random_points"], "dots": True, "dash": True}],
            xlabel="events removed from each history", ylabel="mean drop of the score (log-odds)"))
    page.add(f"<h3>{_e(run)}</h3>" + '<div class="grid">' + "".join(charts) + "</div>")
    # reasons of the picked users
    where = {int(i): k for k, i in enumerate(idx)}
    rows = [where[int(i)] for i in picks]
    sub = explain.Attribution(attr.feature_names, attr.features[rows], attr.base[rows],
                              None if attr.events is None else attr.events[rows],
                              None if attr.tokens is None else {k: (v[rows] if isinstance(v, np.ndarray) and v.ndim == 2
                                                                    else v) for k, v in attr.tokens.items()})
    X_sub = {k: v[rows] for k, v in X.items()} if isinstance(X, dict) else X.iloc[rows]
    events = None
    if isinstance(X, dict):
        con = ws.connect()
        events = explain.sequence_events(con, built.examples.iloc[picks], X["mask"].shape[1])
    all_reasons = explain.reasons(sub, X_sub, top=5, events=events)
    p = np.asarray(model.predict_proba(X_sub))[:, 1]
    blocks = []
    for k, i in enumerate(picks):
        ex = built.examples.iloc[i]
        rs = all_reasons[k]
        scale = max([abs(r["contribution"]) for r in rs] + [1e-9])
        kind = "high score" if k < 3 else "low score"
        blocks.append(f'<div class="expl"><h4>{kind}: user <code>{_e(str(ex["user_id"])[:12])}</code> at '
                      f'{_e(str(ex["cutoff"])[:16])}, probability <span class="p">{p[k]:.1%}</span>, '
                      f'bought: {"yes" if ex["label"] else "no"}</h4>'
                      + "".join(_reason_html(r, scale) for r in rs) + "</div>")
    return blocks


def _privacy_section(page: Page, ws: Workspace, runs: list[str]) -> None:
    from .privacy import KEY_ENV

    page.section("privacy", "Privacy settings")
    manifest = ws.read_manifest()
    key = (f"from the environment variable <code>{KEY_ENV}</code>" if os.environ.get(KEY_ENV)
           else f"key file <code>{_e(ws.key_path)}</code>" + ("" if ws.key_path.exists() else " (missing)"))
    dp = []
    for r in runs:
        meta_path = ws.run_dir(r) / "run.json"
        params = json.loads(meta_path.read_text()).get("params", {}) if meta_path.exists() else {}
        used = {k: v for k, v in params.items() if k.startswith("dp") or k in ("noise_multiplier", "epsilon", "max_grad_norm")}
        if used:
            dp.append(f"{_e(r)}: " + ", ".join(f"{_e(k)}={_e(v)}" for k, v in used.items()))
    rows = [["pseudonymisation", "on: user and session ids are HMAC-SHA256 pseudonyms" if manifest.get("key_id")
             else "no events ingested"],
            ["key id (a hash of the key, not the key)", _e(manifest.get("key_id") or "–")],
            ["key location", key],
            ["differentially private training", "; ".join(dp) if dp else "not used"]]
    page.add(_table(["setting", "value"], rows))


# ---------------------------------------------------------------------------------------------
# the report
def available_runs(ws: Workspace) -> list[str]:
    """Runs of the workspace that have been evaluated (have metrics.json), by name."""
    if not ws.runs_dir.is_dir():
        return []
    return sorted(d.name for d in ws.runs_dir.iterdir() if (d / "metrics.json").exists())


def write_report(workspace: Workspace | str | Path | None = None, runs: Optional[list[str]] = None,
                 out: str | Path | None = None, explain: bool = True, n_explain: Optional[int] = None) -> Path:
    """Write the HTML report of ``runs`` (default: every evaluated run) and return its path.

    Parameters
    ----------
    workspace : the workspace (default ``$PURCHASE_INTENT_WORKSPACE`` or ``./pi-workspace``).
    runs : run names under ``runs/`` (or run directories); None = all with a metrics.json.
    out : destination file; default ``<workspace>/report.html``.
    explain : load each model to add global importance and example explanations.
    n_explain : test examples explained per run for the global view (default: N_EXPLAIN_SAMPLE).
    """
    from . import pipeline

    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    runs = list(runs) if runs else available_runs(ws)
    missing = [r for r in runs if not (ws.run_dir(r) / "metrics.json").exists()]
    if missing:
        raise FileNotFoundError(f"runs without metrics.json: {', '.join(missing)} (run `purchase-intent evaluate`)")
    page = Page("Purchase-intent report")
    _data_section(page, ws)
    info = _task_section(page, ws)
    preds = _comparison_section(page, ws, runs) if runs else {}
    if runs and explain and info is not None:
        page.section("explain", "Why these scores? Global importance and example users")
        page.add('<p class="note">Contributions are in log-odds: positive raises the probability of buying. '
                 "Logistic regression: coefficient × standardised value; LightGBM: TreeSHAP; Transformer: "
                 "integrated gradients over the event embeddings and the tabular inputs, summed per event. "
                 "Faithfulness: removing the events with the highest attribution should lower the score more "
                 "than removing as many random events.</p>")
        built = pipeline.load_built(ws)
        examples = {}
        for r in runs:
            if json.loads((ws.run_dir(r) / "metrics.json").read_text())["model"] not in ("logreg", "lightgbm",
                                                                                      "transformer"):
                continue
            try:
                examples[r] = _explain_run(page, ws, r, built, preds.get(r), n_explain)
            except Exception as e:  # one run that cannot be explained must not cost the whole report
                page.add(f'<p class="note">{_e(r)}: no explanations ({_e(type(e).__name__)}: {_e(e)}).</p>')
        page.add("<h3>Example users: the highest and lowest test scores</h3>")
        for r, blocks in examples.items():
            if blocks:
                page.add(f"<h4>{_e(r)}</h4>" + "".join(blocks))
    _privacy_section(page, ws, runs)
    generated = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M UTC")
    text = page.html(f"workspace {ws.root.resolve()} · runs: {', '.join(runs) or 'none'} · generated {generated}")
    path = Path(out) if out else ws.root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def cmd_report(a: argparse.Namespace) -> int:
    path = write_report(a.workspace, a.run or None, out=a.out, explain=not a.no_explain)
    print(f"report: {path.resolve()}")
    return 0


def add_report_parser(sub) -> argparse.ArgumentParser:
    """Register ``purchase-intent report`` on the CLI's subparsers."""
    p = sub.add_parser("report", help="one self-contained HTML report of the data, the models and their reasons")
    p.add_argument("--run", action="append", metavar="NAME",
                   help="run to include (repeatable; default: every evaluated run)")
    p.add_argument("--out", help="output file (default: <workspace>/report.html)")
    p.add_argument("--no-explain", action="store_true", help="skip importance and example explanations (faster)")
    p.set_defaults(func=cmd_report)
    return p
