"""The public entry point: ``Engine(policy, prm).solve(problems, SearchConfig(...))``."""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pf_engine.answers import extract_answer, weighted_vote
from pf_engine.engine import ParticleEngine, TreeNode
from pf_engine.errors import OutOfBlocksError
from pf_engine.models import load_model
from pf_engine.models.llama import head_dim
from pf_engine.prm import ClassHeadPRM, RulePRM, TokenPairPRM
from pf_engine.runner import ModelRunner
from pf_engine.search import SearchConfig, run_search

DEFAULT_KV_MEMORY_CPU = 1 << 30


@dataclass
class Result:
    """One problem's outcome. ``tree`` holds every step of every particle, alive and dead.

    ``stats`` are those of the batch the problem ran in (``stats["batch"]`` numbers it):
    tokens generated, PRM tokens prefilled, policy tokens prefilled for ancestor sampling,
    peak KV blocks of the policy and of a model PRM, seconds per phase.
    """

    question: str
    answer: str | None  # the chosen text's answer (last \\boxed{...}, else last number), or the vote's winner
    text: str  # the chosen particle's full answer
    steps: list[str]  # its steps
    weights: list[float]  # final weights of all particles
    particles: list[str]  # final texts of all particles
    tree: list[TreeNode]
    leaves: list[int] = field(default_factory=list)  # tree node of each final particle's newest step
    chosen: int = 0  # index of the particle the answer came from
    stats: dict = field(default_factory=dict)

    def tree_records(self) -> list[dict]:
        return [asdict(node) for node in self.tree]

    def write_tree(self, path: str | Path) -> None:
        """The search tree as JSONL, one step per line."""
        with open(path, "w") as f:
            for record in self.tree_records():
                f.write(json.dumps(record) + "\n")


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 / 10 else f"{num_bytes / 2**10:.1f} KiB"


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim(config) * dtype.itemsize


