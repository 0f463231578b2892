"""The feature reference in docs/ matches the code."""
import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_features_md_is_up_to_date():
    spec = importlib.util.spec_from_file_location("make_features_md", DOCS / "make_features_md.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (DOCS / "FEATURES.md").read_text() == mod.render(), "run: python docs/make_features_md.py"
