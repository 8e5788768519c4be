"""The reward library and scoring: values by hand, and errors that name the culprit."""

import math
import re
import time
import warnings

import pytest
import torch

from grpo_lib.answers import parse_number
from grpo_lib.rewards import (RewardFunctionError, RewardWarning, answer_reward, combine_rewards, consistency_reward,
                              format_reward, length_reward, regex_reward, reward_inputs, score_completions,
                              soft_overlong_punishment, xml_count_reward)


@pytest.mark.parametrize("text,value", [("1,234", 1234.0), ("$5", 5.0), ("7.0", 7.0), ("-3.", -3.0), (" 42 ", 42.0),
                                        ("$1,000.50", 1000.5), ("abc", None), ("", None), (None, None), ("1 2", 12.0)])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_format_reward_strict():
    completions = ["67 is larger. <answer>67</answer>", "<answer>67</answer>", "<answer></answer>",
                   "<answer>67</answer> and more", "the answer is 67", "<answer>sixty</answer>",
                   "<think>compare</think> <answer>-1,000</answer>"]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_answer_reward_tolerant_and_none_without_gold():
    completions = ["<answer>1,000</answer>", "<answer>$1000.0</answer>", "<answer>999</answer>", "1000",
                   "<answer>5</answer>"]
    assert answer_reward(completions, answer=["1000"] * 4 + [None]) == [1.0, 1.0, 0.0, 0.0, None]
    assert answer_reward(["x"]) == [None]


def test_xml_count_by_hand():
    t = "<think>a</think><answer>3</answer>xy"
    # four tags once each = 0.5, minus 0.001 * 2 trailing chars
    assert xml_count_reward([t]) == [pytest.approx(0.498)]
    assert xml_count_reward(["<answer>3</answer>"]) == [0.25]


def test_length_reward():
    f = length_reward(max_chars=10)
    assert f(["a" * 5, "a" * 10, "a" * 15, "a" * 30]) == [1.0, 1.0, 0.5, 0.0]


def test_chat_message_completions():
    msgs = [[{"role": "assistant", "content": "<answer>4</answer>"}]]
    assert format_reward(msgs) == [1.0]


def test_combine_with_weights_and_none():
    per_func = torch.tensor([[1.0, 0.0], [1.0, float("nan")], [0.0, 1.0]])
    total = combine_rewards(per_func, torch.tensor([0.5, 2.0]))
    assert total.tolist() == [0.5, 0.5, 2.0]
    # a completion to which no function applies is unscorable: NaN, not 0
    assert combine_rewards(torch.tensor([[float("nan"), float("nan")]]), torch.ones(2)).isnan().all()


def test_score_completions_matrix():
    comps = ["<answer>5</answer>", "<answer>6</answer>", "no", "<answer>5</answer> x"]
    s = score_completions(["format", "answer"], ["p"] * 4, comps, {"answer": ["5"] * 4}, weights=[1.0, 2.0])
    assert s.names == ["format", "answer"]
    assert s.per_func.tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    assert s.total.tolist() == [3.0, 1.0, 0.0, 2.0]


def test_regex_reward_pitfall_empty_answer():
    loose = regex_reward(r".*<answer>.*</answer>.*", name="loose")
    assert loose(["<answer></answer>"]) == [1.0]  # satisfied by an empty answer
    assert format_reward(["<answer></answer>"]) == [0.0]


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
        score_completions([lambda completions, **k: 1.0], ["p"], ["a"])


def test_inf_is_an_error_nan_is_none_with_warning():
    with pytest.raises(RewardFunctionError, match="returned inf for sample 0"):
        score_completions([lambda completions, **k: [math.inf]], ["p"], ["a"])

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
    assert s.total.isnan().all() and s.unscorable.all()


def test_slow_function_times_out():
    def slow(prompts, completions, **kw):
        time.sleep(5)
        return [0.0] * len(completions)

    start = time.monotonic()
    with pytest.raises(RewardFunctionError, match=r"'slow' took more than reward_timeout_s=0.2s"):
        score_completions([slow], ["p"], ["a"], timeout_s=0.2)
    assert time.monotonic() - start < 2