class Engine:
    """A policy model and an optional PRM, each with its own paged KV cache.

    Parameters
    ----------
    policy : path of a Hugging Face checkpoint folder; default: the embedded SmolLM2-135M-Instruct.
    prm : None, a callable ``f(question, steps) -> reward in [0, 1]``, or a checkpoint folder:
        a class-head PRM (Qwen2.5-Math-PRM; ``prm_separator`` marks step ends) or a language
        model read as a token-pair PRM (``prm_step_tag``, ``prm_good``, ``prm_bad``).
    kv_cache_memory : bytes for the KV caches (policy and PRM together); default 1 GiB on the CPU,
        half the free GPU memory on CUDA.
    """

    def __init__(self, policy=None, prm=None, device="cpu", kv_cache_memory: int | None = None,
                 block_size: int = 16, backend: str = "auto", dtype: torch.dtype | None = None,
                 prm_separator: str = "<extra_0>", prm_step_tag: str | None = None,
                 prm_good: str | None = None, prm_bad: str | None = None):
        from transformers import AutoTokenizer

        if prm is not None and not callable(prm) and not isinstance(prm, (str, Path)):
            raise TypeError(f"prm must be None, a callable or a checkpoint path, got {type(prm).__name__}")
        if policy is None:
            from pf_engine.models.smollm2 import smollm2_path

            policy = smollm2_path()
        device = torch.device(device)
        policy_model, policy_config = load_model(policy, dtype=dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(policy)
        prm_model = prm_config = prm_tokenizer = None
        if isinstance(prm, (str, Path)):
            prm_model, prm_config = load_model(prm, dtype=dtype, device=device)
            prm_tokenizer = AutoTokenizer.from_pretrained(prm)

        if kv_cache_memory is None:
            kv_cache_memory = (torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda"
                               else DEFAULT_KV_MEMORY_CPU)
        per_token = [_kv_bytes_per_token(policy_config, next(policy_model.parameters()).dtype)]
        if prm_model is not None:
            per_token.append(_kv_bytes_per_token(prm_config, next(prm_model.parameters()).dtype))
        # The policy's and the PRM's caches get the same number of blocks: one block of
        # the budget is a block of each.
        bytes_per_block = sum(per_token) * block_size
        num_blocks = int(kv_cache_memory // bytes_per_block)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory ({_size(kv_cache_memory)}) holds no KV block: one block of "
                             f"{block_size} tokens takes {_size(bytes_per_block)}")
        self.block_size = block_size
        self.bytes_per_block = bytes_per_block
        self.kv_cache_memory = kv_cache_memory
        self.policy = ModelRunner(policy_model, num_blocks, block_size, backend)
        prm_engine = None
        if prm_model is not None:
            runner = ModelRunner(prm_model, num_blocks, block_size, backend)
            if hasattr(prm_model, "class_logits"):
                prm_engine = ClassHeadPRM(runner, _single_token(prm_tokenizer, prm_separator, "prm_separator"))
            else:
                if None in (prm_step_tag, prm_good, prm_bad):
                    raise ValueError("a language-model PRM needs prm_step_tag, prm_good and prm_bad")
                prm_engine = TokenPairPRM(runner, *(_single_token(prm_tokenizer, t, name) for t, name in (
                    (prm_step_tag, "prm_step_tag"), (prm_good, "prm_good"), (prm_bad, "prm_bad"))))
        elif prm is not None:
            prm_engine = RulePRM(prm)
        self.core = ParticleEngine(self.policy, tokenizer, prm_engine, prm_tokenizer)

    def solve(self, problems, config: SearchConfig | None = None, progress=None) -> list["Result"]:
        """Solve every problem; ``problems`` are strings or dicts with "problem" or "question".

        Problems run together as far as the KV cache holds them all at the worst
        case; the rest wait for the next batch. ``progress(num_done)`` is called
        after each batch.
        """
        config = config or SearchConfig()
        questions = [_question(p, i) for i, p in enumerate(problems)]
        if config.algorithm != "self_consistency" and self.core.prm is None:
            raise ValueError(f"{config.algorithm} needs a PRM: pass prm= to the Engine")
        needs = [self._blocks_needed(q, config) for q in questions]
        capacity = self.policy.manager.num_blocks
        for i, need in enumerate(needs):
            if need > capacity:
                raise OutOfBlocksError(
                    f"problem {i} needs {need} KV blocks ({_size(need * self.bytes_per_block)}) at worst with "
                    f"{config.num_particles} particles and max_new_tokens={config.max_new_tokens}, but "
                    f"kv_cache_memory ({_size(self.kv_cache_memory)}) holds {capacity}: raise kv_cache_memory "
                    f"or lower num_particles / max_new_tokens")
        results: list[Result] = []
        start = batch = 0
        while start < len(questions):
            end, used = start, 0
            while end < len(questions) and used + needs[end] <= capacity:
                used += needs[end]
                end += 1
            self.core.stats |= {"peak_blocks": 0, "peak_prm_blocks": 0}  # peaks are per batch
            before = dict(self.core.stats)
            began = time.perf_counter()
            outcomes = run_search(self.core, questions[start:end], list(range(start, end)), config)
            stats = {k: v if k.startswith("peak_") else v - before[k] for k, v in self.core.stats.items()}
            stats |= {"batch": batch, "problems_in_batch": end - start, "batch_seconds": time.perf_counter() - began}
            for key, (question, outcome) in enumerate(zip(questions[start:end], outcomes, strict=True), start):
                results.append(self._result(question, outcome, config, key, stats))
            start, batch = end, batch + 1
            if progress:
                progress(len(results))
        return results

    def _blocks_needed(self, question: str, config: SearchConfig) -> int:
        """Worst-case blocks of one problem: its prompt once, then every particle's own tokens.

        Ancestor sampling adds a transient copy of every particle carrying the
        reference's future, and a reference spliced onto a longer prefix (up to
        twice the tokens): 2N + 1 particles' worth.
        """
        bs = self.block_size
        prompt_blocks = -(-len(self.core.prompt_ids(question)) // bs)
        copies = config.num_particles
        if config.algorithm == "particle_gibbs" and config.ancestor_sampling:
            copies = 2 * config.num_particles + 1
        need = prompt_blocks + copies * (-(-config.max_new_tokens // bs) + 1)
        if self.core.prm_runner is not None:
            # PRM tokens: its own tokenization (up to twice the policy's) and one marker per step
            prm_own = -(-(2 * config.max_new_tokens + config.max_steps) // bs) + 1
            need = max(need, 2 * prompt_blocks + copies * prm_own)
        return need

    def _result(self, question, outcome, config, key, stats) -> Result:
        texts = ["".join(p.steps) for p in outcome.particles]
        weights = outcome.weights
        answers = [extract_answer(t) for t in texts]
        if config.final_answer == "vote" or config.algorithm == "self_consistency":
            answer = weighted_vote(answers, weights)
            chosen = next((i for i, a in enumerate(answers) if a is not None and a == answer), int(np.argmax(weights)))
        elif config.final_answer == "sampled":
            rng = np.random.default_rng([config.seed, key])
            chosen = int(rng.choice(len(weights), p=np.asarray(weights) / np.sum(weights)))
            answer = answers[chosen]
        else:
            chosen = int(np.argmax(weights))
            answer = answers[chosen]
        return Result(question, answer, texts[chosen], list(outcome.particles[chosen].steps), weights, texts,
                      outcome.tree, [p.node for p in outcome.particles], chosen, dict(stats))


def _question(problem, index: int) -> str:
    if isinstance(problem, str):
        text = problem
    elif isinstance(problem, dict):
        text = problem.get("problem", problem.get("question"))
        if text is None:
            raise ValueError(f"problem {index} has neither a 'problem' nor a 'question' field: {sorted(problem)}")
    else:
        raise TypeError(f"problem {index} must be a string or a dict, got {type(problem).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"problem {index} is empty")
    return text


def _single_token(tokenizer, text: str, name: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{name} {text!r} is {len(ids)} tokens for the PRM's tokenizer; it must be exactly one")
    return ids[0]
