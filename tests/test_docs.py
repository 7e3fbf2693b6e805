"""The README documents every setting and every parameter bound that config.py defines."""

from __future__ import annotations

from config import Params, Settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme():
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in README]
    assert not missing, f"settings missing from README.md: {missing}"


def test_every_param_and_its_bounds_are_in_the_readme():
    for name, field in Params.model_fields.items():
        row = next((line for line in README.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row, f"params field {name} has no row in README.md"
        for bound in field.metadata:
            value = getattr(bound, "ge", None)
            if value is not None and name != "seed":
                assert str(value) in row, (name, value, row)
            value = getattr(bound, "le", None)
            if value is not None and name not in ("seed", "decoding_t"):
                assert str(value) in row, (name, value, row)
