"""The reward library and scoring: values by hand, and errors that name the culprit."""

import math
import time
import warnings

import pytest
import torch

from grpo_lib.rewards import (RewardFunctionError, RewardWarning, answer_reward, combine_rewards, format_reward,
                              length_reward, parse_number, regex_reward, score_completions, xml_count_reward)


@pytest.mark.parametrize("text,value", [("1,234", 1234.0), ("$5", 5.0), ("7.0", 7.0), ("-3.", -3.0), (" 42 ", 42.0),
                                        ("$1,000.50", 1000.5), ("abc", None), ("", None), (None, None), ("1 2", 12.0)])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_format_reward_strict():
    completions = ["67 is larger. <answer>67</answer>", "<answer>67</answer>", "<answer></answer>",
                   "<answer>67</answer> and more", "the answer is 67", "<answer>sixty</answer>",
                   "<think>compare</think> <answer>-1,000</answer>"]
    assert format_reward(None, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_answer_reward_tolerant_and_none_without_gold():
    completions = ["<answer>1,000</answer>", "<answer>$1000.0</answer>", "<answer>999</answer>", "1000",
                   "<answer>5</answer>"]
    assert answer_reward(None, completions, answer=["1000"] * 4 + [None]) == [1.0, 1.0, 0.0, 0.0, None]
    assert answer_reward(None, ["x"]) == [None]


def test_xml_count_by_hand():
    t = "<think>a</think><answer>3</answer>xy"
    # four tags once each = 0.5, minus 0.001 * 2 trailing chars
    assert xml_count_reward(None, [t]) == [pytest.approx(0.498)]
    assert xml_count_reward(None, ["<answer>3</answer>"]) == [0.25]


def test_length_reward():
    f = length_reward(max_chars=10)
    assert f(None, ["a" * 5, "a" * 10, "a" * 15, "a" * 30]) == [1.0, 1.0, 0.5, 0.0]


def test_chat_message_completions():
    msgs = [[{"role": "assistant", "content": "<answer>4</answer>"}]]
    assert format_reward(None, msgs) == [1.0]


def test_combine_with_weights_and_none():
    per_func = torch.tensor([[1.0, 0.0], [1.0, float("nan")], [0.0, 1.0]])
    total = combine_rewards(per_func, torch.tensor([0.5, 2.0]))
    assert total.tolist() == [0.5, 0.5, 2.0]


def test_score_completions_matrix():
    comps = ["<answer>5</answer>", "<answer>6</answer>", "no", "<answer>5</answer> x"]
    s = score_completions(["format", "answer"], ["p"] * 4, comps, {"answer": ["5"] * 4}, weights=[1.0, 2.0])
    assert s.names == ["format", "answer"]
    assert s.per_func.tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    assert s.total.tolist() == [3.0, 1.0, 0.0, 2.0]


def test_regex_reward_pitfall_empty_answer():
    loose = regex_reward(r".*<answer>.*</answer>.*", name="loose")
    assert loose(None, ["<answer></answer>"]) == [1.0]  # satisfied by an empty answer
    assert format_reward(None, ["<answer></answer>"]) == [0.0]


# --- errors naming the culprit ---------------------------------------------------------------

def crashing(prompts, completions, **kw):
    return [1.0 / (len(c) - 5) for c in completions]  # ZeroDivisionError on a 5-char completion


def test_raising_function_names_function_and_sample():
    with pytest.raises(RewardFunctionError, match=r"'crashing' raised ZeroDivisionError.*sample 2.*'fives'"):
        score_completions([crashing], ["p"] * 3, ["longer one", "another", "fives"])


def test_wrong_length():
    def short(prompts, completions, **kw):
        return [1.0]

    with pytest.raises(RewardFunctionError, match=r"'short' returned 1 values for 3 completions"):
        score_completions([short], ["p"] * 3, ["a", "b", "c"])


def test_non_numeric():
    def texty(prompts, completions, **kw):
        return [1.0, "good"]

    with pytest.raises(RewardFunctionError, match=r"'texty' returned 'good' \(str\) for sample 1"):
        score_completions([texty], ["p"] * 2, ["a", "b"])


def test_not_a_list():
    with pytest.raises(RewardFunctionError, match="returned float"):
        score_completions([lambda p, c, **k: 1.0], ["p"], ["a"])


def test_inf_is_an_error_nan_is_none_with_warning():
    with pytest.raises(RewardFunctionError, match="returned inf for sample 0"):
        score_completions([lambda p, c, **k: [math.inf]], ["p"], ["a"])

    def nanny(prompts, completions, **kw):
        return [float("nan"), 1.0]

    with pytest.warns(RewardWarning, match="'nanny' returned NaN for sample 0"):
        s = score_completions([nanny, format_reward], ["p"] * 2, ["a", "b"])
    assert math.isnan(s.per_func[0, 0]) and s.total.tolist() == [0.0, 1.0]


def test_all_none_group_warns():
    def never(prompts, completions, **kw):
        return [None] * len(completions)

    with pytest.warns(RewardWarning, match="no reward function applies to any completion of group 1"):
        s = score_completions([never], ["a", "a", "b", "b"], ["1", "2", "3", "4"], num_generations=2)
    assert s.total.tolist() == [0.0] * 4


def test_slow_function_times_out():
    def slow(prompts, completions, **kw):
        time.sleep(5)
        return [0.0] * len(completions)

    start = time.monotonic()
    with pytest.raises(RewardFunctionError, match=r"'slow' took more than reward_timeout_s=0.2s"):
        score_completions([slow], ["p"], ["a"], timeout_s=0.2)
    assert time.monotonic() - start < 2


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown reward function 'shiny'"):
        score_completions(["shiny"], ["p"], ["a"])
