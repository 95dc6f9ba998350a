"""The ``pf-engine`` command: ``demo`` (the main job), ``solve``, ``eval``, ``synthesize``, ``serve``, ``tree``
and ``selfcheck``.

Whatever the user can fix (a bad option or path, a cache too small, any
``PfEngineError``) ends the command with one line on stderr that names the flag
to change, and exit status 2; ``solve`` checks its output paths before any work.
"""

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from pf_engine.errors import PfEngineError
from pf_engine.files import write_atomically
from pf_engine.prm_format import PRESETS
from pf_engine.prompts import PROMPT_PRESETS

# Every SearchConfig field is a flag of solve, eval, serve and synthesize (add_search_flags), named
# after the field but for these; the API's errors name its parameters, the command's the flags.
FIELD_FLAGS = {"num_particles": "--particles"}
FLAGS = {"kv_cache_memory": "--kv-cache-mib", "prm_format": "--prm-format", "fresh": "--fresh"}
ESCAPED_FIELDS = ("step_delimiter", "stop")  # read with backslash escapes: --step-delimiter '\n\n'


def field_flag(name: str) -> str:
    """The flag that sets SearchConfig field ``name``."""
    return FIELD_FLAGS.get(name, "--" + name.replace("_", "-"))


def search_field_names() -> tuple[str, ...]:
    from dataclasses import fields

    from pf_engine.search.config import SearchConfig

    return tuple(f.name for f in fields(SearchConfig))


DEMO_INSTRUCTION = ("Solve the problem step by step. Put each step on its own line, leave a blank line between "
                    "steps, and write every calculation as an equation like 3 + 4 = 7. "
                    "End with: The answer is \\boxed{{N}}.\n\nProblem: {problem}")


def selfcheck(args) -> int:
    """Say what this install runs on the device; then share, fork, resample and copy-on-write a
    small KV cache there and check that every token reads back."""
    import torch

    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _print_install(device)
    failure = _kv_cache_failure(device)
    if failure is not None:
        print(f"FAILED: {failure}")
        return 1
    print("self-check passed: 8 particles forked, resampled and extended with copy-on-write; "
          "every token read back")
    return 0


def _print_install(device) -> None:
    """The native parts installed, and the attention backend and kernels used on ``device``."""
    from pf_engine import _native
    from pf_engine.attention import get_backend

    print("installed:")
    for name, present in _native.summary().items():
        print(f"  {name:<22} {'yes' if present else 'no'}")
    print(f"used on {device}:")
    uses = {"attention backend": get_backend("auto", device).name} | _native.kernels(device)
    for name, impl in uses.items():
        print(f"  {name:<22} {impl}")


def _kv_cache_failure(device) -> str | None:
    """What went wrong when 8 particles share a prompt's blocks, fork, resample and append to a small
    KV cache on ``device`` (every token must read back, an oversized allocation must raise, every
    block must come back); None if nothing did."""
    import torch

    from pf_engine.errors import OutOfBlocksError
    from pf_engine.kv_cache import KVCache

    cache = KVCache(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=64, block_size=4, dtype=torch.float32,
                    device=device)
    bm = cache.manager
    particles, tokens = _fork_resample_extend(cache, device)
    for seq_id in particles:
        for layer in range(2):
            k, v = cache.read(layer, seq_id)
            if not (torch.equal(k[:, 0, 0], tokens[seq_id]) and torch.equal(v, -k)):
                return f"sequence {seq_id} reads back other tokens than it wrote"
    try:
        bm.allocate(10_000)
        return "an oversized allocation did not raise OutOfBlocksError"
    except OutOfBlocksError:
        pass
    for seq_id in particles:
        bm.free(seq_id)
    if bm.num_free_blocks != bm.num_blocks:
        return f"{bm.num_blocks - bm.num_free_blocks} blocks leaked"
    return None


