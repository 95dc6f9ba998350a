"""The search algorithms by name: ``SearchConfig``, the CLI, the server and eval read this table.

Adding an algorithm is a new module with an :class:`pf_engine.search.algorithm.Algorithm`
subclass and one ``register`` line (pf_engine/search/__init__.py lists the built-in ones).
"""

ALGORITHMS: dict[str, type] = {}  # name -> Algorithm subclass, in the order registered


def register(name: str, algorithm: type) -> type:
    """Make ``algorithm`` (an Algorithm subclass) reachable as ``SearchConfig(algorithm=name)``."""
    if not name.isidentifier():
        raise ValueError(f"an algorithm's name must be an identifier, got {name!r}")
    if name in ALGORITHMS and ALGORITHMS[name] is not algorithm:
        raise ValueError(f"algorithm {name!r} is already registered ({ALGORITHMS[name].__name__})")
    ALGORITHMS[name] = algorithm
    return algorithm
