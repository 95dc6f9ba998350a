"""Triton is imported only where a Triton path is taken: on a CPU machine without it the
whole engine (copy-on-write, the native resampling pass, sampling) still runs."""

import subprocess
import sys
import textwrap

from tiny import save_tiny_policy

SEARCH_WITHOUT_TRITON = textwrap.dedent("""
    import importlib.machinery, sys

    class NoTriton(importlib.machinery.PathFinder):  # finds everything on sys.path but triton
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] == "triton":
                return None
            return super().find_spec(name, path, target)

    sys.meta_path = [NoTriton if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    import pf_engine._native
    assert not pf_engine._native.HAS_TRITON
    from pf_engine import Engine, SearchConfig

    engine = Engine(policy=sys.argv[1], prm=lambda q, steps: 0.9 if "a" in steps[-1] else 0.2,
                    kv_cache_memory=8 << 20)
    config = SearchConfig(num_particles=4, max_steps=3, max_step_tokens=5, max_new_tokens=15, stop_at_boxed=False)
    (result,) = engine.solve(["What is 2+2?"], config)
    assert len(result.particles) == 4 and result.tree
    assert "triton" not in sys.modules
    print("searched without triton")
""")


def test_a_search_runs_where_triton_cannot_be_imported(tmp_path):
    save_tiny_policy(tmp_path)
    # run outside the source tree: there its unbuilt pf_engine/ would shadow the installed package
    env_free = subprocess.run([sys.executable, "-c", SEARCH_WITHOUT_TRITON, str(tmp_path)], capture_output=True,
                              text=True, timeout=300, env={"PATH": "", "TRITON_INTERPRET": "0"}, cwd=tmp_path)
    assert env_free.returncode == 0, env_free.stderr[-3000:]
    assert "searched without triton" in env_free.stdout
