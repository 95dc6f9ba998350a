"""pf_engine: particle-filtering inference-time scaling on a shared, copy-on-write paged KV cache."""

from pf_engine._native import _C
from pf_engine.errors import OutOfBlocksError, PfEngineError
from pf_engine.kv_cache import KVCache

BlockManager = _C.BlockManager

__version__ = "0.1.0"
__all__ = ["BlockManager", "BudgetForcing", "Engine", "KVCache", "OutOfBlocksError", "PfEngineError", "Result",
           "SearchConfig", "__version__"]


def __getattr__(name):
    # The engine pulls in transformers and the models: imported on first use, not with the package.
    if name in ("Engine", "Result"):
        from pf_engine import api

        return getattr(api, name)
    if name == "SearchConfig":
        from pf_engine.search.config import SearchConfig

        return SearchConfig
    if name == "BudgetForcing":
        from pf_engine.state import BudgetForcing

        return BudgetForcing
    raise AttributeError(f"module 'pf_engine' has no attribute {name!r}")
