"""The docs say what config.py defines: every setting with its default in
docs/configuration.md, every parameter with its bounds in the README; the README stays
short and starts with the two commands; every relative link leads to a file (and heading)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bentosvd.config import VARIANTS, Params, Settings
from tests.conftest import ROOT

README_PATH = ROOT / "README.md"
README = README_PATH.read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
MARKDOWN = [README_PATH, *sorted((ROOT / "docs").glob("*.md"))]
NONE = {"—", "-", "none", "null"}


def section(text: str, heading: str) -> str:
    """The text under `heading` (a `## ` line) up to the next heading of that level."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def settings_rows() -> dict[str, list[str]]:
    """docs/configuration.md's settings table: {NAME: [default cell, meaning cell]}."""
    rows = {}
    for line in section(CONFIGURATION, "Settings").splitlines():
        match = re.match(r"\| `([A-Z0-9_]+)` \|(.*)\|\s*$", line)
        if match:
            cells = [cell.strip() for cell in match.group(2).split(" | ")]
            assert match.group(1) not in rows, f"{match.group(1)} has two rows"
            rows[match.group(1)] = cells
    return rows


def documented_default(cell: str) -> str:
    """The value a default cell starts with: its first `code` span, else its first word
    (a note in parentheses may follow, e.g. "`svd` (`make serve`: `demo`)")."""
    code = re.match(r"`([^`]*)`", cell)
    return code.group(1) if code else re.split(r"[\s(]", cell, maxsplit=1)[0]


def test_every_setting_has_a_row_in_configuration_md():
    rows = settings_rows()
    names = {name.upper() for name in Settings.model_fields}
    assert not names - rows.keys(), f"settings without a row: {sorted(names - rows.keys())}"
    assert not rows.keys() - names, f"rows naming no setting: {sorted(rows.keys() - names)}"


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_each_settings_default_is_the_documented_one(name):
    default = Settings.model_fields[name].default
    cell = settings_rows()[name.upper()][0]
    shown = documented_default(cell)
    if default is None:
        assert shown.lower() in NONE, (name, cell)
    elif isinstance(default, bool):
        assert shown.lower() == str(default).lower(), (name, cell)
    elif isinstance(default, (int, float)):
        assert float(shown) == default, (name, cell)
    elif isinstance(default, str):
        assert shown == default, (name, cell)
    elif isinstance(default, (list, dict)):
        assert json.loads(shown) == default, (name, cell)
    else:
        raise AssertionError(f"{name}: no rule for a default of type {type(default).__name__}")


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


def test_readme_is_short():
    lines = README.count("\n") + (not README.endswith("\n"))
    assert lines <= 250, f"README.md has {lines} lines; keep it at most 250 (details go in docs/)"


def test_readme_starts_with_the_two_commands():
    """After the title (and at most one paragraph), the first block is `make serve` then
    `make test`."""
    lines = README.splitlines()
    assert lines[0].startswith("# "), lines[0]
    rest = lines[1:]
    start = next(i for i, line in enumerate(rest) if line.strip())
    if not rest[start].startswith("```"):  # one paragraph, then the block
        end = next(i for i in range(start, len(rest)) if not rest[i].strip())
        start = next(i for i in range(end, len(rest)) if rest[i].strip())
    assert rest[start].startswith("```"), f"expected the commands' block, got {rest[start]!r}"
    close = next(i for i in range(start + 1, len(rest)) if rest[i].startswith("```"))
    commands = [line.split("#")[0].strip() for line in rest[start + 1:close] if line.strip()]
    assert commands[:2] == ["make serve", "make test"], commands


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def outside_code(path: Path) -> str:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def relative_links(path: Path) -> list[str]:
    """Targets of the markdown links in `path` outside code, less web and mail links."""
    return [target for target in LINK.findall(outside_code(path))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives `path`'s headings: lower case, punctuation dropped, spaces
    as hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files(path):
    broken = []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        linked = path.parent / file if file else path
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to missing files or headings: {broken}"


def test_the_link_check_sees_links():
    links = relative_links(README_PATH)
    assert "docs/api.md" in links and "docs/configuration.md#importing-weights" in links, links
    assert "post-generate" in anchors(ROOT / "docs" / "api.md")


@pytest.mark.parametrize("field", ["num_inference_steps", "min_guidance_scale", "max_guidance_scale"])
def test_the_readme_shows_each_variants_own_default(field):
    row = next(line for line in README.splitlines() if line.startswith(f"| `{field}` |"))
    default_cell = row.split("|")[2]
    for name in ("svd", "svd_xt"):
        assert f"{getattr(VARIANTS[name], field)} ({name})" in default_cell, (name, row)
