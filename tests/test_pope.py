"""POPE parsing and metrics, and the bootstrap statistics, on hand-computed cases."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lvlm_fix.errors import ConfigError, InputError
from lvlm_fix.evals import pope, stats
from lvlm_fix.evals.pope import Confusion, metrics, parse_answer


@pytest.mark.parametrize(
    ("text", "expected", "unparseable"),
    [
        ("Yes.", "yes", False),
        ("yes", "yes", False),
        ("No, there is not.", "no", False),
        ("There is no dog.", "no", False),
        ("I cannot tell", "yes", True),  # no yes/no word: canonical rule says yes, but flagged
        ("No", "no", False),
        ("No\n", "no", False),  # surrounding whitespace is stripped first
        ("NO", "yes", True),  # the canonical rule is case-sensitive: only No / no / not; counted as unparseable
        ("No!", "yes", True),  # "No!" is not the word "No" for the rule
        ("Not sure", "yes", True),
        ("Yes. There is no cat next to it.", "yes", False),  # only the first sentence counts
        ("Yes, there is a dog", "yes", False),
        ("The dog is not visible", "no", False),
        ("There isn't a dog.", "yes", True),  # "isn't" is not a no-word under the rule
    ],
)
def test_parse_answer_follows_canonical_rule(text: str, expected: str, unparseable: bool) -> None:
    assert parse_answer(text) == expected
    assert pope.is_unparseable(text) is unparseable


def test_unparseable_follows_the_parser() -> None:
    assert pope.is_unparseable("nothing noted, yesterday")  # no/yes only inside other words
    assert pope.is_unparseable("Well... NO")  # first sentence "Well": nothing the llava parser reads
    assert not pope.is_unparseable("NO", "opera") and pope.parse_answer("NO", "opera") == "no"
    assert pope.is_unparseable("Maybe.", "vcd") and not pope.is_unparseable("nothing", "vcd")


@pytest.mark.parametrize(("parser", "text", "label", "expected"), [
    ("opera", "There isn't a dog.", "yes", "no"),  # a word ending in n't
    ("opera", "Yes. There is no cat.", "yes", "no"),  # every sentence counts
    ("opera", "Yes, it is.", "no", "yes"),
    ("vcd", "Yes there is", "yes", "yes"),
    ("vcd", "I don't know", "no", "no"),  # 'no' inside 'know' counts for a no label
    ("vcd", "Nope", "yes", "no"),  # no 'yes' substring: a miss
    ("vcd", "Sure", "no", "yes"),  # no 'no' substring: a false yes
    ("lmms-exact", " Yes ", "yes", "yes"),
    ("lmms-exact", "Yes.", "yes", None),  # only exact words count
])
def test_parsers(parser: str, text: str, label: str, expected: str | None) -> None:
    assert pope.parse_answer(text, parser, label) == expected


def test_lmms_exact_scoring_hand_computed() -> None:
    report = pope.score(["Yes", "no", "maybe", "yes", "No", "yes"], ["yes", "no", "yes", "no", "no", "yes"],
                        "lmms-exact")
    assert report.confusion == Confusion(tp=2, fp=1, tn=2, fn=0, other_yes=1)
    m = report.metrics
    assert (m.accuracy, m.precision, m.recall, m.f1) == pytest.approx((4 / 6, 2 / 3, 1.0, 0.8))
    assert (m.yes_ratio, m.label_yes_ratio) == pytest.approx((3 / 6, 3 / 6))  # predictions vs labels
    assert report.n_unparseable == 1


def test_vcd_scoring_hand_computed() -> None:
    report = pope.score(["Yes there is", "I don't know", "Nope", "Sure"], ["yes", "no", "yes", "no"], "vcd")
    assert report.confusion == Confusion(tp=1, fp=1, tn=1, fn=1)
    assert report.metrics.yes_ratio == pytest.approx(0.5) and report.n_unparseable == 1  # "Sure" ("nope" has "no")


def test_presets() -> None:
    assert set(pope.PRESETS) == {"raw", "llava", "lmms-eval", "vcd", "opera"}
    for preset in pope.PRESETS.values():
        assert preset.parser in pope.PARSERS
        assert pope.build_prompt("Q?", preset.template).startswith("Q?")
    llava = pope.PRESETS["llava"]
    assert pope.build_prompt("Is there a dog?", llava.template) == (
        "Is there a dog?\nAnswer the question using a single word or phrase.")
    assert llava.system_prompt == pope.VICUNA_SYSTEM_PROMPT and llava.generation["max_new_tokens"] == 128
    assert pope.PRESETS["raw"].system_prompt is None and pope.PRESETS["raw"].parser == "llava"
    assert pope.PRESETS["lmms-eval"].generation["stop"] == ["\n\n"] and pope.PRESETS["lmms-eval"].parser == "lmms-exact"
    vcd = pope.PRESETS["vcd"]
    assert vcd.generation["do_sample"] and vcd.generation["temperature"] == 1.0 and vcd.seed == 55
    assert pope.PRESETS["opera"].generation == {"max_new_tokens": 10, "do_sample": False, "num_beams": 5}


@pytest.mark.parametrize(("template", "needle"), [
    ("{question} {oops}", "unknown field {oops}"),
    ("{question} {0}", "unknown field {0}"),
    ("{question", "not a valid template"),
    ("Answer yes or no.", "no '{question}' field"),
])
def test_bad_templates_name_the_problem(template: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        pope.check_template(template)


def test_confusion_from_pairs_counts_each_cell() -> None:
    pairs = (
        [("yes", "yes")] * 3 + [("yes", "no")] * 1 + [("no", "no")] * 4 + [("no", "yes")] * 2
    )
    assert Confusion.from_pairs(pairs) == Confusion(tp=3, fp=1, tn=4, fn=2)


def test_metrics_hand_computed() -> None:
    m = metrics(Confusion(tp=3, fp=1, tn=4, fn=2))
    assert m.n == 10
    assert m.accuracy == pytest.approx(0.7)
    assert m.precision == pytest.approx(0.75)
    assert m.recall == pytest.approx(0.6)
    assert m.f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)  # = 2/3
    assert m.yes_ratio == pytest.approx(0.4)  # predicted yes (tp + fp), not label yes (0.5)


def test_metrics_second_matrix() -> None:
    m = metrics(Confusion(tp=40, fp=10, tn=35, fn=15))
    assert (m.accuracy, m.precision, m.recall) == pytest.approx((0.75, 0.8, 40 / 55))
    assert m.f1 == pytest.approx(2 * 40 / (2 * 40 + 10 + 15))
    assert m.yes_ratio == pytest.approx(0.5)


def test_metrics_zero_denominators_give_zero() -> None:
    all_no = metrics(Confusion(tp=0, fp=0, tn=5, fn=5))
    assert (all_no.accuracy, all_no.precision, all_no.recall, all_no.f1, all_no.yes_ratio) == (
        0.5, 0.0, 0.0, 0.0, 0.0
    )
    empty = metrics(Confusion())
    assert empty.as_dict() == {
        "accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0, "n": 0, "label_yes_ratio": 0.0
    }


def test_confusion_sum_pools_splits() -> None:
    assert Confusion(1, 2, 3, 4) + Confusion(10, 20, 30, 40) == Confusion(11, 22, 33, 44)


def test_score_parses_and_counts_unparseable() -> None:
    answers = ["Yes.", "No, there is not.", "I cannot tell", "There is no dog."]
    labels = ["yes", "no", "no", "YES"]
    report = pope.score(answers, labels)
    assert report.predictions == ("yes", "no", "yes", "no")
    assert report.confusion == Confusion(tp=1, fp=1, tn=1, fn=1)
    assert report.n_unparseable == 1
    assert report.as_dict()["n_unparseable"] == 1
    assert report.metrics.accuracy == pytest.approx(0.5)


def test_score_rejects_mismatched_lengths_and_bad_labels() -> None:
    with pytest.raises(InputError, match="2 answers for 1 labels"):
        pope.score(["yes", "no"], ["yes"])
    with pytest.raises(InputError, match="'maybe'"):
        pope.score(["yes"], ["maybe"])


def test_average_over_splits_is_unweighted_mean() -> None:
    per_split = {
        "random": metrics(Confusion(tp=3, fp=1, tn=4, fn=2)),  # f1 2/3, acc 0.7
        "adversarial": metrics(Confusion(tp=0, fp=0, tn=5, fn=5)),  # f1 0, acc 0.5
    }
    avg = pope.average_over_splits(per_split)
    assert avg["f1"] == pytest.approx(1 / 3)
    assert avg["accuracy"] == pytest.approx(0.6)
    assert avg["n"] == 20


def test_prompt_templates() -> None:
    q = "Is there a dog in the image?"
    assert pope.build_prompt(q) == q  # the default is the raw question
    assert pope.build_prompt(q, pope.LLAVA_QUESTION_TEMPLATE) == (
        q + "\nAnswer the question using a single word or phrase."
    )
    with pytest.raises(ConfigError, match="no '\\{question\\}' field"):
        pope.build_prompt(q, "Answer yes or no.")
    assert pope.SPLITS == ("random", "popular", "adversarial")


def test_stats_functions_match_metrics_and_broadcast() -> None:
    preds = ["yes"] * 3 + ["yes"] + ["no"] * 4 + ["no"] * 2
    labels = ["yes"] * 3 + ["no"] + ["no"] * 4 + ["yes"] * 2
    values = pope.per_sample_array(preds, labels)
    assert values.shape == (10, 3)
    expected = metrics(Confusion(tp=3, fp=1, tn=4, fn=2)).as_dict()
    for name, fn in pope.STATS.items():
        assert float(fn(values)) == pytest.approx(expected[name])
        batch = fn(np.stack([values, values[::-1]]))  # (k, n, 3) -> (k,)
        assert batch.shape == (2,) and batch == pytest.approx([expected[name]] * 2)


# ---- bootstrap statistics -------------------------------------------------------------------


def _as_pope(pred_label: np.ndarray) -> np.ndarray:
    """[pred_yes, label_yes] rows -> the [pred_yes, pred_no, label_yes] rows of pope.per_sample_array."""
    return np.stack([pred_label[:, 0], 1 - pred_label[:, 0], pred_label[:, 1]], axis=1)



def test_bootstrap_ci_of_constant_is_degenerate() -> None:
    ci = stats.bootstrap_ci(np.full(50, 0.3), np.mean, n_boot=200)
    assert (ci.estimate, ci.low, ci.high) == pytest.approx((0.3, 0.3, 0.3))
    assert (ci.n, ci.n_boot, ci.seed, ci.alpha) == (50, 200, 0, 0.05)


def test_bootstrap_ci_follows_documented_recipe() -> None:
    values = np.array([0.0, 1.0, 2.0, 5.0])
    ci = stats.bootstrap_ci(values, np.mean, n_boot=7, seed=3, alpha=0.2)
    idx = np.random.default_rng(3).integers(0, 4, size=(7, 4))
    low, high = np.quantile(values[idx].mean(axis=1), [0.1, 0.9])
    assert (ci.estimate, ci.low, ci.high) == pytest.approx((2.0, low, high))


def test_bootstrap_ci_width_is_plausible_for_accuracy() -> None:
    # 400 answers, half right: the normal approximation gives 0.5 +- 0.049.
    values = np.array([[1, 0, 1], [1, 0, 0]] * 200)
    ci = stats.bootstrap_ci(values, pope.STATS["accuracy"], n_boot=2000, seed=1)
    assert ci.estimate == 0.5
    assert ci.low < 0.5 < ci.high
    assert 0.07 < ci.high - ci.low < 0.13


def test_batched_and_index_forms_agree_with_per_replicate() -> None:
    rng = np.random.default_rng(0)
    values = _as_pope(rng.integers(0, 2, size=(60, 2)))
    f1 = pope.STATS["f1"]
    one = stats.bootstrap_ci(values, f1, n_boot=300, seed=5)
    many = stats.bootstrap_ci(values, f1, n_boot=300, seed=5, batched=True)
    by_index = stats.bootstrap_ci(np.arange(60), lambda idx: f1(values[idx]), n_boot=300, seed=5)
    assert one == many == by_index


def test_paired_bootstrap_identical_systems_p_is_one() -> None:
    values = _as_pope(np.array([[1, 1], [0, 1], [1, 0], [0, 0]] * 10))
    result = stats.paired_bootstrap(values, values, pope.STATS["f1"], n_boot=100)
    assert result.diff == 0.0 and result.p_value == 1.0


def test_paired_bootstrap_clear_difference_hits_floor() -> None:
    a = np.ones(30)  # always right
    b = np.zeros(30)  # always wrong: every replicate difference equals the observed 1.0
    assert stats.paired_bootstrap_p(a, b, np.mean, n_boot=99, seed=0) == pytest.approx(1 / 100)


def test_paired_bootstrap_one_sample_difference_is_not_significant() -> None:
    # Systems differ on 1 of 100 samples; |d* - d| < |d| only when that sample is drawn
    # exactly once, which has probability ~0.37, so p is ~0.63.
    a = np.zeros(100)
    a[0] = 1
    b = np.zeros(100)
    result = stats.paired_bootstrap(a, b, np.mean, n_boot=2000, seed=0)
    assert result.diff == pytest.approx(0.01)
    assert 0.55 < result.p_value < 0.72
    assert result.low <= 0.0 < result.high


def test_paired_bootstrap_batched_matches() -> None:
    rng = np.random.default_rng(1)
    a, b = _as_pope(rng.integers(0, 2, (80, 2))), _as_pope(rng.integers(0, 2, (80, 2)))
    acc = pope.STATS["accuracy"]
    assert stats.paired_bootstrap(a, b, acc, n_boot=250, seed=2) == stats.paired_bootstrap(
        a, b, acc, n_boot=250, seed=2, batched=True
    )


def test_stats_reject_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="same samples"):
        stats.paired_bootstrap_p(np.ones(3), np.ones(4), np.mean)
    with pytest.raises(ConfigError, match="n_boot=0"):
        stats.bootstrap_ci(np.ones(3), np.mean, n_boot=0)
    with pytest.raises(ConfigError, match="alpha=1.0"):
        stats.bootstrap_ci(np.ones(3), np.mean, alpha=1.0)
    with pytest.raises(ConfigError, match="no samples"):
        stats.bootstrap_ci([], np.mean)
    with pytest.raises(ConfigError, match="one value per replicate"):
        stats.bootstrap_ci(np.ones(3), np.mean, n_boot=4, batched=True)  # np.mean reduces all axes
