"""Search-tree pictures: steps left to right, each step's particles as a column of nodes.

    step 0     step 1     step 2
      o ------- o ------- o       a lineage that survived: edges as wide as the child's weight,
      o ---+--- o ------- o *     nodes coloured by reward; * the chosen answer's path (red)
      o    '--- o                 a branch that died: grey
      o                           a step no copy of survived resampling: grey

Within a column, nodes sit in their parents' order, so lineages rarely cross. Particle Gibbs'
sweeps are drawn one under the other, with the reference path's replayed steps marked.
"""

from dataclasses import dataclass
from pathlib import Path

from pf_engine.files import replace_atomically


@dataclass
class TreeLayout:
    """Where each node goes and what it is. ``x``/``y``: node -> position (step, rank in its column)."""

    x: dict[int, int]
    y: dict[int, float]
    alive: set[int]  # on a path to a final particle (or, in an earlier sweep, to its last step)
    chosen: set[int]  # the chosen answer's path
    sweeps: list[int]


def tree_layout(records: list[dict]) -> TreeLayout:
    """``records``: the tree's nodes as ``Result.tree_records`` gives them (TreeNode fields, and
    ``final`` / ``chosen`` for the final particles' newest steps and the chosen one's)."""
    by_id = {r["node"]: r for r in records}
    leaves = [r["node"] for r in records if r.get("final")]  # absent from trees written before they were kept
    chosen_leaf = next((r["node"] for r in records if r.get("chosen")), None)

    def path(node: int) -> list[int]:
        nodes = []
        while node >= 0:
            nodes.append(node)
            node = by_id[node]["parent"]
        return nodes

    sweeps = sorted({r["iteration"] for r in records})
    alive = {n for leaf in leaves for n in path(leaf)}
    for sweep in sweeps[:-1]:  # an earlier sweep's survivors: the lineages that reached its last step
        nodes = [r for r in records if r["iteration"] == sweep]
        last = max(r["depth"] for r in nodes)
        alive |= {n for r in nodes if r["depth"] == last or r["finished"] for n in path(r["node"])}
    chosen = set(path(chosen_leaf)) if chosen_leaf is not None else set()
    x, y = {}, {}
    for sweep in sweeps:
        columns: dict[int, list[dict]] = {}
        for r in records:
            if r["iteration"] == sweep:
                columns.setdefault(r["depth"], []).append(r)
        for depth in sorted(columns):
            column = sorted(columns[depth], key=lambda r: (y.get(r["parent"], -1.0), r["node"]))
            for rank, r in enumerate(column):
                x[r["node"]], y[r["node"]] = depth, float(rank)
    return TreeLayout(x, y, alive, chosen, sweeps)


def plot_tree(records: list[dict], path, title: str | None = None) -> None:
    """Draw the tree of one problem (its :func:`tree_layout` records) to ``path`` (PNG, or any
    format matplotlib writes)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ImportError("tree pictures need matplotlib (a dependency of pf-engine): pip install matplotlib") from exc
    if not records:
        raise ValueError("the tree has no nodes to draw")
    layout = tree_layout(records)
    width = max(layout.x.values()) + 1
    height = max(layout.y.values()) + 1
    fig, axes = plt.subplots(len(layout.sweeps), 1, squeeze=False,
                             figsize=(min(4 + 0.9 * width, 30), min(1.5 + 0.16 * height, 14) * len(layout.sweeps)))
    for ax, sweep in zip(axes[:, 0], layout.sweeps, strict=True):
        points, references = _draw_sweep(ax, [r for r in records if r["iteration"] == sweep], layout)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("particle")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        name = f"sweep {sweep}" if len(layout.sweeps) > 1 else (title or "search tree")
        ax.set_title(name + (" (ringed: the reference's replayed steps)" if references else ""), fontsize=10)
        fig.colorbar(points, ax=ax, label="PRM reward", fraction=0.03, pad=0.01)
    if title and len(layout.sweeps) > 1:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)


def _edges(nodes: list[dict], layout: TreeLayout) -> tuple[list, list, list, list]:
    """Segments of one sweep's dead, live (with their widths) and chosen edges."""
    column_max = {}
    for r in nodes:
        column_max[r["depth"]] = max(column_max.get(r["depth"], 0.0), r["weight"] or 0.0)
    dead_edges, live_edges, live_widths, chosen_edges = [], [], [], []
    for r in nodes:
        if r["parent"] < 0 or r["parent"] not in layout.x:
            continue
        n, p = r["node"], r["parent"]
        segment = [(layout.x[p], layout.y[p]), (layout.x[n], layout.y[n])]
        if n in layout.alive:
            live_edges.append(segment)
            live_widths.append(0.6 + 3.0 * (r["weight"] or 0.0) / (column_max[r["depth"]] or 1.0))
        else:
            dead_edges.append(segment)
        if n in layout.chosen:
            chosen_edges.append(segment)
    return dead_edges, live_edges, live_widths, chosen_edges


def _draw_sweep(ax, nodes: list[dict], layout: TreeLayout):
    """One sweep's edges and nodes on ``ax``; returns the live nodes' scatter (for the colour bar) and
    the reference's replayed nodes."""
    from matplotlib.collections import LineCollection

    dead_edges, live_edges, live_widths, chosen_edges = _edges(nodes, layout)
    ax.add_collection(LineCollection(dead_edges, colors="0.82", linewidths=0.5, zorder=1))
    ax.add_collection(LineCollection(live_edges, colors="tab:blue", linewidths=live_widths, alpha=0.6, zorder=2))
    ax.add_collection(LineCollection(chosen_edges, colors="tab:red", linewidths=2.5, zorder=3))
    dead = [r for r in nodes if r["node"] not in layout.alive]
    live = [r for r in nodes if r["node"] in layout.alive]
    ax.scatter([layout.x[r["node"]] for r in dead], [layout.y[r["node"]] for r in dead], s=8, c="0.75", zorder=4)
    points = ax.scatter([layout.x[r["node"]] for r in live], [layout.y[r["node"]] for r in live], s=18,
                        c=[r["reward"] if r["reward"] is not None else 0.5 for r in live], cmap="viridis", vmin=0,
                        vmax=1, zorder=5)
    references = [r for r in nodes if r["reference"]]
    if references:
        ax.scatter([layout.x[r["node"]] for r in references], [layout.y[r["node"]] for r in references], s=70,
                   facecolors="none", edgecolors="black", linewidths=1.2, zorder=6)
    chosen = [r for r in nodes if r["node"] in layout.chosen]
    ax.scatter([layout.x[r["node"]] for r in chosen], [layout.y[r["node"]] for r in chosen], s=30, c="tab:red",
               zorder=7)
    return points, references


def plot_tree_file(tree_jsonl, problem: int, path) -> None:
    """Draw problem ``problem`` of a tree JSONL that ``pf-engine solve --tree`` wrote."""
    import json

    records = []
    with open(tree_jsonl) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{tree_jsonl}:{number}: not valid JSON") from None
            if record.get("problem_index") == problem:
                records.append(record)
    if not records:
        raise ValueError(f"{tree_jsonl} holds no nodes of problem {problem}")
    plot_tree(records, path, title=f"problem {problem}")
