"""Install hints name a distribution that is ours, with extras that exist, and survive the CLI's rendering."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ragen.errors import DISTRIBUTION, install_hint

ROOT = Path(__file__).resolve().parents[1]
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
HINT = re.compile(r"pip install\s+[\"']?(?P<dist>[\w.-]+)\[(?P<extra>[\w,-]+)\]")
CHECKOUT = re.compile(r"pip install -e\s+[\"']?\.\[(?P<extra>[\w,-]+)\]")


def test_the_distribution_name_is_ours():
    assert PYPROJECT["project"]["name"] == DISTRIBUTION == "ragen-toolkit"
    assert PYPROJECT["project"]["scripts"]["ragen"] == "ragen.cli:main"  # the command keeps its name
    for dep in PYPROJECT["project"]["optional-dependencies"]["dev"]:
        if "[" in dep and not dep.startswith(("pytest", "ranx")):
            assert dep.startswith(DISTRIBUTION + "["), dep  # the dev extra refers to this distribution


def _sources():
    for folder in ("ragen", "pipelines", "benchmarks", "docs"):
        yield from (ROOT / folder).rglob("*.py")
        yield from (ROOT / folder).rglob("*.md")
    yield ROOT / "README.md"
    yield ROOT / "DEVELOPERS.md"


def test_every_install_hint_names_our_distribution_and_a_real_extra():
    seen = 0
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for m in HINT.finditer(text):
            seen += 1
            where = f"{path.relative_to(ROOT)}: {m.group(0)}"
            assert m.group("dist") == DISTRIBUTION, where
            assert set(m.group("extra").split(",")) <= EXTRAS, where
        for m in CHECKOUT.finditer(text):
            assert set(m.group("extra").split(",")) <= EXTRAS, f"{path.relative_to(ROOT)}: {m.group(0)}"
    assert seen >= 5  # the scan really looked at the hints


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_hints_render_with_their_extras_in_the_cli(extra):
    from ragen.cli._common import run_command

    app = typer.Typer()

    @app.command()
    def needs_extra() -> None:
        def body():
            raise ImportError(f"this needs the {extra!r} extra: {install_hint(extra)}")
        run_command(body)

    result = CliRunner().invoke(app, [])
    assert result.exit_code == 1
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert f'pip install "{DISTRIBUTION}[{extra}]"' in out  # rich did not eat "[extra]" as markup
    assert f'pip install -e ".[{extra}]"' in out
