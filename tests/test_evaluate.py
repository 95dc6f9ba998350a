"""pf-engine eval: every (algorithm, N) row, the picture, and a resumed run equal to an
uninterrupted one."""

import json

import pytest

from pf_engine.api import Engine
from pf_engine.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
PROBLEMS = [{"problem": "2+2?", "answer": "4"}, {"problem": "3+4?", "answer": "7"}, {"question": "9-1?", "answer": "8"}]
ARGS = ["--verifier", "arithmetic", "--algorithms", "best_of_n", "particle_filter", "--budgets", "1", "2", "4",
        "--max-steps", "3", "--max-step-tokens", "5", "--max-new-tokens", "12", "--kv-cache-mib", "16"]


def run(policy, problems, out_dir):
    return main(["eval", "--problems", str(problems), "--policy", str(policy), "--out-dir", str(out_dir), *ARGS])


@pytest.fixture
def problems(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def test_eval_writes_every_row_and_the_picture(policy, problems, tmp_path, capsys):
    assert run(policy, problems, tmp_path / "out") == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["algorithm"], r["particles"]) for r in rows] == [
        (a, n) for a in ("best_of_n", "particle_filter") for n in (1, 2, 4)]
    assert all(r["problems"] == 3 and 0 <= r["correct"] <= 3 and r["tokens_per_problem"] > 0 for r in rows)
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == PNG
    assert len(list((tmp_path / "out" / "cache").rglob("*.json"))) == 6 * 3
    shown = capsys.readouterr().out
    assert "pf-engine eval: 3 problems" in shown and "particle_filter" in shown


def test_an_interrupted_eval_resumes_to_the_same_table(policy, problems, tmp_path, monkeypatch, capsys):
    assert run(policy, problems, tmp_path / "whole") == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    real, seen = Engine.stream, []

    def interrupted(self, batch, config=None):
        for item in real(self, batch, config):
            seen.append(item)
            if len(seen) == 6:  # the second pair with two of its three problems done
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(Engine, "stream", interrupted)
    assert run(policy, problems, tmp_path / "resumed") == 130
    cached = list((tmp_path / "resumed" / "cache").rglob("*.json"))
    assert len(cached) == 5 and not (tmp_path / "resumed" / "results.json").exists()
    assert not list((tmp_path / "resumed").rglob("*.part")), "a half-written cache file"
    monkeypatch.undo()
    assert run(policy, problems, tmp_path / "resumed") == 0
    assert json.loads((tmp_path / "resumed" / "results.json").read_text()) == whole
    for path in (tmp_path / "whole" / "cache").rglob("*.json"):  # each problem drew what it draws uninterrupted
        assert (tmp_path / "resumed" / path.relative_to(tmp_path / "whole")).read_text() == path.read_text(), path


def test_eval_needs_gold_answers_and_a_prm(policy, tmp_path, capsys):
    no_gold = tmp_path / "p.jsonl"
    no_gold.write_text(json.dumps({"problem": "2+2?"}) + "\n")
    assert run(policy, no_gold, tmp_path / "out") == 2
    assert 'problem 0 has no gold "answer"' in capsys.readouterr().err
    gold = tmp_path / "g.jsonl"
    gold.write_text(json.dumps(PROBLEMS[0]) + "\n")
    args = ["eval", "--problems", str(gold), "--policy", str(policy), "--out-dir", str(tmp_path / "out"),
            "--algorithms", "particle_filter", "--budgets", "2"]
    assert main(args) == 2
    assert "particle_filter needs a PRM" in capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("*.json"))
