import json
import os
import subprocess
import sys
import threading

import pytest

from protocol.rewards import extract_answer, reward_functions, score
from protocol.tasks import TaskError, known_task, load_task
from tests.command import ROOT


def all_questions(task, split):
    return [task.question(i, split) for i in range(task.size(split))]


# arithmetic

def test_arithmetic_is_deterministic_and_pinned():
    a, b = load_task("arithmetic"), load_task("arithmetic", {"digits": 2, "ops": "+"})
    assert all_questions(a, "train") == all_questions(b, "train")
    q = a.question(0, "eval")  # pins the hold-out hash: "0+11" is the first held-out sum
    assert (q.prompt, q.answer, q.solution, q.split) == ("0+11=", "11", "11", "eval")
    assert a.question(1).prompt == "0+1="
    # The op order in the option does not renumber questions.
    assert all_questions(load_task("arithmetic", {"ops": "*+"}), "eval") == \
        all_questions(load_task("arithmetic", {"ops": "+*"}), "eval")


def test_arithmetic_splits_are_disjoint_and_complete():
    task = load_task("arithmetic", {"ops": "+-*"})
    train = {q.prompt for q in all_questions(task, "train")}
    evals = {q.prompt for q in all_questions(task, "eval")}
    assert not train & evals
    assert len(train) + len(evals) == task.size("train") + task.size("eval") == 100 * 100 * 3
    assert 0.08 < len(evals) / (len(train) + len(evals)) < 0.12


def test_arithmetic_correctness():
    task = load_task("arithmetic")
    q = next(q for q in all_questions(task, "train") if q.prompt == "37+45=")
    assert q.answer == q.solution == "82"
    for completion, expected in [("82", 1.0), (" 82\n", 1.0), ("82\n17", 1.0), ("<answer>82</answer>", 1.0),
                                 ("<answer>82</answer><answer>81</answer>", 0.0), ("81", 0.0), ("", 0.0),
                                 ("garbage", 0.0), ("82abc", 0.0), ("8_2", 0.0), ("+82", 0.0)]:
        assert task.correctness(q, completion) == expected, completion


def test_arithmetic_negative_results():
    task = load_task("arithmetic", {"ops": "-"})
    q = next(q for q in all_questions(task, "train") if q.prompt == "3-45=")
    assert q.answer == "-42"
    assert task.correctness(q, "-42") == 1.0
    assert task.correctness(q, "42") == 0.0


def test_arithmetic_format():
    task = load_task("arithmetic")
    assert all(task.format_ok(c) for c in ["82", " -3\n", "<answer>82</answer>", "<answer> 82 </answer>"])
    assert not any(task.format_ok(c) for c in ["82 apples", "<answer>82", "82</answer>", "", "x"])


@pytest.mark.parametrize("options, word", [
    ({"digit": 2}, "'digit'"), ({"digits": 0}, "digits"), ({"digits": "2"}, "digits"),
    ({"ops": "/"}, "ops"), ({"ops": ""}, "ops"),
])
def test_arithmetic_bad_options(options, word):
    with pytest.raises(TaskError, match=word):
        load_task("arithmetic", options)


def test_out_of_range_and_bad_split():
    task = load_task("arithmetic")
    with pytest.raises(IndexError, match="out of range"):
        task.question(task.size("train"))
    with pytest.raises(IndexError):
        task.question(-1)
    with pytest.raises(TaskError, match="split"):
        task.question(0, "test")


# names

def test_known_task_messages():
    assert known_task("arithmetic") is None and known_task("gsm8k") is None
    assert known_task("rg:countdown") is None
    assert known_task("foo") == "unknown task 'foo' (known: arithmetic, gsm8k, rg:<name> for any reasoning-gym dataset)"
    assert known_task("rg:xyz") == "unknown reasoning-gym dataset 'xyz'"
    assert "did you mean 'countdown'" in known_task("rg:countdwn")
    assert "not reproducible" in known_task("rg:word_ladder")
    with pytest.raises(TaskError, match="unknown task 'foo'"):
        load_task("foo")


# reasoning-gym

def test_rg_basic_arithmetic():
    a, b = load_task("rg:basic_arithmetic"), load_task("rg:basic_arithmetic")
    assert [a.question(i) for i in range(5)] == [b.question(i) for i in range(5)]
    assert a.size("train") == 10_000 and a.size("eval") == 500
    q = a.question(3)
    assert q.prompt.endswith("\nPut your final answer within <answer></answer> tags.")
    assert q.solution == f"<answer>{q.answer}</answer>"
    assert a.correctness(q, q.solution) == 1.0
    assert a.correctness(q, f"Let me think.\n<answer>{int(q.answer) + 1}</answer>") == 0.0
    assert a.correctness(q, q.answer) == 1.0  # no tags: the whole completion is the answer
    assert a.format_ok(q.solution) and not a.format_ok(q.answer)
    assert not a.format_ok(q.solution * 2)
    assert a.question(0, "eval") != a.question(0, "train")


def test_rg_countdown_reference_scores_one():
    task = load_task("rg:countdown")
    for split in ("train", "eval"):
        q = task.question(1, split)
        assert task.correctness(q, "I'll try.\n" + q.solution) == 1.0


