"""``lvlm-fix demo``: what contradicts the scene is marked, the examples follow the documented rule, and the
closing effect line is the shipped effect table's, which is the table of the docs' testbed page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lvlm_fix.demo import EFFECTS, effect_line, find_examples, mark_against_scene

ROOT = Path(__file__).resolve().parents[1]
SCENE = ("bicycle", "frisbee", "chair", "dog")


@pytest.fixture(scope="module")
def testbed():
    import lvlm_fix

    return lvlm_fix.load(None)


def test_a_caption_naming_an_absent_object_is_marked():
    assert mark_against_scene("a dog , a frisbee and two knives .", SCENE) == "a dog , a frisbee and two *knives* ."
    assert mark_against_scene("a dog and a frisbee .", SCENE) == "a dog and a frisbee ."
    assert mark_against_scene("a car and a red traffic light .", ("car",)) == "a car and a red *traffic light* ."


def test_a_yes_no_answer_that_contradicts_the_scene_is_marked():
    absent, present = "Is there a kite in the image?", "Is there a dog in the image?"
    assert mark_against_scene("Yes", SCENE, absent) == "*Yes*"
    assert mark_against_scene("Yes, there is a kite.", SCENE, absent) == "*Yes*, there is a *kite*."
    assert mark_against_scene("No", SCENE, present) == "*No*"
    assert mark_against_scene("No", SCENE, absent) == "No"
    assert mark_against_scene("Yes", SCENE, present) == "Yes"
    # no single object asked about: nothing to contradict
    assert mark_against_scene("Yes", SCENE, "Is there a dog or a kite in the image?") == "Yes"


def _testbed_table() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "guides" / "testbed.md").read_text()
    section = text.split("## What the methods do on the testbed", 1)[1]
    return {m.group(1): [c.strip() for c in m.group(2).split("|")]
            for m in re.finditer(r"^\| `([\w:.=]+)` \|(.*)\|$", section, re.M)}


@pytest.mark.parametrize("bench,columns", [("pope", {"random": 0, "popular": 1, "adversarial": 2}),
                                           ("chair", {"val": 4})])
def test_the_shipped_effect_table_is_the_docs_testbed_table(bench, columns):
    """The demo's closing line reads effects_<bench>.json; the docs print the same run's numbers."""
    summary = json.loads((EFFECTS / f"effects_{bench}.json").read_text())
    metric = {"pope": "accuracy", "chair": "chair_s"}[bench]
    table = _testbed_table()
    assert summary["baseline"] == "none" and len(summary["methods"]) >= 2
    for method, result in summary["methods"].items():
        for split, col in columns.items():
            row = result["splits"][split]
            cells = table.get(method) or table[method.split(":")[0]]  # carve:suffix_in_answer=false is `carve`
            assert cells[col].startswith(f"{row[metric] * 100:.1f}"), (bench, method, split, cells[col])


def test_the_effect_line_states_both_values_their_cis_and_the_p_value():
    summary = json.loads((EFFECTS / "effects_pope.json").read_text())
    base = summary["methods"]["none"]["splits"]["adversarial"]["ci"]["accuracy"]
    row = summary["methods"]["mvp"]["splits"]["adversarial"]
    line = effect_line("mvp")
    assert f"{base['value'] * 100:.1f}% [{base['low'] * 100:.1f}, {base['high'] * 100:.1f}]" in line
    assert f"{row['ci']['accuracy']['value'] * 100:.1f}% [{row['ci']['accuracy']['low'] * 100:.1f}" in line
    p = row["vs_baseline"]["accuracy"]["p_value"]
    assert ("p < 0.001" if p < 0.001 else f"p {p:.3f}") in line and "0.000999" not in line
    assert f"{row['n']} questions" in line and "not evidence" in line
    assert "not in the shipped effect table" in effect_line("nonesuch")


def test_the_examples_are_the_first_samples_where_the_baseline_errs(testbed):
    """The rule, checked independently: every sample read before the last example that is not an example
    has a baseline answer that agrees with its scene."""
    from lvlm_fix.api import generate
    from lvlm_fix.demo import _load_objects
    from lvlm_fix.evals.bench import make_bench

    examples, read = find_examples(testbed, "vcd", n=2, scan=40)
    assert len(examples) == 2 and read <= 40
    b = make_bench("pope", split="adversarial")
    samples = b.load(limit=500, seed=0)[0][:read]
    _, objects = _load_objects()
    p = b.prompting("adversarial")
    texts = generate(testbed, [s.load_image() for s in samples], [p.template.format(question=s.question) for s in samples],
                     None, max_new_tokens=p.generation["max_new_tokens"]).texts
    wrong = [(Path(s.data.image_key).name, s.question) for s, t in zip(samples, texts)
             if mark_against_scene(t, objects[Path(s.data.image_key).name], s.question) != t]
    assert wrong == [(e.image, e.prompt) for e in examples]
    for e in examples:
        assert e.truth in ("yes", "no") and mark_against_scene(e.baseline, e.objects, e.prompt) != e.baseline


def test_the_readmes_demo_output_is_what_the_demo_prints(testbed):
    """The README shows `lvlm-fix demo`'s output (its set-up's first command): it must be the real one."""
    from lvlm_fix.demo import run_demo

    readme = (ROOT / "README.md").read_text()
    shown = readme.split("The first command ends with `lvlm-fix demo`, which prints:", 1)[1]
    shown = shown.split("```text\n", 1)[1].split("```", 1)[0].rstrip("\n").splitlines()
    assert shown == run_demo(testbed)