def _fork_resample_extend(cache, device) -> tuple[list[int], dict]:
    """A 6-token prompt in ``cache``, forked into 8 particles that append 3 tokens each, resampled
    (ancestors 0 0 0 2 2 5 7 7), then 5 tokens more each: the particles' seq_ids, and seq_id -> the
    values written to it, one per token (each token's K is its value, its V minus that)."""
    import numpy as np
    import torch

    bm = cache.manager
    tokens = {}  # seq_id -> values written, one per token

    def write(seq_ids, counts):
        slots, copies = bm.append(seq_ids, counts)
        cache.copy_blocks(copies)
        start = 0
        for seq_id, n in zip(seq_ids, counts, strict=True):
            values = torch.rand(n, device=device)
            tokens[seq_id] = torch.cat([tokens[seq_id], values])
            kv = values[:, None, None].expand(n, 2, 8)
            for layer in range(2):
                cache.write(layer, slots[start : start + n], kv, -kv)
            start += n

    prompt = bm.allocate(0)
    tokens[prompt] = torch.empty(0, device=device)
    write([prompt], [6])
    particles = [prompt] + [bm.fork(prompt) for _ in range(7)]
    for seq_id in particles[1:]:
        tokens[seq_id] = tokens[prompt].clone()
    write(particles, [3] * 8)
    ancestors = np.array([0, 0, 0, 2, 2, 5, 7, 7])
    parents = [particles[a] for a in ancestors]
    particles = list(bm.resample(particles, ancestors))
    tokens = {child: tokens[parent] for child, parent in zip(particles, parents, strict=True)}
    write(particles, [5] * 8)
    return particles, tokens


def load_problems(path) -> list[dict]:
    """Problems of a JSONL file: one object per line with "problem" or "question", and optionally "answer"."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such problems file")
    problems = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("problem", record.get("question")), str):
            raise ValueError(f"{path}:{number}: each line needs a \"problem\" or \"question\" string")
        problems.append(record)
    if not problems:
        raise ValueError(f"{path}: holds no problems")
    return problems


def run_with_progress(engine, problems, config, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=not sys.stdout.isatty()) as bar:
        task = bar.add_task(label, total=len(problems))
        return engine.solve(problems, config, progress=lambda done: bar.update(task, completed=done))


def output_path(flag: str, path) -> Path:
    """``path`` if a file can be written there, checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder, not a file")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: the output folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: no permission to write in {path.parent}")
    return path


def check_device(name: str):
    """The torch device ``--device`` names, if this machine has it."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: pf-engine runs on cpu or cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def search_config(args, **fixed):
    """The SearchConfig the flags give (``fixed`` for those the command sets itself)."""
    from pf_engine.search.config import SearchConfig

    if args.prompt_preset is not None:
        if args.system_prompt is not None:
            raise ValueError("--prompt-preset and --system-prompt both set the system prompt: pass one")
        args.system_prompt = PROMPT_PRESETS[args.prompt_preset]
    given = {name: getattr(args, name) for name in search_field_names() if hasattr(args, name)}
    given["stop"] = tuple(given.get("stop") or ())
    return SearchConfig(**given | fixed)


def unescape(text: str) -> str:
    r"""``text`` with the backslash escapes \n, \t, \r and \\ read as the characters they name."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def add_search_flags(parser, defaults: dict | None = None, skip: tuple[str, ...] = ()) -> None:
    """A flag for every SearchConfig field but ``skip``, its help the field's docstring, its default the
    field's or ``defaults``'."""
    from dataclasses import fields

    from pf_engine.confidence import WEIGHTS
    from pf_engine.resample import AGGREGATIONS, SCHEMES
    from pf_engine.search.config import ALGORITHMS, FINAL_ANSWERS, SearchConfig, field_docs, field_types
    from pf_engine.votes import EARLY_STOPS, VOTES

    choices = {"algorithm": ALGORITHMS, "final_answer": FINAL_ANSWERS, "aggregation": AGGREGATIONS,
               "scheme": SCHEMES, "weights": WEIGHTS, "vote": VOTES, "early_stop": EARLY_STOPS}
    docs, defaults = field_docs(SearchConfig), defaults or {}
    group = parser.add_argument_group("search", "the fields of pf_engine.SearchConfig")
    for f in fields(SearchConfig):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        kind = next(a for a in field_types(f.type) if a is not type(None))
        escapes = " (backslash escapes \\n, \\t, \\r, \\\\ read as such)" if f.name in ESCAPED_FIELDS else ""
        options = dict(dest=f.name, default=default, choices=choices.get(f.name),
                       help=f"{docs[f.name]}{escapes} (default: {default!r})".replace("%", "%%"))
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            options |= dict(action="append", default=None, type=unescape, metavar="TEXT",
                            help=options["help"].replace("(default: ()", "(repeat for more; default: none"))
        elif kind in (int, float, str):
            options["type"] = unescape if f.name in ESCAPED_FIELDS else kind
        else:  # a nested config: its fields as a JSON object
            options |= dict(type=json_object, metavar="JSON")
        group.add_argument(field_flag(f.name), **options)