def test_rg_options():
    task = load_task("rg:basic_arithmetic", {"seed": 5, "size": 20, "eval_size": 3, "min_terms": 2, "max_terms": 2})
    assert (task.size("train"), task.size("eval")) == (20, 3)
    assert task.question(0).meta["metadata"]["num_terms"] == 2
    assert task.question(0) != load_task("rg:basic_arithmetic").question(0)
    with pytest.raises(TaskError, match="'max_term'"):
        load_task("rg:basic_arithmetic", {"max_term": 3})
    with pytest.raises(TaskError, match="max_terms"):
        load_task("rg:basic_arithmetic", {"min_terms": 4, "max_terms": 2})
    with pytest.raises(TaskError, match="eval_size"):
        load_task("rg:basic_arithmetic", {"eval_size": 0})


def test_questions_do_not_depend_on_the_hash_seed():
    # Peers are separate processes: string hashing must not leak into questions.
    code = ("from protocol.tasks import load_task\n"
            "for name in ('arithmetic', 'rg:basic_arithmetic', 'rg:countdown'):\n"
            "    t = load_task(name)\n"
            "    print([t.question(i, s).prompt for s in ('train', 'eval') for i in range(3)])\n")
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env=os.environ | {"PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    outputs = [run.communicate(timeout=60)[0] for run in runs]
    assert outputs[0] == outputs[1] and outputs[0].count("\n") == 3


# gsm8k

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                 "to her friends in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A farm has 1,000 chickens and buys 234 more. How many chickens does it have now?",
     "answer": "It has 1,000 + 234 = <<1000+234=1234>>1,234 chickens.\n#### 1,234"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_gsm8k_offline_error_is_one_clear_line(tmp_path, monkeypatch):
    # The hub libraries read these variables at import, so the load runs in a fresh
    # interpreter; an empty cache keeps a copy downloaded on this machine out of it.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    for var in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.setenv(var, str(tmp_path / var))
    code = ("from protocol.tasks import TaskError, load_task\n"
            "task = load_task('gsm8k')\n"  # lazy: building the task loads nothing
            "try:\n"
            "    task.size('train')\n"
            "except TaskError as e:\n"
            "    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    message = result.stdout.strip()
    assert message.startswith("gsm8k: cannot load 'openai/gsm8k' (offline? Download it once with network access "
                              "or set task.options.path to a local copy)"), result.stdout + result.stderr
    assert "\n" not in message


def test_gsm8k_from_one_local_file(tmp_path):
    task = load_task("gsm8k", {"path": str(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS))})
    assert task.size("train") + task.size("eval") == 3
    questions = {q.answer: q for split in ("train", "eval") for q in all_questions(task, split)}
    assert set(questions) == {"72", "1234", "10"}

    q = questions["1234"]
    assert q.prompt == GSM8K_ROWS[1]["question"] + "\nPut your final answer within <answer></answer> tags."
    assert q.solution == "It has 1,000 + 234 = 1,234 chickens.\n<answer>1234</answer>"
    assert task.correctness(q, q.solution) == 1.0
    assert task.correctness(q, "So the farm has\n<answer>1,234</answer>") == 1.0
    assert task.correctness(q, "<answer>1,235</answer>") == 0.0

    q = questions["72"]
    assert task.correctness(q, "72") == 1.0
    assert task.correctness(q, "<answer>72</answer>") == 1.0
    assert task.correctness(q, "<answer>73</answer>") == 0.0
    assert task.correctness(q, "no idea") == 0.0
    assert task.format_ok("<answer>72</answer>") and not task.format_ok("72")


def test_gsm8k_from_a_folder_and_in_a_thread(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS[:1])
    task = load_task("gsm8k", {"path": str(tmp_path)})
    assert (task.size("train"), task.size("eval")) == (3, 1)
    q = task.question(0, "eval")
    # math-verify times out with SIGALRM, which fails off the main thread unless handled.
    results = []
    thread = threading.Thread(target=lambda: results.append(task.correctness(q, "<answer>72</answer>")))
    thread.start()
    thread.join()
    assert results == [1.0]


def test_gsm8k_bad_path_and_option(tmp_path):
    with pytest.raises(TaskError, match="gsm8k: cannot load"):
        load_task("gsm8k", {"path": str(tmp_path / "missing")}).size("train")
    with pytest.raises(TaskError, match="'split'"):
        load_task("gsm8k", {"split": "train"})


# rewards

def test_extract_answer():
    assert extract_answer("think\n<answer> 1 </answer> more <answer>2</answer>\n") == "2"
    assert extract_answer("  82\nrest") == "82"
    assert extract_answer("<answer>\n1,234\n</answer>") == "1,234"
    assert extract_answer("") == ""


def test_reward_functions_and_score():
    task = load_task("arithmetic")
    q = next(q for q in all_questions(task, "train") if q.prompt == "37+45=")
    assert [f.name for f in reward_functions(task, 0.0)] == ["correct"]
    functions = reward_functions(task, 0.5)
    assert [(f.name, f.weight) for f in functions] == [("correct", 1.0), ("format", 0.5)]

    completions = ["82", "<answer>82</answer>", "81", "82 is it"]
    totals, values = score(functions, [q] * 4, completions)
    assert values == {"correct": [1.0, 1.0, 0.0, 0.0], "format": [1.0, 1.0, 1.0, 0.0]}
    assert totals == [1.5, 1.5, 0.5, 0.0]
    assert score(reward_functions(task, 0.0), [q] * 4, completions)[0] == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        score(functions, [q], completions)
