"""docs/config.md lists every key of the schema (regenerate with scripts/config_reference.py)."""

import importlib.util

from conftest import ROOT


def test_config_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "docs" / "config.md").read_text() == mod.render(), "run: python scripts/config_reference.py"
