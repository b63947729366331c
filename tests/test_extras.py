"""Dependencies by need: the core installs torch, transformers and a few small packages; CHAIR / AMBER,
figures, CARVE and Hub datasets are extras (pyproject.toml) imported through ``lvlm_fix.extras.require``.

A missing optional package is simulated by setting it, and every submodule already imported, to None in
``sys.modules``: to importlib that is a package that is not there (``import`` raises ModuleNotFoundError,
``find_spec`` returns None)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_error

from lvlm_fix.errors import LvlmFixError
from lvlm_fix.extras import EXTRAS, MissingExtraError, check_installed, require

ROOT = Path(__file__).resolve().parents[1]
CORE = ("torch", "transformers", "accelerate", "numpy", "click", "pillow", "tqdm")


def _name(requirement: str) -> str:
    """``"scipy>=1.11; python_version < '3.11'"`` -> ``"scipy"``."""
    for stop in "<>=!~;[ ":
        requirement = requirement.split(stop, 1)[0]
    return requirement.strip().lower()


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _hide(monkeypatch, name: str) -> None:
    """Make ``name`` look uninstalled for the rest of the test (monkeypatch restores sys.modules)."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        monkeypatch.setitem(sys.modules, key, None)
    monkeypatch.setitem(sys.modules, name, None)
    _clear_caches()  # the loaders that hold an imported package import it again


def _clear_caches() -> None:
    from lvlm_fix.evals import chair, chair_opera, chair_original, inflection

    for cached in (chair_original.tokenizers, inflection.engine, chair_opera._perceptron,
                   chair_opera.perceptron_available, chair._extractor):
        cached.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_caches():
    yield
    _clear_caches()  # nothing cached while a package was hidden outlives the test


# -- pyproject.toml ------------------------------------------------------------------------------
def test_core_dependencies_are_the_core_and_extras_hold_the_rest():
    project = _pyproject()
    core = {_name(r) for r in project["dependencies"]}
    extras = {name: {_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    assert set(CORE) <= core
    optional = {dist for dist, _ in EXTRAS.values()}
    assert not core & (optional | {"matplotlib", "nltk", "inflect", "scipy", "datasets"})
    for module, (dist, extra) in EXTRAS.items():
        assert dist in extras[extra], f"{module}: {dist} is not in the {extra!r} extra of pyproject.toml"
    # `all` installs every extra of the table, by naming them
    (everything,) = project["optional-dependencies"]["all"]
    assert everything.startswith("lvlm-fix[") and everything.endswith("]")
    assert set(everything[len("lvlm-fix["):-1].split(",")) == {extra for _, extra in EXTRAS.values()}


def test_num2words_is_core_because_smolvlms_processor_needs_it():
    """lvlm-fix never imports num2words, but transformers' SmolVLM processor refuses to load without it: a core
    install must serve SmolVLM, so it is a core dependency (and not an extra whose absence lvlm-fix names)."""
    import importlib.util

    sources = [p for p in (ROOT / "lvlm_fix").rglob("*.py")]
    assert not [p for p in sources if "num2words" in p.read_text(encoding="utf-8")]
    spec = importlib.util.find_spec("transformers.models.smolvlm.processing_smolvlm")
    if spec is None:
        pytest.skip("this transformers has no SmolVLM processor")
    assert "num2words" in Path(spec.origin).read_text(encoding="utf-8")  # still needed by the processor
    assert "num2words" in {_name(r) for r in _pyproject()["dependencies"]}


def test_every_optional_import_goes_through_require():
    """No ``import nltk`` / ``from scipy import ...`` in the package: only require() names an optional package."""
    import ast

    bad = []
    for path in (ROOT / "lvlm_fix").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.partition(".")[0] in EXTRAS]
    assert not bad


# -- the helper ----------------------------------------------------------------------------------
def test_require_imports_or_names_the_extra_in_one_line(monkeypatch):
    assert require("scipy.ndimage", "CARVE").label is not None
    _hide(monkeypatch, "scipy")
    with pytest.raises(MissingExtraError) as e:
        require("scipy.ndimage", "CARVE")
    assert str(e.value) == 'CARVE needs scipy, which is not installed; install it with pip install "lvlm-fix[carve]"'
    assert isinstance(e.value, LvlmFixError) and isinstance(e.value, ImportError)
    with pytest.raises(MissingExtraError, match=r'^lvlm-fix heads needs scipy, .*"lvlm-fix\[carve\]"$'):
        check_installed("lvlm-fix heads", "scipy")
    check_installed("lvlm-fix report", "matplotlib")  # installed: no error
    with pytest.raises(KeyError, match="not an optional package"):
        require("pandas", "x")


def test_a_broken_install_is_named_with_its_cause(monkeypatch, tmp_path):
    """A package that is there but cannot import one of its own dependencies: the line says so."""
    (tmp_path / "inflect").mkdir()
    (tmp_path / "inflect" / "__init__.py").write_text("import lvlm_fix_no_such_dependency\n")
    for key in [k for k in sys.modules if k == "inflect" or k.startswith("inflect.")]:
        monkeypatch.delitem(sys.modules, key)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError) as e:
        require("inflect", "CHAIR")
    assert str(e.value) == ("CHAIR needs inflect, which cannot be imported (No module named "
                            "'lvlm_fix_no_such_dependency'); install it with pip install \"lvlm-fix[evals]\"")


