"""Prompt sets: GSM8K gold answers, synthetic splits, and errors for bad datasets."""

import pytest

from grpo_lib.data import (DataError, check_dataset, filter_long_prompts, find_local_gsm8k, gsm8k_rows, load_task,
                           synthetic_split)
from grpo_lib.answers import extract_gsm8k_gold, parse_number


def test_every_gsm8k_test_gold_answer_parses():
    path = find_local_gsm8k("test")
    assert path is not None, "../shared/data/gsm8k/test.jsonl not found"
    rows = gsm8k_rows("test")
    assert len(rows) == 1319
    values = [parse_number(r["answer"]) for r in rows]
    assert all(v is not None for v in values)
    assert values[0] == 18.0  # Janet's ducks: 16 - 3 - 4 = 9 eggs * $2 = 18


def test_gsm8k_gold_extraction():
    assert extract_gsm8k_gold("so 3 + 4 = 7\n#### 1,207") == "1207"
    with pytest.raises(ValueError, match="no '####'"):
        extract_gsm8k_gold("no marker")


def test_synthetic_splits_are_disjoint_and_answers_right():
    train = load_task("larger", "train", n=500)
    test = load_task("larger", "test", n=64)
    assert len(test) == 64 and not {r["question"] for r in train} & {r["question"] for r in test}
    assert all(synthetic_split(r["question"]) == "test" for r in test)
    for r in test[:10]:
        a, b = [int(x) for x in r["question"].rstrip("?").split("larger, ")[1].split(" or ")]
        assert r["answer"] == str(max(a, b))
    assert load_task("successor", "test", n=5)[0]["answer"] == str(int(load_task("successor", "test", n=5)[0]
                                                                         ["question"].split()[-1][:-1]) + 1)


def test_bad_datasets():
    with pytest.raises(DataError, match="empty"):
        check_dataset([])
    with pytest.raises(DataError, match=r"row 1 has no 'prompt' column \(columns: \['question'\]\)"):
        check_dataset([{"prompt": "a"}, {"question": "b"}])
    with pytest.raises(DataError, match="row 0: 'prompt' must be a string or a list of chat messages.*int"):
        check_dataset([{"prompt": 3}])


def test_long_prompts_skipped_or_refused(tokenizer):
    rows = [{"prompt": "short"}, {"prompt": "word " * 300}]
    with pytest.warns(UserWarning, match="skipped 1 of 2 prompts longer than 50 tokens"):
        assert filter_long_prompts(rows, tokenizer, 50, "skip") == rows[:1]
    with pytest.raises(DataError, match="1 prompt\\(s\\) longer than 50 tokens \\(first: row 1\\)"):
        filter_long_prompts(rows, tokenizer, 50, "error")
