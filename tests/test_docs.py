"""The docs site (mkdocs.yml, docs/): built with ``mkdocs build --strict``, and every method's parameter
table generated from its config, the one description that ``lvlm-fix list METHOD`` prints too.

mkdocs is the optional ``docs`` extra: without it the build test is skipped, except under CI
(``CI=true``), whose set-up installs it, where its absence is a failure.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lvlm_fix.interventions import METHODS, MethodConfig, param

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _setup_block(text: str) -> str:
    """The first ```bash block after ``marker`` (the README's is what .ci/run executes)."""
    return re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip()


def test_param_docs_read_name_default_range_source_and_meaning_from_the_declaration():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Toy(MethodConfig):
        gain: float = param(2.0, "Factor on the heads (before o_proj). 1.0 changes nothing. Default 2.0 "
                            "(source: paper §4.4 and Table 6; runner range(2, 31)).", lo=0.0, lo_open=True)
        layers: tuple[int, ...] | None = param(None, "Layers, e.g. [1, 2]. Default None (source: lvlm-fix).")
        mode: str = param("auto", "How (see Alg. 1 of the paper). Default auto (source: release).")

    gain, layers, mode = Toy.param_docs()
    assert (gain.name, gain.type, gain.default, gain.range) == ("gain", "float", "2.0", "(0, inf)")
    assert gain.source == "paper §4.4 and Table 6; runner range(2, 31)"  # nested brackets kept, the enclosing one not
    assert gain.meaning == "Factor on the heads (before o_proj)."
    assert (layers.type, layers.default, layers.range, layers.meaning) == ("list of int", "None", "", "Layers, e.g. [1, 2].")
    assert mode.meaning == "How (see Alg. 1 of the paper)."  # "Alg. 1" ends no sentence


def test_every_method_parameter_states_its_source_and_meaning():
    """The docs' tables and `lvlm-fix list METHOD` print these: a parameter without them is a gap."""
    for name in METHODS.names():
        cfg = METHODS.get(name).config_cls
        docs = cfg.param_docs()
        assert [d.name for d in docs] == [f.name for f in dataclasses.fields(cfg)]
        for d in docs:
            assert d.source and d.meaning.endswith(".") and len(d.meaning) < len(d.help) + 2, (name, d)
    vhr = {d.name: d for d in METHODS.get("vhr").config_cls.param_docs()}
    assert (vhr["alpha"].default, vhr["alpha"].range) == ("2.0", "[0, inf)")
    assert vhr["outlier_filter"].default == "true"
    act = {d.name: d for d in METHODS.get("act").config_cls.param_docs()}
    assert act["heads_file"].source == ("scripts/calibration.sh, models/augment_index.py; "
                                        "models/llama_modelling_aug.py range(2, 31)")


def test_every_method_has_a_page_with_its_generated_parameter_table():
    nav = (ROOT / "mkdocs.yml").read_text()
    for name in METHODS.names():
        page = DOCS / "methods" / f"{name}.md"
        assert page.is_file(), f"method {name!r} has no docs page {page}"
        assert f"<!-- params: {name} -->" in page.read_text(), f"{page} lacks its generated parameter table"
        assert f"methods/{name}.md" in nav, f"{page} is not in mkdocs.yml's nav"


def test_the_docs_set_up_commands_are_the_readmes():
    """docs/index.md repeats the README's set-up block (the one CI runs): the two must not drift."""
    readme = (ROOT / "README.md").read_text()
    assert _setup_block(readme.split("<!-- setup -->", 1)[1]) == _setup_block((DOCS / "index.md").read_text())


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None and os.environ.get("CI", "").lower() not in ("1", "true"),
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_docs_site_builds_strictly(tmp_path):
    """Any warning (a broken link or anchor, a page missing from the nav, a bad marker) fails the build."""
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    page = html.unescape((site / "methods" / "vhr" / "index.html").read_text())
    for d in METHODS.get("vhr").config_cls.param_docs():  # the table is generated, not written by hand
        assert f"<code>{d.name}</code>" in page and d.source in page
    assert "<!-- params:" not in page
    assert (site / "index.html").is_file() and (site / "guides" / "evals" / "index.html").is_file()


def test_the_smoke_marker_is_registered_and_names_existing_files():
    """`python -m pytest -m smoke` (docs: Tests) selects SMOKE_FILES; a renamed file would drop out silently."""
    from conftest import SMOKE_FILES

    assert "smoke:" in (ROOT / "pyproject.toml").read_text()
    assert all((ROOT / "tests" / name).is_file() for name in SMOKE_FILES), SMOKE_FILES


def test_the_adding_a_benchmark_example_runs_as_a_bench(tmp_path):
    """docs/examples/colour_bench.py, shown whole in the guide, is a working bench: records, CIs, paired tests, table."""
    import importlib.util
    import json

    import lvlm_fix

    spec = importlib.util.spec_from_file_location("colour_bench", DOCS / "examples" / "colour_bench.py")
    module = sys.modules["colour_bench"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = lvlm_fix.evaluate(lvlm_fix.load(None), bench="colour", methods=["none", "vcd"], limit=6,
                                out_dir=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "vcd" / "samples.jsonl").read_text().splitlines()]
    row = summary["methods"]["vcd"]["splits"]["colour"]
    assert len(records) == 6 and row["accuracy"] == sum(r["correct"] for r in records) / 6
    assert "ci" in row and "p_value" in row["vs_baseline"]["accuracy"]
    assert "| vcd |" in (tmp_path / "results.md").read_text()
    assert '--8<-- "docs/examples/colour_bench.py"' in (DOCS / "guides" / "adding-a-benchmark.md").read_text()