def load_verifier(spec: str):
    """The step verifier ``--verifier`` names: ``arithmetic`` (pf_engine.verifiers), or ``MODULE:FUNCTION``,
    a callable ``f(question, steps) -> reward in [0, 1]`` importable from the command's Python path."""
    import importlib

    from pf_engine.verifiers import arithmetic_verifier

    if spec == "arithmetic":
        return arithmetic_verifier
    module, _, name = spec.partition(":")
    if not module or not name.isidentifier():
        raise ValueError(f"--verifier {spec}: arithmetic, or MODULE:FUNCTION for a verifier of your own")
    try:
        verifier = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ValueError(f"--verifier {spec}: cannot import {module} ({exc})") from None
    except AttributeError:
        raise ValueError(f"--verifier {spec}: {module} has no {name}") from None
    if not callable(verifier):
        raise ValueError(f"--verifier {spec}: {name} is not callable")
    return verifier


def load_engine(args):
    """The Engine the flags name, after checking its folders."""
    from pf_engine.api import Engine

    for flag, folder in (("--policy", args.policy), ("--prm", args.prm), ("--orm", args.orm)):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"{flag} {folder}: no such folder")
    if args.prm_format is not None and args.prm is None:
        raise ValueError("--prm-format describes a PRM checkpoint: pass --prm PATH with it")
    prm = load_verifier(args.verifier) if args.verifier is not None else args.prm
    import torch

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    return Engine(policy=args.policy, prm=prm, device=check_device(args.device), dtype=dtype,
                  kv_cache_memory=args.kv_cache_mib << 20, prm_format=args.prm_format, orm=args.orm)


