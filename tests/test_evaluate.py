"""pf-engine eval: every (algorithm, N) row, the picture, a resumed run equal to an
uninterrupted one, a cache that never serves results made with other settings, models or
problems, and answers equal to Engine.solve's under a PRM whose rewards vary."""

import json
import os
import shutil
from dataclasses import replace

import pytest
from conftest import VARYING_VERIFIER, assert_resampled, varying_reward

from pf_engine.api import Engine
from pf_engine.cli import main
from pf_engine.search import SearchConfig

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
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = results["rows"]
    assert results["settings"] == json.loads((tmp_path / "out" / "settings.json").read_text())
    assert results["settings"]["search"]["max_step_tokens"] == 5
    assert results["settings"]["engine"]["policy"]["path"] == str(policy.resolve())
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


def cached_texts(out_dir) -> dict:
    """Each cache entry's text, by its path under the cache folder."""
    return {str(p.relative_to(out_dir / "cache")): p.read_text() for p in (out_dir / "cache").rglob("*.json")}


def rewrite_weights(folder):
    """The checkpoint's weight file written again, byte for byte (a new modification time)."""
    weights = next(folder.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)
    os.utime(weights, ns=(1, 1))


# (a change to the first run's flags or model, what the refusal must name)
CHANGES = [
    (["--seed", "999"], "seed: 0 -> 999"),
    (["--temperature", "1.3"], "temperature: 0.8 -> 1.3"),
    (["--max-step-tokens", "6"], "max-step-tokens: 5 -> 6"),
    ("another model folder", "engine.policy.path"),
    ("the same folder, its weights rewritten", "engine.policy.files"),
]