def test_timeout_is_not_swallowed_by_a_broad_except():
    """The reward timeout is not an Exception: a reward function's own `except Exception` (a common guard
    around a parser or a network call) cannot catch it and run on past the limit."""
    def guarded(prompts, completions, **kw):
        end = time.monotonic() + 3  # a bound so that a swallowed timeout fails the test instead of hanging it
        while time.monotonic() < end:
            try:
                time.sleep(0.05)
            except Exception:
                pass
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"'guarded' took more than reward_timeout_s=0.2s") as info:
        score_completions([guarded], ["p"], ["a"], timeout_s=0.2)
    assert float(re.search(r"started ([\d.]+)s ago", str(info.value))[1]) < 1.5  # stopped at the limit, not at 3 s


def test_a_reward_functions_own_timeout_error_is_not_called_slow():
    """A TimeoutError the function raises itself (a socket, a subprocess) is its failure, reported as one,
    not as the trainer's reward timeout."""
    def remote(prompts, completions, **kw):
        raise TimeoutError("grader service did not answer")

    with pytest.raises(RewardFunctionError, match="grader service did not answer") as info:
        score_completions([remote], ["p"], ["a"], timeout_s=5)
    assert "took more than" not in str(info.value)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown reward function 'shiny'"):
        score_completions(["shiny"], ["p"], ["a"])


# --- TRL's calling convention ------------------------------------------------------------------

CHAT_ROWS = [{"prompt": [{"role": "user", "content": "Which is larger, 3 or 7?"}], "answer": "7", "solution": "7"},
             {"prompt": [{"role": "user", "content": "Which is larger, 9 or 2?"}], "answer": "9", "solution": "9"}]


def test_reward_inputs_repeat_rows_and_shape_completions_as_trl():
    texts = ["<answer>7</answer>", "3", "<answer>9</answer>", "nine"]
    inputs = reward_inputs(CHAT_ROWS, texts, 2, [[1, 2], [3], [4, 5, 6], [7]])
    assert inputs["prompts"] == [CHAT_ROWS[0]["prompt"]] * 2 + [CHAT_ROWS[1]["prompt"]] * 2
    # conversational dataset: each completion is a one-message list, as TRL passes it
    assert inputs["completions"][1] == [{"role": "assistant", "content": "3"}]
    assert inputs["columns"] == {"answer": ["7", "7", "9", "9"], "solution": ["7", "7", "9", "9"]}
    assert inputs["completion_ids"][2] == [4, 5, 6]
    plain = reward_inputs([{"prompt": "q", "answer": "1"}], ["a", "b"], 2)
    assert plain["completions"] == ["a", "b"] and plain["prompts"] == ["q", "q"]
    with pytest.raises(ValueError, match="3 completions for 1 rows x G=2"):
        reward_inputs([{"prompt": "q"}], ["a", "b", "c"], 2)


def test_functions_written_for_trl_run_unchanged():
    """trl.rewards' own functions and a tutorial-style function, with values worked out by hand."""
    trl_rewards = pytest.importorskip("trl.rewards")
    texts = ["<think>7 > 3</think><answer>7</answer>", "<answer>3</answer>", "<think>no", "<think>a</think>b"]
    ids = [[1] * 4, [1] * 8, [1] * 10, [1] * 12]  # lengths 4, 8, 10, 12

    def tutorial(completions, **kwargs):
        return [len(c[0]["content"]) / 100 for c in completions]

    overlong = trl_rewards.get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)
    s = score_completions([trl_rewards.think_format_reward, overlong, tutorial, "answer"],
                          **reward_inputs(CHAT_ROWS, texts, 2, ids))
    assert s.names == ["think_format_reward", "soft_overlong_punishment_reward", "tutorial", "answer"]
    assert s.per_func[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]  # <think>...</think> first
    # DAPO eq. 13 with L_max = 10, L_cache = 4: 0 up to 6 tokens, (6 - L) / 4 up to 10, -1 beyond
    assert s.per_func[:, 1].tolist() == [0.0, -0.5, -1.0, -1.0]
    assert s.per_func[:, 2].tolist() == pytest.approx([len(t) / 100 for t in texts])
    assert s.per_func[:, 3].tolist() == [1.0, 0.0, 0.0, 0.0]  # group 1's gold is 9


