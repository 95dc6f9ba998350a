"""The project's one error hierarchy. Imports nothing from the package."""


class PfEngineError(Exception):
    """Base class of every error pf_engine raises on its own account."""


class OutOfBlocksError(PfEngineError):
    """The KV-cache pool has too few free blocks; the call changed nothing."""