@pytest.mark.parametrize("change,named", CHANGES, ids=[str(c[0]) for c in CHANGES])
def test_a_rerun_with_other_settings_is_refused_and_fresh_starts_over(policy, problems, tmp_path, capsys,
                                                                    change, named):
    model = tmp_path / "model"
    shutil.copytree(policy, model)
    out = tmp_path / "out"
    assert main(["eval", "--problems", str(problems), "--policy", str(model), "--out-dir", str(out), *ARGS]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    flags = change if isinstance(change, list) else []
    if change == "another model folder":
        model = tmp_path / "other"
        shutil.copytree(policy, model)
    elif change == "the same folder, its weights rewritten":
        rewrite_weights(model)
    rerun = ["eval", "--problems", str(problems), "--policy", str(model), "--out-dir", str(out), *ARGS, *flags]
    capsys.readouterr()
    assert main(rerun) == 2
    err = capsys.readouterr().err
    assert named in err and "pass --fresh to start it over" in err and len(err.splitlines()) == 1, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "a refused run wrote"
    assert main([*rerun, "--fresh"]) == 0
    assert "afresh" in capsys.readouterr().out
    clean = tmp_path / "clean"
    assert main(["eval", "--problems", str(problems), "--policy", str(model), "--out-dir", str(clean), *ARGS,
                 *flags]) == 0
    assert cached_texts(out) == cached_texts(clean)  # nothing of the first run's is left, nor served
    assert json.loads((out / "results.json").read_text()) == json.loads((clean / "results.json").read_text())


def test_an_edited_problem_is_computed_afresh_and_the_others_resume(policy, problems, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(policy, problems, out) == 0
    first = cached_texts(out)
    edited = [dict(PROBLEMS[0]), {"problem": "3+5?", "answer": "7"}, dict(PROBLEMS[2], answer="9")]
    problems.write_text("".join(json.dumps(p) + "\n" for p in edited))
    capsys.readouterr()
    assert run(policy, problems, out) == 0
    assert "6 of 18 results came from" in capsys.readouterr().out  # problem 0 of each of the 6 pairs
    assert run(policy, problems, tmp_path / "clean") == 0
    clean = cached_texts(tmp_path / "clean")
    now = cached_texts(out)
    assert set(now) == set(first) | set(clean) and len(now) == 18 + 12  # the edited two under new names
    assert {k: now[k] for k in clean} == clean
    assert (json.loads((out / "results.json").read_text())
            == json.loads((tmp_path / "clean" / "results.json").read_text()))


def test_an_unchanged_rerun_serves_every_result_from_the_cache(policy, problems, tmp_path, capsys, monkeypatch):
    assert run(policy, problems, tmp_path / "out") == 0
    results = (tmp_path / "out" / "results.json").read_bytes()

    def no_work(self, batch, config=None):
        assert not batch, "a cached result was computed again"
        return iter(())

    monkeypatch.setattr(Engine, "stream", no_work)
    capsys.readouterr()
    assert run(policy, problems, tmp_path / "out") == 0
    assert "18 of 18 results came from" in capsys.readouterr().out
    assert (tmp_path / "out" / "results.json").read_bytes() == results


def test_eval_answers_equal_solve_under_a_varying_prm(policy, problems, tmp_path):
    flags = ["--verifier", VARYING_VERIFIER, "--algorithms", "particle_filter", "--budgets", "4", "--max-steps", "4",
             "--max-step-tokens", "5", "--max-new-tokens", "16", "--kv-cache-mib", "16", "--seed", "5"]
    out = tmp_path / "out"
    assert main(["eval", "--problems", str(problems), "--policy", str(policy), "--out-dir", str(out), *flags]) == 0
    config = SearchConfig(num_particles=4, max_steps=4, max_step_tokens=5, max_new_tokens=16, seed=5)
    expected = Engine(policy=policy, prm=varying_reward, kv_cache_memory=16 << 20).solve(PROBLEMS, config)
    assert_resampled(expected)
    entries = sorted((out / "cache").rglob("*.json"), key=lambda p: int(p.name.split("-")[0]))
    records = [json.loads(p.read_text()) for p in entries]
    assert [r["text"] for r in records] == [r.text for r in expected]
    assert [r["tokens_generated"] for r in records] == [r.stats["tokens_generated"] for r in expected]


def test_an_algorithm_entry_may_set_its_own_fields(policy, problems, tmp_path):
    """--algorithms NAME:FIELD=VALUE,...: each pair runs the config its entry gives, answers equal to
    Engine.solve's under it, each in a cache folder of its own."""
    specs = ["self_consistency", "self_consistency:early_stop=beta,early_stop_threshold=0.8",
             "particle_filter:weights=prm*mean_logprob,signal_exponent=0.5,ess_threshold=none"]
    flags = ["--verifier", VARYING_VERIFIER, "--algorithms", *specs, "--budgets", "4", "--max-steps", "4",
             "--max-step-tokens", "5", "--max-new-tokens", "16", "--kv-cache-mib", "16"]
    out = tmp_path / "out"
    assert main(["eval", "--problems", str(problems), "--policy", str(policy), "--out-dir", str(out), *flags]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["algorithm"] for r in rows] == specs
    engine = Engine(policy=policy, prm=varying_reward, kv_cache_memory=16 << 20)
    base = SearchConfig(num_particles=4, max_steps=4, max_step_tokens=5, max_new_tokens=16)
    configs = [replace(base, algorithm="self_consistency"),
               replace(base, algorithm="self_consistency", early_stop="beta", early_stop_threshold=0.8),
               replace(base, weights="prm*mean_logprob", signal_exponent=0.5, ess_threshold=None)]
    folders = sorted({p.parent.parent.name for p in (out / "cache").rglob("*.json")})
    assert len(folders) == 3
    for spec, config, row in zip(specs, configs, rows, strict=True):
        expected = engine.solve(PROBLEMS, config)
        assert row["tokens_per_problem"] == sum(r.stats["tokens_generated"] for r in expected) / len(PROBLEMS), spec


@pytest.mark.parametrize("spec,message", [
    ("self_consistency:early_stop", "'early_stop' is not FIELD=VALUE"),
    ("self_consistency:num_particles=3", "num_particles"),
    ("self_consistency:colour=red", "'colour=red' is not FIELD=VALUE"),
    ("particle_filter:max_steps=many", "'many' is not a valid int"),
    ("self_consistency:early_stop=soon", "unknown --early-stop 'soon'"),
])
def test_a_bad_algorithm_entry_is_named(policy, problems, tmp_path, capsys, spec, message):
    flags = ["--verifier", "arithmetic", "--algorithms", spec, "--budgets", "2", "--kv-cache-mib", "16"]
    code = main(["eval", "--problems", str(problems), "--policy", str(policy), "--out-dir", str(tmp_path / "o"),
                 *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
