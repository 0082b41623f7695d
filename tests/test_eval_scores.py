"""Normalisation arithmetic (Yadav et al. 2024): held-in by the expert, held-out by the base."""

from __future__ import annotations

import math

import pytest

from evaluation import HELD_IN, HELD_OUT, TaskScore, format_table, normalise, ratio


def s(task, value, split=HELD_IN, metric="exact_match", digest="d"):
    return TaskScore(task=task, split=split, metric=metric, value=value, num_examples=10, data_digest=digest)


def test_ratio_directions_and_zero():
    assert ratio(0.6, 0.8, True) == (pytest.approx(0.75), "")
    assert ratio(4.0, 8.0, False)[0] == pytest.approx(2.0)  # perplexity halved: twice as good
    value, note = ratio(0.5, 0.0, True)
    assert value is None and "reference scores 0" in note
    value, note = ratio(0.0, 3.0, False)  # perplexity 0 for the merged model: no finite ratio
    assert value is None and "merged model scores 0" in note
    assert ratio(0.0, 0.5, True) == (0.0, "")  # a zero numerator is fine
    assert ratio(math.inf, 2.0, False)[0] == 0.0
    assert ratio(2.0, math.inf, False)[0] is None


def test_normalise_held_in_by_expert_held_out_by_base():
    merged = [s("add", 0.6), s("rev", 0.9), s("mc", 0.5, HELD_OUT, "multiple_choice"),
              s("ppl", 4.0, HELD_OUT, "perplexity")]
    experts = {"add": s("add", 0.8), "rev": s("rev", 0.9)}
    base = [s("add", 0.1), s("rev", 0.0), s("mc", 0.25, HELD_OUT, "multiple_choice"),
            s("ppl", 6.0, HELD_OUT, "perplexity")]
    out = normalise(merged, experts, base)
    got = {n.task: n.normalised for n in out.scores}
    assert got == pytest.approx({"add": 0.75, "rev": 1.0, "mc": 2.0, "ppl": 1.5})
    assert {n.task: n.reference_model for n in out.scores} == {"add": "expert", "rev": "expert",
                                                                 "mc": "base", "ppl": "base"}
    assert out.average(HELD_IN) == pytest.approx((0.75 + 1.0) / 2)
    assert out.average(HELD_OUT) == pytest.approx((2.0 + 1.5) / 2)
    assert out.splits[HELD_IN].absolute_means == {"exact_match": pytest.approx(0.75)}
    assert out.splits[HELD_OUT].absolute_means == {"multiple_choice": 0.5, "perplexity": 4.0}
    assert "held_in average normalised: 0.875 over 2/2 tasks" in format_table(out)


def test_zero_reference_is_left_out_of_the_average():
    merged = [s("a", 0.5), s("b", 0.4), s("c", 0.3, HELD_OUT)]
    experts = [s("a", 0.0), s("b", 0.8)]  # a list of expert scores works too
    base = [s("c", 0.0)]
    out = normalise(merged, experts, base)
    a = out.scores[0]
    assert a.normalised is None and "0" in a.note
    assert out.average(HELD_IN) == pytest.approx(0.5)  # only b
    assert out.splits[HELD_IN].num_undefined == 1
    assert out.average(HELD_OUT) is None and out.splits[HELD_OUT].num_tasks == 1
    assert "n/a" in format_table(out)


def test_missing_reference_is_an_error():
    with pytest.raises(ValueError, match="'add' has no expert score"):
        normalise([s("add", 0.5)], {}, [s("add", 0.1)])
    with pytest.raises(ValueError, match="'mc' has no base score"):
        normalise([s("mc", 0.5, HELD_OUT)], {}, [])


def test_reference_on_other_data_or_metric_is_an_error():
    with pytest.raises(ValueError, match="different data"):
        normalise([s("add", 0.5, digest="aaa")], {"add": s("add", 0.9, digest="bbb")}, [])
    with pytest.raises(ValueError, match="metric"):
        normalise([s("add", 0.5)], {"add": s("add", 0.9, metric="multiple_choice")}, [])
    with pytest.raises(ValueError, match="two scores"):
        normalise([s("add", 0.5)], [s("add", 0.9), s("add", 0.8)], [])


def test_taskscore_round_trips_through_dict():
    score = s("add", 0.5)
    assert TaskScore.from_dict(score.to_dict()) == score