def test_trl_accuracy_reward_reads_the_solution_column():
    trl_rewards = pytest.importorskip("trl.rewards")
    pytest.importorskip("math_verify")
    texts = ["The answer is $\\boxed{7}$", "$\\boxed{3}$", "$\\boxed{9}$", "$\\boxed{\\frac{18}{2}}$"]
    s = score_completions([trl_rewards.accuracy_reward], **reward_inputs(CHAT_ROWS, texts, 2))
    assert s.per_func[:, 0].tolist() == [1.0, 0.0, 1.0, 1.0]


def test_hooks_trainer_state_log_metric_log_extra():
    seen = {}

    def curious(completions, trainer_state, log_metric, log_extra, **kwargs):
        seen["step"] = trainer_state.global_step
        log_metric("curious/len", sum(len(c) for c in completions))
        log_extra("echo", [c.upper() for c in completions])
        return [0.0] * len(completions)

    from grpo_lib.rewards import default_trainer_state

    s = score_completions([curious], ["p", "p"], ["ab", "c"], trainer_state=default_trainer_state(7, 10))
    assert seen["step"] == 7
    assert s.logged_metrics == {"curious/len": 3.0} and s.logged_columns == {"echo": ["AB", "C"]}


def test_a_function_not_written_for_keywords_gets_told_why():
    def positional(prompts, completions):
        return [1.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"'positional' raised TypeError.*keyword arguments only.*"
                                                   r"columns \(answer\).*give it \*\*kwargs"):
        score_completions([positional], ["p"], ["a"], {"answer": ["1"]})


def test_consistency_reward():
    texts = ["40 is larger than 50. <answer>50</answer>",  # false claim: the answer is right by luck
             "50 is larger than 40. <answer>50</answer>",
             "50 is bigger than 40. <answer>40</answer>",  # true claim, answer disagrees
             "<answer>50</answer>",  # no claim: does not apply
             "50 is larger than 40."]  # no tag: does not apply
    assert consistency_reward(texts) == [0.0, 1.0, 0.0, None, None]
    assert answer_reward(texts[:1], answer=["50"]) == [1.0]  # what the answer reward alone pays


# --- DAPO's soft overlong punishment -------------------------------------------------------------


def test_soft_overlong_punishment_by_hand():
    f = soft_overlong_punishment(max_completion_len=20, soft_punish_cache=5)
    ids = [[1] * n for n in (0, 15, 16, 18, 20, 21, 30)]
    # free up to 20 - 5 = 15 tokens, then (15 - |y|) / 5 down to -1 at 20, -1 beyond
    assert f(completion_ids=ids) == pytest.approx([0.0, 0.0, -0.2, -0.6, -1.0, -1.0, -1.0])


@pytest.mark.parametrize("max_len,cache", [(20, 5), (20, 0), (20, 20), (7, 3)])
def test_soft_overlong_punishment_equals_trl(max_len, cache):
    trl_rewards = pytest.importorskip("trl.rewards")
    ids = [[7] * n for n in range(0, max_len + 4)]
    ours = soft_overlong_punishment(max_len, cache)
    theirs = trl_rewards.get_soft_overlong_punishment(max_len, cache)
    assert ours.__name__ == theirs.__name__  # the same column in both trainers' logs
    # called as both trainers call a reward function: keyword arguments only
    s = score_completions([ours, theirs], ["p"] * len(ids), ["x"] * len(ids), {"answer": ["1"] * len(ids)},
                          completion_ids=ids)
    assert s.per_func[:, 0].tolist() == s.per_func[:, 1].tolist()
    assert s.per_func[:, 0].tolist() == pytest.approx(theirs(completion_ids=ids))


def test_soft_overlong_punishment_errors():
    with pytest.raises(ValueError, match="soft_punish_cache=30 must be in"):
        soft_overlong_punishment(20, 30)
    with pytest.raises(RewardFunctionError, match="reads completion_ids"):
        score_completions([soft_overlong_punishment(20, 5)], ["p"], ["x"])