def evaluate_command(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from pf_engine.evaluate import evaluate, pair_config

    out_dir = Path(args.out_dir)
    if not out_dir.parent.is_dir():
        raise ValueError(f"--out-dir {out_dir}: the folder {out_dir.parent} does not exist")
    try:
        problems = load_problems(args.problems)
    except ValueError as exc:
        raise ValueError(f"--problems {exc}") from None
    base = search_config(args, algorithm=args.algorithms[0].partition(":")[0], num_particles=1)
    for algorithm in args.algorithms:  # a bad entry fails before the models load or the folder is made
        pair_config(base, algorithm, 1)
    engine = load_engine(args)
    out_dir.mkdir(exist_ok=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=not sys.stdout.isatty()) as bar:
        tasks, starts = {}, {}  # what each pair's cache held when it started

        def progress(label, done, total):
            if label not in tasks:
                tasks[label], starts[label] = bar.add_task(label, total=total), done
            bar.update(tasks[label], completed=done)

        rows = evaluate(engine, problems, args.algorithms, args.budgets, out_dir, base, progress, fresh=args.fresh)
    cached = sum(starts.values())
    print(f"started {out_dir} afresh" if args.fresh else
          f"{cached} of {len(problems) * len(rows)} results came from {out_dir}'s cache (same settings)" if cached
          else f"no cached results in {out_dir} for these settings: all computed")
    table = Table(title=f"pf-engine eval: {len(problems)} problems")
    for column in ("algorithm", "N", "accuracy", "tokens per problem"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["algorithm"], str(r["particles"]), f"{r['correct']}/{r['problems']} = {r['accuracy']:.0%}",
                      f"{r['tokens_per_problem']:.0f}")
    Console().print(table)
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.png'}")
    return 0


def solve(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from pf_engine.answers import is_correct
    from pf_engine.search import ALGORITHMS

    out = output_path("--out", args.out)
    tree = output_path("--tree", args.tree) if args.tree else None
    if tree is not None and tree.resolve() == out.resolve():
        raise ValueError(f"--tree and --out both name {out}")
    try:
        problems = load_problems(args.problems)
    except ValueError as exc:
        raise ValueError(f"--problems {exc}") from None
    config = search_config(args)
    algorithm = ALGORITHMS[config.algorithm]
    ranked_by_orm = algorithm.outcome_ranks and args.orm is not None
    if algorithm.scores and config.weighting.prm and args.prm is None and args.verifier is None and not ranked_by_orm:
        raise ValueError(f"--algorithm {config.algorithm} needs a PRM: pass --prm PATH or --verifier arithmetic")
    engine = load_engine(args)
    began = time.perf_counter()
    results = run_with_progress(engine, problems, config, config.algorithm)
    seconds = time.perf_counter() - began
    graded = [is_correct(r.answer, p["answer"]) if "answer" in p else None
              for r, p in zip(results, problems, strict=True)]
    records = [json.dumps({"problem": r.question, "answer": r.answer, "gold": p.get("answer"), "correct": g,
                           "text": r.text, "steps": r.steps, "weights": r.weights, "stats": r.stats}
                          | ({"outcome_scores": r.outcome_scores} if r.outcome_scores is not None else {}))
               for r, p, g in zip(results, problems, graded, strict=True)]
    write_atomically(out, records)
    if tree is not None:
        write_atomically(tree, (json.dumps({"problem_index": i} | node)
                                for i, r in enumerate(results) for node in r.tree_records()))
    table = Table(title=f"pf-engine solve: {config.algorithm}, {config.num_particles} particles")
    for column in ("problems", "accuracy", "tokens generated", "PRM tokens", "seconds"):
        table.add_column(column, justify="right")
    marks = [g for g in graded if g is not None]
    accuracy = f"{sum(marks)}/{len(marks)} = {sum(marks) / len(marks):.0%}" if marks else "no answers given"
    table.add_row(str(len(results)), accuracy, str(_total(results, "tokens_generated")),
                  str(_total(results, "prm_tokens")), f"{seconds:.1f}")
    Console().print(table)
    print(f"wrote {out}" + (f" and {tree}" if tree else ""))
    return 0


def _total(results, key) -> int:
    """A per-problem stat summed over the problems."""
    return sum(r.stats[key] for r in results)


def demo(args) -> int:
    from importlib.resources import files

    from rich.console import Console

    from pf_engine.savings import count_savings
    from pf_engine.search.config import SearchConfig
    from pf_engine.tree_plot import plot_tree

    tree_out = output_path("--tree-out", args.tree_out)
    problems = load_problems(files("pf_engine") / "data" / "arithmetic.jsonl")[: args.problems]
    common = dict(max_new_tokens=args.max_new_tokens, max_step_tokens=64, max_steps=12, temperature=0.7, seed=args.seed)
    pf = SearchConfig(algorithm="particle_filter", num_particles=args.particles, **common)
    device = check_device(args.device)
    print("pf-engine demo: the embedded SmolLM2-135M-Instruct is a 135M-parameter model that rarely solves "
          "multi-step word problems, so its accuracy below stays near zero whatever the search; what the demo "
          "shows is the engine's own work (prompts shared, steps scored once, blocks forked), counted in this run. "
          "Accuracy gains need a real policy and PRM on a GPU (pf-engine eval).")
    print(f"{len(problems)} arithmetic word problems, {args.particles} particles, at most {args.max_new_tokens} "
          f"new tokens per particle")
    methods = _demo_methods(args.particles, common, pf, device)
    console = Console(width=max(120, Console().width))  # the tables' rows on one line each
    results = _demo_comparison(console, methods, problems)
    name, model_prm, _ = methods[-1]
    console.print(_savings_table(count_savings(model_prm, results), name))
    shown = max(range(len(results)), key=lambda i: len(results[i].tree))  # the widest search
    plot_tree(results[shown].tree_records(), tree_out, title=problems[shown]["problem"])
    print(f"the search tree of problem {shown} (particle filtering, SmolLM2 as PRM): {tree_out}")
    return 0


def _demo_methods(particles: int, common: dict, pf, device) -> list[tuple]:
    """The demo's (name, engine, config) rows: one sample, best-of-N and particle filtering under the
    rule verifier, then particle filtering under a model PRM (whose savings the demo counts)."""
    from pf_engine.api import Engine
    from pf_engine.models.smollm2 import smollm2_path
    from pf_engine.search.config import SearchConfig
    from pf_engine.verifiers import arithmetic_verifier

    verified = Engine(prm=arithmetic_verifier, device=device)
    # the policy read as its own token-pair PRM (after each step "\n": reward = p("+") against p("-")),
    # a model PRM with its own KV cache, to count what incremental scoring saves
    model_prm = Engine(prm=smollm2_path(), prm_step_tag="\n", prm_good="+", prm_bad="-", device=device)
    return [
        ("single sample", verified, SearchConfig(algorithm="self_consistency", num_particles=1, **common)),
        (f"best-of-{particles}, rule verifier", verified,
         SearchConfig(algorithm="best_of_n", num_particles=particles, **common)),
        (f"particle filtering ({particles}), rule verifier", verified, pf),
        (f"particle filtering ({particles}), SmolLM2 as PRM", model_prm, pf),
    ]


def _demo_comparison(console, methods: list[tuple], problems: list[dict]) -> list:
    """Runs each method on the problems and prints their accuracy, tokens and seconds; the last
    method's results."""
    from rich.table import Table

    from pf_engine.answers import is_correct

    questions = [DEMO_INSTRUCTION.format(problem=p["problem"]) for p in problems]
    table = Table(title="Same problems, same per-particle token budget")
    for column in ("method", "accuracy", "tokens generated", "seconds"):
        table.add_column(column, justify="right")
    for name, engine, config in methods:
        began = time.perf_counter()
        results = run_with_progress(engine, questions, config, name)
        seconds = time.perf_counter() - began
        correct = sum(is_correct(r.answer, p["answer"]) for r, p in zip(results, problems, strict=True))
        table.add_row(name, f"{correct}/{len(problems)} = {correct / len(problems):.0%}",
                      str(_total(results, "tokens_generated")), f"{seconds:.1f}")
    console.print(table)
    return results


def _savings_table(saved, name: str):
    """What the engine saved in the run ``name`` (pf_engine.savings.Savings), beside what it would cost
    without sharing."""
    from rich.table import Table

    table = Table(title=f"What the engine saved in the last run ({name}), counted")
    for column in ("", "pf_engine", "without sharing", "ratio"):
        table.add_column(column, justify="right")
    for what, ours, theirs, how in (
            ("prompt tokens prefilled", saved.prompt_tokens, saved.prompt_tokens_resubmitted,
             "once per problem | resubmitted by every particle at every step"),
            ("PRM tokens read", saved.prm_tokens, saved.prm_tokens_reread,
             "each step once | every partial answer re-read at every step"),
            ("peak KV blocks (policy + PRM)", saved.peak_blocks, saved.peak_unshared_blocks,
             "shared, forked | each particle its own copy")):
        table.add_row(what, f"{ours:,}", f"{theirs:,}", f"{theirs / max(ours, 1):.1f}x")
        table.add_row(f"[dim]{how}[/dim]", "", "", "")
    return table


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (exit status 2), not the usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def error_line(exc: BaseException) -> str:
    """The error as one line, with the API's parameter names replaced by the flags that set them."""
    if isinstance(exc, OSError) and exc.strerror:
        message = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        flags = FLAGS | {name: field_flag(name) for name in search_field_names()}
        # a parameter name as a word of its own, not inside a path, a longer name or quoted input
        api_name = re.compile(r"(?<![\w/.-])(" + "|".join(flags) + r")(?![\w/.-])")
        message = "".join(part if part.startswith("'") else api_name.sub(lambda m: flags[m.group(1)], part)
                          for part in re.split(r"('[^']*')", str(exc)))
    return " ".join(message.split())


def tree(args) -> int:
    from pf_engine.tree_plot import plot_tree_file

    if not Path(args.tree_file).is_file():
        raise ValueError(f"{args.tree_file}: no such tree file")
    out = output_path("--out", args.out)
    plot_tree_file(args.tree_file, args.problem, out)
    print(f"wrote {out}")
    return 0


def synthesize_command(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from pf_engine.synthesize import MARKERS, TRANSITION, SynthesisConfig, check_inputs, summary, synthesize

    markers = MARKERS.get(args.markers) or tuple(args.markers.split(",", 1))
    if len(markers) != 2:
        raise ValueError(f"--markers {args.markers}: think, thought, or OPEN,CLOSE")
    config = SynthesisConfig(datasets=tuple(args.datasets), search=search_config(args), markers=markers,
                             transition=TRANSITION if args.transition is None else args.transition,
                             num_wrong=args.wrong_attempts, max_per_problem=args.per_problem,
                             dedup=not args.no_dedup, wait_phrase=args.wait_phrase, num_waits=args.waits)
    out_dir = Path(args.out_dir)
    problems = load_problems(args.problems)
    check_inputs(problems, out_dir)
    engine = load_engine(args)
    records = synthesize(engine, problems, out_dir, config)
    table = Table(title=f"Reasoning data from {len(problems)} problems in {out_dir}")
    for column in ("dataset", "records", "problems covered", "mean characters"):
        table.add_column(column, justify="right")
    for row in summary(records):
        table.add_row(f"{row['dataset']}.jsonl", str(row["records"]), f"{row['problems']}/{len(problems)}",
                      f"{row['mean_chars']:.0f}")
    Console(width=max(100, Console().width)).print(table)
    return 0


def serve(args) -> int:
    import uvicorn

    from pf_engine.server.app import build_app
    from pf_engine.server.protocol import Limits

    defaults = search_config(args)
    if not 0 < args.progress_interval <= 10:
        raise ValueError(f"--progress-interval must be in (0, 10] seconds, got {args.progress_interval}")
    engine = load_engine(args)
    engine.algorithm(defaults)  # the defaults must suit the models (a PRM where the search needs one)
    config = engine.policy.model.config
    name = args.served_model_name or (Path(args.policy).name if args.policy else "SmolLM2-135M-Instruct")
    limits = Limits(model_name=name, defaults=defaults, max_particles=args.max_particles,
                    max_model_len=args.max_model_len or getattr(config, "max_position_embeddings", 1 << 20))
    app = build_app(engine, limits, api_key=args.api_key, max_queue=args.max_queue, max_running=args.max_running,
                    progress_interval=args.progress_interval)
    print(f"pf-engine serve: {name} on http://{args.host}:{args.port}/v1"
          + (" (API key required)" if args.api_key else ""), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="pf-engine", description="Particle-filtering inference-time scaling.")
    sub = parser.add_subparsers(dest="command", required=True)
    models, problems = _model_flags(), _problems_flag()
    _add_selfcheck(sub)
    _add_demo(sub)
    _add_solve(sub, [problems, models])
    _add_eval(sub, [problems, models])
    _add_synthesize(sub, [problems, models])
    _add_serve(sub, [models])
    _add_tree(sub)
    return parser


def _model_flags() -> argparse.ArgumentParser:
    """The models and the search: the flags solve, eval, synthesize and serve share."""
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--policy", default=None,
                        help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    group = shared.add_mutually_exclusive_group()
    group.add_argument("--prm", default=None, help="PRM checkpoint folder: a class-head or value-head PRM, or a "
                       "language model read as a token-pair PRM with --prm-format")
    group.add_argument("--verifier", metavar="arithmetic|MODULE:FUNCTION",
                       help="a rule-based step verifier instead of a PRM: arithmetic (checks each step's a op b = c "
                       "claims), or your own f(question, steps) -> reward in [0, 1] importable as MODULE:FUNCTION")
    shared.add_argument("--prm-format", choices=sorted(PRESETS), help="how --prm is shown the steps (its model "
                        "card's format); default: its chat prompt, each step followed by <extra_0> (class head)")
    shared.add_argument("--orm", default=None, help="outcome reward model checkpoint folder (sequence "
                        "classification, one label): scores each final answer; ranks best_of_n without a PRM; "
                        "--final-answer outcome")
    shared.add_argument("--device", default="cpu")
    shared.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="the models' weights and KV caches (default: float32 on the CPU, the checkpoint's "
                             "dtype on a GPU)")
    shared.add_argument("--kv-cache-mib", type=positive_int, default=1024)
    shared.add_argument("--prompt-preset", choices=sorted(PROMPT_PRESETS),
                        help="a system prompt the method's authors used (qwen2.5-math: the paper's)")
    return shared


def _problems_flag() -> argparse.ArgumentParser:
    problems = argparse.ArgumentParser(add_help=False)
    problems.add_argument("--problems", required=True, help='JSONL, one {"problem" or "question", "answer"?} per line')
    return problems


def _add_selfcheck(sub) -> None:
    c = sub.add_parser("selfcheck", help="say what this install runs, and check the block manager and KV cache")
    c.add_argument("--device", default=None, help="default: cuda where there is a GPU, else cpu")


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="single sample vs best-of-N vs particle filtering on the embedded model")
    d.add_argument("--particles", type=int, default=4)
    d.add_argument("--problems", type=positive_int, default=12, help="how many of the shipped problems")
    d.add_argument("--max-new-tokens", type=int, default=160)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--tree-out", default=str(Path(tempfile.gettempdir()) / "pf-engine-demo-tree.png"),
                   help="where the picture of one problem's search tree goes (default: the temp folder)")


