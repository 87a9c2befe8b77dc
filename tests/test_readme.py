"""The README's option and preset tables are the ones the code generates (scripts/readme_tables.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "scripts" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_holds_the_generated_option_and_preset_tables():
    readme = (ROOT / "README.md").read_text()
    module = tables()
    for name, table in (("option", module.option_table()), ("preset", module.preset_table())):
        assert table in readme, f"the README's {name} table is out of date: run python scripts/readme_tables.py"
