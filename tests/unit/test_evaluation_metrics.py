"""The evaluation's scoring, on values worked out by hand: SQuAD's exact match and token F1,
rouge-score's ROUGE-L (default tokenizer, no stemming), preference accuracy and margin, the
base/tuned comparison, the forgetting ratio and the table `kubetune eval` prints."""

import math
from types import SimpleNamespace

import pytest

from kubetune.contract import ResultEvaluation
from kubetune_trainer import evaluation as ev


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The  Cat, sat!", "cat sat"),
        ("An apple a day", "apple day"),
        ("theatre", "theatre"),  # an article only as a whole word
        ("  Eight-to-six.  ", "eighttosix"),  # SQuAD drops punctuation, it does not split on it
        ("", ""),
    ],
)
def test_answers_are_normalized_as_squad_does(text, normalized):
    assert ev.normalize_answer(text) == normalized


def test_exact_match_compares_normalized_answers():
    assert ev.exact_match("The cat.", "cat") == 1.0
    assert ev.exact_match("CAT", "a cat!") == 1.0
    assert ev.exact_match("cat", "dog") == 0.0
    assert ev.exact_match("cat sat", "cat") == 0.0


def test_token_f1_counts_shared_words_as_a_bag():
    # [cat, sat, on, mat] against [cat, sat]: 2 shared, precision 1/2, recall 1 -> 2/3
    assert ev.token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    # {go: 2, stop: 1} against {go: 1, stop: 2}: 2 shared of 3 each -> 2/3
    assert ev.token_f1("go go stop", "go stop stop") == pytest.approx(2 / 3)
    assert ev.token_f1("Backups are kept for thirty days.", "backups are kept for thirty days") == 1.0
    assert ev.token_f1("nothing alike", "entirely different") == 0.0


def test_token_f1_of_empty_answers():
    assert ev.token_f1("", "") == 1.0
    assert ev.token_f1("the", "an") == 1.0  # both only articles: both empty after normalization
    assert ev.token_f1("", "cat") == 0.0
    assert ev.token_f1("cat", "") == 0.0


def test_rouge_tokens_follow_rouge_score_defaults():
    assert ev.rouge_tokens("Don't STOP-now, 3x!") == ["don", "t", "stop", "now", "3x"]
    assert ev.rouge_tokens("running runs") == ["running", "runs"]  # no stemming
    assert ev.rouge_tokens("café ünïcode") == ["caf", "n", "code"]  # only [a-z0-9] survive
    assert ev.rouge_tokens(" ,;: ") == []


def test_longest_common_subsequence():
    assert ev.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # BCBA, the textbook case
    assert ev.lcs_length(list("abc"), list("abc")) == 3
    assert ev.lcs_length(list("abc"), list("xyz")) == 0
    assert ev.lcs_length([], list("abc")) == 0


def test_rouge_l_is_the_lcs_f_measure():
    # LCS police, the, gunman = 3 of 4 on both sides -> 0.75
    assert ev.rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # Lin (2004)'s example: only "the gunman" in order -> 2/4 both ways -> 0.5
    assert ev.rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)
    # [cat, sat] against [the, cat, sat]: precision 1, recall 2/3 -> 0.8
    assert ev.rouge_l("cat sat", "the cat sat") == pytest.approx(0.8)
    assert ev.rouge_l("Hello, world!", "hello world") == 1.0
    assert ev.rouge_l("", "hello") == 0.0
    assert ev.rouge_l("", "") == 0.0  # rouge-score: no tokens, no score


def test_task_scores_are_means_over_the_examples():
    scores = ev.task_scores(["cat sat", "dog"], ["the cat sat", "a cat"])
    assert scores["exactMatch"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert scores["tokenF1"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert scores["rougeL"] == pytest.approx(0.4)  # (0.8 + 0) / 2
    assert ev.task_scores([], []) == {}


def test_preference_scores():
    scores = ev.preference_scores([-1.0, -2.0, -0.5], [-1.5, -1.0, -0.5])  # margins 0.5, -1, 0
    assert scores["preferenceAccuracy"] == pytest.approx(1 / 3)  # a tie is not a preference
    assert scores["rewardMargin"] == pytest.approx(-0.5 / 3)
    assert ev.preference_scores([], []) == {}


def test_comparison_and_forgetting_ratio():
    assert ev.comparison(0.2, 0.5) == {"base": 0.2, "tuned": 0.5, "delta": 0.3}
    assert ev.comparison(0.123456789, None) == {"base": 0.123457}
    assert ev.comparison(math.nan, 0.5) == {"tuned": 0.5}
    assert ev.forgetting_ratio(10.0, 12.0) == pytest.approx(1.2)
    assert ev.forgetting_ratio(10.0, None) is None
    assert ev.forgetting_ratio(0.0, 1.0) is None
    assert ev.forgetting_ratio(math.inf, 1.0) is None


def test_answers_end_at_the_first_stop_token():
    assert ev.answer_length([5, 6, 2, 9, 9], [2]) == 3  # the stop token counts: it was generated
    assert ev.answer_length([5, 6, 7], [2]) == 3
    assert ev.answer_length([3, 5], [2, 3]) == 1
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 2]))
    assert ev.stop_tokens(model, SimpleNamespace(eos_token_id=2)) == [2, 7]
    assert ev.stop_tokens(SimpleNamespace(), SimpleNamespace(eos_token_id=2)) == [2]


def test_notes_are_few_and_short():
    notes = ev.clipped_notes(["x" * 1000] + ["n"] * 20)
    assert len(notes) == ev.MAX_NOTES and len(notes[0]) == ev.NOTE_LIMIT and notes[0].endswith("...")


RESULT = {
    "examples": 5,
    "seconds": 3.6,
    "tokensGenerated": 388,
    "metrics": {
        "perplexity": {"base": 1514.47, "tuned": 1358.34, "delta": -156.13},
        "exactMatch": {"base": 0.0, "tuned": 0.2, "delta": 0.2},
        "rougeL": {"base": 0.0, "tuned": 0.141401, "delta": 0.141401},
    },
    "forgettingRatio": 0.896907,
    "notes": ["reference text cut to its first 16384 tokens"],
}


def test_the_table_lists_metrics_then_perplexity_ratio_and_cost():
    lines = ev.render_table(RESULT).splitlines()
    assert lines[0].split() == ["metric", "base", "tuned", "delta"]
    assert [line.split() for line in lines[1:4]] == [
        ["exactMatch", "0", "0.2", "0.2"],
        ["rougeL", "0", "0.1414", "0.1414"],
        ["perplexity", "1514", "1358", "-156.1"],
    ]
    assert len({len(line) for line in lines[:4]}) == 1  # aligned columns
    assert lines[4] == "forgetting ratio (perplexity tuned / base): 0.8969"
    assert lines[5] == "examples: 5  seconds: 3.6  tokens generated: 388"
    assert lines[6] == "note: reference text cut to its first 16384 tokens"


def test_a_result_without_the_tuned_side_prints_dashes():
    table = ev.render_table({"metrics": {"rougeL": ev.comparison(0.25, None)}, "notes": []})
    assert table.splitlines()[1].split() == ["rougeL", "0.25", "-", "-"]
    assert "forgetting ratio (perplexity tuned / base): -" in table


def test_the_result_has_the_shape_the_operator_reads():
    parsed = ResultEvaluation.model_validate(RESULT)
    assert parsed.to_status() == RESULT