def _add_solve(sub, parents: list) -> None:
    s = sub.add_parser("solve", parents=parents, help="solve a JSONL file of problems")
    s.add_argument("--out", required=True, help="JSONL of answers, written whole or not at all")
    s.add_argument("--tree", default=None, help="also write every step of every particle as JSONL")
    add_search_flags(s)


def _add_eval(sub, parents: list) -> None:
    e = sub.add_parser("eval", parents=parents, help="accuracy against N for each algorithm (a scaling curve)")
    e.add_argument("--out-dir", required=True, help="results.json, results.png, settings.json and the per-problem "
                   "cache; a rerun with the same settings resumes from the cache")
    e.add_argument("--algorithms", nargs="+", default=["best_of_n", "particle_filter"], metavar="ALGORITHM",
                   help="each a name, or NAME:FIELD=VALUE,... with search fields for it alone "
                   "(self_consistency:early_stop=beta; default: best_of_n particle_filter)")
    e.add_argument("--budgets", nargs="+", type=positive_int, default=[1, 2, 4, 8], help="particles (N)")
    e.add_argument("--fresh", action="store_true", help="discard what --out-dir holds and start it over (a rerun "
                   "whose settings differ from the folder's is refused without it)")
    add_search_flags(e, skip=("algorithm", "num_particles"))


