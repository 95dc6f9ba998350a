"""pf_engine: particle-filtering inference-time scaling on a shared, copy-on-write paged KV cache."""

from pf_engine._native import _C
from pf_engine.errors import OutOfBlocksError, PfEngineError
from pf_engine.kv_cache import KVCache

BlockManager = _C.BlockManager

__version__ = "0.1.0"
__all__ = ["BlockManager", "KVCache", "OutOfBlocksError", "PfEngineError", "__version__"]
