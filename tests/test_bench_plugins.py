"""Benches follow the methods' registry convention: built-ins, the `lvlm_fix.benches` entry points and
$LVLM_FIX_PLUGINS all register through register_bench, and a plugin bench is a bench like the built-ins for
`lvlm-fix eval --bench`, `lvlm-fix list`, the runner, the CIs and `lvlm-fix report`. The plugin is the guide's
example, docs/examples/colour_bench.py, run end to end on the testbed in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lvlm_fix.evals.bench import BENCHES, Bench, Sample, register_bench

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "colour_bench.py"


def _run(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env})


def _cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return _run("-m", "lvlm_fix.cli", *argv, env=env)


@pytest.fixture
def entry_point_site(tmp_path):
    """A folder on PYTHONPATH holding the example as a module and an installed distribution's metadata that
    declares it in the `lvlm_fix.benches` group (what `pip install` of a plugin package leaves behind)."""
    site = tmp_path / "site"
    info = site / "colour_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "colour_bench.py").write_text(EXAMPLE.read_text())
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: colour-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lvlm_fix.benches]\ncolour = colour_bench:ColourBench\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_an_entry_point_bench_runs_through_eval_list_and_report(entry_point_site, tmp_path):
    listed = _cli("list", env=entry_point_site)
    assert listed.returncode == 0, listed.stderr
    assert "colour   colour questions: does the answer name the object's colour" in listed.stdout
    helped = _cli("eval", "--help", env=entry_point_site)
    assert "colour" in helped.stdout and "--colour-file" in helped.stdout  # a --bench choice, with its own flag
    out = tmp_path / "run"
    ran = _cli("eval", "--bench", "colour", "--methods", "none,vcd", "--limit", "3", "--batch-size", "2",
               "--n-boot", "20", "--out", str(out), env=entry_point_site)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bench"] == "colour" and list(summary["methods"]) == ["none", "vcd"]
    row = summary["methods"]["vcd"]["splits"]["colour"]
    assert row["n"] == 3 and 0 <= row["accuracy"] <= 1 and set(row["ci"]) == {"accuracy"}
    assert "p_value" in row["vs_baseline"]["accuracy"]  # paired against the baseline on the same samples
    assert (out / "results.md").read_text().startswith("# colour results")
    records = [json.loads(x) for x in (out / "vcd" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all({"id", "label", "answer", "correct"} <= set(r) for r in records)
    resumed = _cli("eval", "--bench", "colour", "--methods", "none,vcd", "--limit", "3", "--batch-size", "2",
                   "--n-boot", "20", "--out", str(out), env=entry_point_site)
    assert resumed.returncode == 0 and "colour none" not in resumed.stderr, resumed.stderr  # nothing left to do
    reported = _cli("report", str(out), env=entry_point_site)
    assert reported.returncode == 0 and "wrote" in reported.stdout, reported.stderr


def test_the_plugins_variable_brings_a_bench_to_the_registry_the_cli_and_its_flags(tmp_path):
    env = {"LVLM_FIX_PLUGINS": str(EXAMPLE)}
    names = _run("-c", "from lvlm_fix.evals.bench import BENCHES; print(BENCHES.names())", env=env)
    assert names.stdout.strip() == "['amber', 'chair', 'colour', 'pope']", names.stderr  # the bench registry alone
    out = tmp_path / "run"
    ran = _cli("eval", "--bench", "colour", "--methods", "none", "--limit", "2", "--n-boot", "10", "--out", str(out),
               env=env)
    assert ran.returncode == 0 and "| none |" in ran.stdout, ran.stderr
    missing = _cli("eval", "--bench", "colour", "--colour-file", str(tmp_path / "nope.jsonl"), "--out",
                   str(tmp_path / "other"), env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope.jsonl" in missing.stderr
    absent = _cli("eval", "--bench", "colour", "--out", str(tmp_path / "x"), env={})
    assert absent.returncode == 2 and "'colour'" in absent.stderr  # not a choice without the plugin


def test_the_python_api_finds_a_plugin_bench_before_any_method_is_looked_up(tmp_path):
    # evaluate() looks the bench up first, so the bench registry imports the file; the methods' loader comes after.
    code = ("import lvlm_fix\n"
            "s = lvlm_fix.evaluate(lvlm_fix.load(None), bench='colour', methods=['none', 'vhr'], limit=2, n_boot=10,"
            " progress=False)\n"
            "print(sorted(s['methods']), s['bench'])")
    ran = _run("-c", code, env={"LVLM_FIX_PLUGINS": str(EXAMPLE)})
    assert ran.returncode == 0 and ran.stdout.strip().splitlines()[-1] == "['none', 'vhr'] colour", ran.stderr


def test_a_broken_bench_entry_point_is_one_line_naming_it(tmp_path):
    site = tmp_path / "site"
    (site / "bad-0.1.dist-info").mkdir(parents=True)
    (site / "bad-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: bad\nVersion: 0.1\n")
    (site / "bad-0.1.dist-info" / "entry_points.txt").write_text("[lvlm_fix.benches]\nbroken = no_such_module:Bench\n")
    ran = _cli("list", env={"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])})
    assert ran.returncode == 2 and ran.stderr.count("\n") == 1, ran.stderr
    assert "cannot load bench plugin 'broken' (no_such_module:Bench)" in ran.stderr


class _Tiny(Bench):
    name = "tiny_plugin"
    description = "a bench made in a test"

    def load(self, limit, seed):
        return [Sample("1", "all", "Is there a cat?", None)], {"id": "tiny"}

    def record(self, sample, text):
        return {"id": sample.id}

    def aggregate(self, split, records):
        return {"n": len(records)}

    def table(self, summary):
        return []


def test_register_bench_checks_the_declaration():
    try:
        assert register_bench(_Tiny) is _Tiny and register_bench(_Tiny) is _Tiny  # twice: a no-op
        assert BENCHES.get("tiny_plugin") is _Tiny
        other = type("Other", (_Tiny,), {"__module__": "elsewhere"})
        with pytest.raises(ValueError, match="'tiny_plugin' is taken by .*_Tiny; rename elsewhere.Other"):
            register_bench(other)
    finally:
        BENCHES._items.pop("tiny_plugin", None)
    with pytest.raises(TypeError, match="does not declare 'description'"):
        register_bench(type("NoDescription", (_Tiny,), {"description": ""}))
    with pytest.raises(TypeError, match="name='Bad Name' must be lowercase"):
        register_bench(type("BadName", (_Tiny,), {"name": "Bad Name"}))
    with pytest.raises(TypeError, match="not a subclass of lvlm_fix.evals.bench.Bench"):
        register_bench(dict)
    no_record = type("NoRecord", (Bench,), {"name": "no_record", "description": "d", "load": _Tiny.load,
                                            "aggregate": _Tiny.aggregate, "table": _Tiny.table})
    with pytest.raises(TypeError, match="does not implement record"):
        register_bench(no_record)
    stats_only = type("StatsOnly", (_Tiny,), {"name": "stats_only", "stats": lambda self, split: {"n": np.mean}})
    with pytest.raises(TypeError, match="does not implement values"):  # the bootstrap needs the per-sample values
        register_bench(stats_only)
    assert "no_record" not in BENCHES and "stats_only" not in BENCHES


def test_the_guide_names_what_a_plugin_writes():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "adding-a-benchmark.md").read_text()
    for needle in ("register_bench", '[project.entry-points."lvlm_fix.benches"]', "LVLM_FIX_PLUGINS",
                   "lvlm-fix eval --bench colour", "tests/test_bench_plugins.py"):
        assert needle in guide, needle
    assert textwrap.dedent("""\
        @register_bench
        class ColourBench(Bench):
            name = "colour"
        """) in EXAMPLE.read_text()