def _add_synthesize(sub, parents: list) -> None:
    y = sub.add_parser("synthesize", parents=parents, help="reasoning data from search: D-verified, "
                       "D-stitch, D-backtrack, D-but-wait as chat JSONL for SFT")
    y.add_argument("--out-dir", required=True, help="one <dataset>.jsonl each, written whole or not at all")
    y.add_argument("--datasets", nargs="+", default=["verified", "stitch", "backtrack", "but-wait"],
                   help="verified, stitch, backtrack, but-wait")
    y.add_argument("--markers", default="think", help="thought markers: think (<think>...</think>), thought "
                   "(<|thought|>...<|/thought|>) or OPEN,CLOSE")
    y.add_argument("--transition", default=None, help="the phrase after a wrong attempt or a dead branch "
                   "(default: Hold on! I made a mistake. Let me try again.)")
    y.add_argument("--wrong-attempts", type=positive_int, default=1,
                   help="stitch: wrong attempts per record; backtrack: dead branches per record (at most)")
    y.add_argument("--per-problem", type=positive_int, default=4, help="records per problem and dataset at most")
    y.add_argument("--no-dedup", action="store_true", help="keep records whose texts repeat within a problem")
    y.add_argument("--wait-phrase", default=" But wait,", help="but-wait: the phrase a particle's early end becomes")
    y.add_argument("--waits", type=positive_int, default=1, help="but-wait: wait phrases per record")
    add_search_flags(y, defaults={"num_particles": 16}, skip=("algorithm",))  # each dataset's recipe picks it