# -- the CLI: one line, exit 2, before any model loads ---------------------------------------------
def _no_model(monkeypatch):
    import lvlm_fix.model

    def load(*a, **k):
        raise AssertionError("the model was loaded before the missing package was noticed")

    monkeypatch.setattr(lvlm_fix.model, "load", load)


@pytest.mark.parametrize(("missing", "argv", "line"), [
    ("nltk", ["eval", "--bench", "chair", "--limit", "2"],
     'CHAIR opera mode needs nltk, which is not installed; install it with pip install "lvlm-fix[evals]"'),
    ("nltk", ["eval", "--bench", "chair", "--chair-mode", "original", "--limit", "2"],
     "CHAIR's and AMBER's word tokenizer needs nltk, which is not installed; install it with pip install "
     '"lvlm-fix[evals]"'),
    ("inflect", ["eval", "--bench", "chair", "--chair-mode", "lvlm-fix", "--limit", "2"],
     "CHAIR's inflect singulariser (--chair-mode lvlm-fix, --chair-singularizer inflect) needs inflect, which is "
     'not installed; install it with pip install "lvlm-fix[evals]"'),
    ("nltk", ["score", "--bench", "amber", "--responses", "r.json"],
     'AMBER needs nltk, which is not installed; install it with pip install "lvlm-fix[evals]"'),
    ("datasets", ["eval", "--bench", "pope", "--hf-dataset", "lmms-lab/POPE", "--limit", "2"],
     '--hf-dataset needs datasets, which is not installed; install it with pip install "lvlm-fix[evals]"'),
    ("scipy", ["run", "--method", "carve"],
     'CARVE needs scipy, which is not installed; install it with pip install "lvlm-fix[carve]"'),
    ("scipy", ["eval", "--bench", "pope", "--methods", "none,carve", "--limit", "2"],
     'CARVE needs scipy, which is not installed; install it with pip install "lvlm-fix[carve]"'),
    ("nltk", ["demo"], 'lvlm-fix demo needs nltk, which is not installed; install it with pip install "lvlm-fix[evals]"'),
    ("matplotlib", ["heads", "--out", "heads-out"],
     'lvlm-fix heads needs matplotlib, which is not installed; install it with pip install "lvlm-fix[plots]"'),
])
def test_cli_refuses_in_one_line_before_the_model_loads(capsys, monkeypatch, tmp_path, missing, argv, line):
    monkeypatch.chdir(tmp_path)
    _no_model(monkeypatch)
    _hide(monkeypatch, missing)
    out = ["--out", str(tmp_path / "out")] if argv[0] in ("eval", "score") else []
    assert cli_error(capsys, *argv, *out) == f"error: {line}"


def test_report_without_matplotlib(capsys, monkeypatch, tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"bench": "pope", "methods": {}}))
    _hide(monkeypatch, "matplotlib")
    assert cli_error(capsys, "report", str(tmp_path)) == (
        'error: lvlm-fix report needs matplotlib, which is not installed; install it with pip install "lvlm-fix[plots]"')


def test_head_figures_without_matplotlib(monkeypatch, tmp_path):
    from lvlm_fix.diagnostics import write_outputs

    _hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError, match=r'^the head figures \(lvlm-fix heads\) needs matplotlib, .*\[plots\]"$'):
        write_outputs({"layers": [0]}, tmp_path)


# -- the core imports none of them -----------------------------------------------------------------
# tools/core_only.py (the check a user runs in a venv with `pip install lvlm-fix` alone), with every
# optional package made absent as far as importlib can tell.
CORE_SCRIPT = ("import runpy, sys\n"
               "for name in {blocked!r}:\n"
               "    sys.modules[name] = None\n"
               "runpy.run_path('tools/core_only.py', run_name='__main__')\n")


def test_core_paths_import_no_optional_package():
    """import lvlm_fix, load the testbed model, apply() around generate(), and a POPE eval: with every
    optional package (and num2words) uninstalled."""
    blocked = sorted({*EXTRAS, "num2words"})
    done = subprocess.run([sys.executable, "-c", CORE_SCRIPT.format(blocked=blocked)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for method in ("baseline", "vhr", "var", "vcd"):  # an answer of generate(), with each method applied around it
        assert any(line.startswith(f"{method}: '") and line != f"{method}: ''" for line in lines), done.stdout
    assert lines[-2].startswith("POPE accuracy: {'none': ") and "'vhr': " in lines[-2], done.stdout
    assert lines[-1] == "optional packages imported: []", done.stdout


def test_run_without_inflect_prints_its_answers_unmarked(capsys, monkeypatch, tmp_path):
    """`run` on the testbed marks answers against the scene with CHAIR's extractor (inflect); without it the
    answers are printed plain, with a note saying why, instead of failing after generating."""
    from lvlm_fix.cli.main import main

    monkeypatch.chdir(tmp_path)
    _hide(monkeypatch, "inflect")
    main(["run", "--method", "vhr", "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert ('note: marking what contradicts the scene needs inflect, which is not installed; install it with pip '
            'install "lvlm-fix[evals]"') in err
    assert out.strip() and "error:" not in err  # the answer, printed plain
