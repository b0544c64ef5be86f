"""qtrain rejection-sample: problem sets, the evaluation splits refused, solution cleaning, the SFT records."""

import json

import pytest

from qtrain import cli
from qtrain.selftrain import (SampleOptions, SelfTrainError, clean_solution, load_problems, normal_form,
                              run_rejection_sampling)
from test_eval import mbpp_path

PROBLEMS = [
    {"task_id": "add", "prompt": "Write a function add(a, b) that returns the sum.",
     "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], "reference": "def add(a, b):\n    return a + b\n"},
    {"task_id": "neg", "prompt": "Write a function neg(x) that returns -x.", "tests": ["assert neg(2) == -2"],
     "reference": "def neg(x):\n    return x\n"},  # a wrong reference: it must not be kept
]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_clean_solution_drops_demos_and_keeps_the_function():
    code = ('import math\n\ndef area(r):\n    """Area."""\n    return math.pi * r * r\n\nprint(area(2))\n'
            'assert area(1) > 3\n\nif __name__ == "__main__":\n    print(area(3))\n')
    assert clean_solution(code) == 'import math\n\ndef area(r):\n    """Area."""\n    return math.pi * r * r'
    assert clean_solution("def f(:\n") == "def f(:"  # unparsable: unchanged, the sandbox will fail it
    assert normal_form("def f(x):  # c\n    return x") == normal_form("def f(x):\n\n    return x\n")


def test_user_problem_files_are_checked(tmp_path):
    assert [p.task_id for p in load_problems(write(tmp_path / "p.jsonl", PROBLEMS))] == ["add", "neg"]
    for bad, message in [({"task_id": "a", "prompt": "", "tests": ["assert 1"]}, "non-empty string 'prompt'"),
                         ({"task_id": "a", "prompt": "x", "tests": []}, "non-empty list"),
                         ({"task_id": "a", "prompt": "x", "tests": ["assert 1"], "setup": 3}, "must be strings"),
                         ({"task_id": "HumanEval/3", "prompt": "x", "tests": ["assert 1"]}, "evaluation set"),
                         ({"task_id": "MBPP/11", "prompt": "x", "tests": ["assert 1"]}, "evaluation set")]:
        with pytest.raises(SelfTrainError, match=message):
            load_problems(write(tmp_path / "bad.jsonl", [bad]))
    with pytest.raises(SelfTrainError, match="temperature"):
        SampleOptions(problems="p", output="o", temperature=0)
    with pytest.raises(SelfTrainError, match="--samples-per-problem"):
        SampleOptions(problems="p", output="o", samples_per_problem=0)


@pytest.mark.skipif(mbpp_path() is None, reason="mbpp.jsonl not found (set QTRAIN_MBPP)")
def test_mbpp_uses_only_the_train_and_validation_splits(tmp_path):
    problems = load_problems(str(mbpp_path()))
    ids = [int(p.task_id.split("/")[1]) for p in problems]
    assert len(ids) == 464 and min(ids) == 511 and max(ids) == 974
    test_only = [json.loads(x) for x in mbpp_path().read_text().splitlines() if 11 <= json.loads(x)["task_id"] <= 510]
    with pytest.raises(SelfTrainError, match="511-974"):
        load_problems(write(tmp_path / "test-split.jsonl", test_only[:5]))


def test_rejection_sampling_end_to_end_with_a_tiny_chat_model(tmp_path, chat_model_dir, capsys):
    problems = write(tmp_path / "p.jsonl", PROBLEMS)
    out = tmp_path / "d" / "data.jsonl"
    assert cli.main(["rejection-sample", str(chat_model_dir), "--problems", problems, "-o", str(out), "-k", "3",
                     "--max-new-tokens", "8", "--batch-size", "4"]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    # the random model solves nothing; the right reference is kept, the wrong one is not
    assert [(r["task_id"], r["origin"], r["round"]) for r in records] == [("add", "reference", 1)]
    assert records[0]["messages"][0] == {"role": "user", "content": PROBLEMS[0]["prompt"]}
    assert records[0]["messages"][1]["content"] == "```python\ndef add(a, b):\n    return a + b\n```"
    report = json.loads(out.with_suffix(".report.json").read_text())
    r1 = report["rounds"][0]
    assert (r1["problems"], r1["samples"], r1["references_run"], r1["references_passed"]) == (2, 6, 2, 1)
    assert "round 1" in capsys.readouterr().out
    # a second round keeps the first round's records and numbers itself 2
    out2 = tmp_path / "d" / "round2.jsonl"
    report2 = run_rejection_sampling(str(chat_model_dir), SampleOptions(
        problems=problems, output=str(out2), samples_per_problem=1, max_new_tokens=4, previous=str(out)),
        say=lambda m: None)
    assert [r["round"] for r in report2["rounds"]] == [1, 2] and report2["records"] == 1
    # the data trains: qtrain fit reads it as chat records
    from qtrain.data.corpus import CorpusReport, read_jsonl
    docs, fmt = read_jsonl(out, "auto", CorpusReport("x", "auto"), skip_bad_lines=False)
    assert fmt == "chat" and docs[0].messages == records[0]["messages"]


def test_a_model_without_a_chat_template_is_refused(tmp_path, tiny_model_dir, capsys):
    problems = write(tmp_path / "p.jsonl", PROBLEMS)
    assert cli.main(["rejection-sample", str(tiny_model_dir), "--problems", problems, "-o",
                     str(tmp_path / "o.jsonl")]) == 2
    assert "no chat template" in capsys.readouterr().err