def _add_serve(sub, parents: list) -> None:
    v = sub.add_parser("serve", parents=parents, help="an OpenAI-compatible HTTP server (/v1/chat/completions, "
                       "/v1/completions); the search flags are each request's defaults")
    add_search_flags(v)
    v.add_argument("--host", default="127.0.0.1", help="the address to bind (default: this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=os.environ.get("PF_ENGINE_API_KEY"),
                   help="demand Authorization: Bearer KEY on every endpoint but /health (default: $PF_ENGINE_API_KEY)")
    v.add_argument("--served-model-name", default=None, help="the model's name in /v1/models and requests "
                   "(default: the policy folder's name)")
    v.add_argument("--max-particles", type=positive_int, default=64, help="the most particles a request may ask for")
    v.add_argument("--max-queue", type=positive_int, default=1024,
                   help="requests that may wait for admission; more are answered 429")
    v.add_argument("--max-running", type=positive_int, default=None,
                   help="requests in the running batch at most (default: as many as the KV cache holds)")
    v.add_argument("--max-model-len", type=positive_int, default=None,
                   help="prompt + max_tokens limit (default: the policy's max_position_embeddings)")
    v.add_argument("--progress-interval", type=float, default=1.0,
                   help="seconds between a streamed request's progress events")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _add_tree(sub) -> None:
    t = sub.add_parser("tree", help="draw one problem's search tree from a --tree JSONL")
    t.add_argument("tree_file", metavar="TREE.jsonl")
    t.add_argument("--problem", type=int, default=0, help="its index in the problems file (default 0)")
    t.add_argument("--out", required=True, help="the picture (PNG, SVG or PDF)")


# each subcommand's handler: args -> exit status; build_parser adds its flags
COMMANDS = {"selfcheck": selfcheck, "demo": demo, "solve": solve, "eval": evaluate_command, "tree": tree,
            "serve": serve, "synthesize": synthesize_command}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad option (already reported)
        return exc.code
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"pf-engine {args.command}: interrupted", file=sys.stderr)
        return 130
    except (PfEngineError, ValueError, OSError) as exc:
        print(f"pf-engine {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
