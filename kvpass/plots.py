"""PNG plots of kvpass results (matplotlib, Agg backend): each function takes the JSON rows a subcommand
wrote and a path, and returns the path written.

- :func:`pareto_plot` — quality (Δ perplexity vs fp16) against bits/elem, one marker per method, the
  Pareto frontier across methods drawn through (``kvpass sweep --plot``);
- :func:`memory_plot` — cache bytes of one sequence against context length (``kvpass sweep --plot``);
- :func:`latency_plot` — decode time against context length (``kvpass bench --plot``);
- :func:`passkey_heatmap` — passkey accuracy per (length, depth), one panel per setup
  (``kvpass eval passkey --plot``).
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colors(names: list[str]) -> dict:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def pareto_plot(rows: list[dict], path: str | Path, title: str = "", x: str = "bits_per_elem_at_context",
                y: str = "delta_pct") -> Path:
    """Scatter of rows (``x`` bits/elem, ``y`` Δ perplexity in %) coloured by method, labelled, with the
    Pareto frontier (rows flagged ``pareto`` or computed here) as a step line. y is symlog (linear within
    ±1%) so small and large losses both read."""
    from .sweep import pareto_front
    plt = _pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = _colors(methods)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for m in methods:
        pts = [r for r in rows if r["method"] == m]
        ax.scatter([r[x] for r in pts], [r[y] for r in pts], color=colors[m], label=m, s=36, zorder=3)
        for r in pts:
            ax.annotate(r["label"], (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(rows, x, y)
    ax.step([r[x] for r in front], [r[y] for r in front], where="post", color="black", lw=1, ls="--",
            label="Pareto frontier", zorder=2)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(0, color="grey", lw=0.5)
    ctx = rows[0].get("context") if rows else None
    ax.set_xlabel(f"bits per K/V element (every byte counted{f', at {_tokens(ctx)} tokens' if ctx else ''})")
    mode = rows[0].get("mode", "") if rows else ""
    ax.set_ylabel(f"Δ perplexity vs fp16 (%, {mode} mode)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def memory_plot(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Cache bytes of one sequence (row ``memory``: {context: bytes}) against context, log-log."""
    plt = _pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = _colors(methods)
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    seen: dict[str, int] = {}
    for r in rows:
        mem = r.get("memory") or {}
        if not mem:
            continue
        ctx = sorted(int(k) for k in mem)
        i = seen.setdefault(r["method"], 0)
        seen[r["method"]] += 1
        ax.plot(ctx, [mem[str(n)] / 2**20 for n in ctx], color=colors[r["method"]], ls=styles[i % 4],
                marker="o", ms=3, label=r["label"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache of one sequence (MiB)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def latency_plot(rows: list[dict], path: str | Path, title: str = "", key: str = "time_ms") -> Path:
    """Decode time (row ``key``, ms) against ``context``, one line per (bench, method) label."""
    plt = _pyplot()
    labels = list(dict.fromkeys(r.get("label", r["method"]) for r in rows))
    colors = _colors(labels)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for lab in labels:
        pts = sorted((r["context"], r[key]) for r in rows if r.get("label", r["method"]) == lab
                     and r.get(key) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[lab], label=lab)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("time per decode step (ms)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def passkey_heatmap(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Passkey accuracy (rows with ``setup``, ``length``, ``depth``, ``accuracy``): a depth x length heatmap
    per setup, side by side."""
    import numpy as np
    plt = _pyplot()
    labels = list(dict.fromkeys(r["setup"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(labels), figsize=(2.6 * len(labels) + 1.2, 3.2), sharey=True, squeeze=False)
    axes = list(axes[0])
    im = None
    for ax, label in zip(axes, labels):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in rows:
            if r["setup"] == label:
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("prompt length")
    axes[0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes, label="passkey accuracy")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path
