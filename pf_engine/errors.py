"""The project's one error hierarchy. Imports nothing from the package."""


class PfEngineError(Exception):
    """Base class of every error pf_engine raises on its own account."""


class OutOfBlocksError(PfEngineError):
    """The KV-cache pool has too few free blocks; the call changed nothing."""


def size(num_bytes: float) -> str:
    """A memory size for a message: MiB, or KiB below a tenth of one."""
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 / 10 else f"{num_bytes / 2**10:.1f} KiB"
