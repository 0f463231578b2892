"""The HTML report: contents, self-containment, the CLI, and a real render in headless Chromium."""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import tomllib
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from test_explain import make_workspace

from purchase_intent import cli, report, report_page

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    tiny = {"preset": "tiny", "max_epochs": 1, "sequence": {"max_seq_len": 32}}
    return make_workspace(tmp_path_factory.mktemp("report") / "ws", n_users=200,
                          models=("logreg", "lightgbm", "transformer"), params={"transformer": tiny})


@pytest.fixture(scope="module")
def report_path(ws) -> Path:
    return report.write_report(ws, n_explain=40)


def test_report_has_every_section_and_chart(report_path):
    text = report_path.read_text()
    for needle in ("Events per day by type", "Ingested files and rejected rows", "Positive rate per cutoff",
                   "ROC curve", "Precision-recall curve", "Calibration (reliability)", "Cumulative gain", "Lift",
                   "Score distribution by class: logreg", "Score distribution by class: lightgbm",
                   "What drives the scores: logreg", "What drives the scores: lightgbm", "high score: user",
                   "What drives the scores: transformer", "Attribution by event type: transformer",
                   "Attribution by time before the cutoff: transformer", "Faithfulness", "event ",
                   "low score: user", "Privacy settings", "HMAC-SHA256", "pseudonym.key", "buys within the next 7d",
                   "ROC-AUC [95% CI]"):
        assert needle in text, needle
    assert "no explanations" not in text
    n_charts = len(re.findall(r'<figure class="chart', text))
    assert f'data-charts-expected="{n_charts}"' in text and n_charts >= 10


def test_report_is_self_contained(report_path):
    text = report_path.read_text()
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=", text, flags=re.I)
    assert not re.search(r"(url\(|@import|fetch\(|XMLHttpRequest)", text)
    # the only URL is the SVG namespace name, which is an identifier, never fetched
    assert set(re.findall(r"https?://[^\s'\"<)]+", text)) <= {"http://www.w3.org/2000/svg"}


def test_page_inlines_its_assets_which_ship_with_the_package():
    page = report_page.Page("t")
    page.add('<div class="grid">' + page.chart("c", kind="bar", bars=[{"label": "a", "value": 1.0}]) + "</div>")
    text = page.html("sub")
    assets = files("purchase_intent") / "assets"
    for name in ("report.css", "report.js", "report_errors.js"):
        body = (assets / name).read_text(encoding="utf-8")
        assert body.strip() and body in text, name
    # every asset file is package data, so a non-editable install has it too
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["purchase_intent"]
    for f in assets.iterdir():
        assert any(fnmatch.fnmatch(f"assets/{f.name}", pat) for pat in patterns), f.name


def test_curves_match_the_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.3 * y + rng.random(500) * 0.7, 0, 1)
    c = report.curves(y, p)
    fpr, tpr = np.array(c["roc"]).T
    from purchase_intent.evaluate import roc_auc

    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, p), abs=0.01)
    gain = np.array(c["gain"])
    assert gain[0].tolist() == [0, 0] and gain[-1].tolist() == [1, 1]
    assert np.all(np.diff(gain[:, 1]) >= 0)


def test_report_command(ws, capsys, tmp_path):
    out = tmp_path / "r.html"
    args = ["--workspace", str(ws), "report", "--run", "logreg", "--out", str(out), "--no-explain"]
    assert cli.main(args) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    text = out.read_text()
    assert "runs: logreg" in text and "What drives the scores" not in text
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        report.write_report(ws, ["no-such-run"])


def _chromium() -> str | None:
    return os.environ.get("PURCHASE_INTENT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(report_path, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    url = report_path.resolve().as_uri()
    run = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
                          "--v=0", "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # the page logs nothing: any console message is an error
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert "data-errors" not in body, body
    expected = int(re.search(r'data-charts-expected="(\d+)"', body).group(1))
    rendered = re.search(r'data-charts-rendered="(\d+)"', body)
    assert rendered and int(rendered.group(1)) == expected, body
    figures = re.findall(r'<figure class="chart[^"]*" id="[^"]+"[^>]*>', dom)
    assert len(figures) == expected and all('data-rendered="1"' in f for f in figures), figures
    assert dom.count("<svg") >= expected

    shot = Path(os.environ.get("PURCHASE_INTENT_SCREENSHOT_DIR", tmp_path)) / "report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1280,2400",
                    "--virtual-time-budget=5000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_thresholds_withhold_counts_and_curves_of_fewer_than_k_users(ws, tmp_path):
    shown = report.write_report(ws, out=tmp_path / "k1.html", explain=False, min_users=1).read_text()
    assert "ROC curve" in shown and "&lt; " not in shown and "withheld" not in shown.split("Privacy settings")[0]
    # k above every cell: each count shows as "< k", rates are withheld and no curve is drawn
    text = report.write_report(ws, out=tmp_path / "k.html", explain=False, min_users=100_000).read_text()
    assert "&lt; 100000" in text and "withheld" in text
    assert "ROC curve" not in text and "their curves are left out" in text
    assert "cutoffs with fewer than 100000 buyers or non-buyers are left out" in text
    with pytest.raises(ValueError, match="--min-users"):
        report.write_report(ws, out=tmp_path / "bad.html", explain=False, min_users=0)
