"""``kvpass.report(model)``: what the pass found and rewrote, and what the compressed cache costs."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

import torch

from .errors import KVPassError


@dataclass
class Report:
    """One row per attention site plus cache totals. ``str(report)`` is a table; ``to_dict()`` JSON.

    cache_bytes: bytes of every compressed buffer allocated (all sites, current batch, full capacity);
    dense_bytes: what the same K/V at the same capacity take uncompressed in the model dtype;
    bits_per_element: 8 * cache_bytes / K-and-V elements at capacity (every byte counted);
    bytes_per_token: cache_bytes / (batch * capacity).
    """

    method: str
    options: dict
    capacity: int
    batch: int
    rows: list = field(default_factory=list)
    cache_bytes: int = 0
    dense_bytes: int = 0
    bits_per_element: float | None = None
    ranks: int = 1                  # sequence-parallel ranks: the cache figures are this rank's slice
    bytes_per_token: float | None = None

    @property
    def sites_found(self) -> int:
        return len(self.rows)

    @property
    def sites_rewritten(self) -> int:
        return sum(r["rewritten"] for r in self.rows)

    def to_dict(self) -> dict:
        """A JSON-ready dict of the report."""
        d = asdict(self)
        d.update(sites_found=self.sites_found, sites_rewritten=self.sites_rewritten)
        return d

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        table = Table(title=f"kvpass: {self.method}({opts}) — {self.sites_rewritten}/{self.sites_found} "
                            f"attention sites rewritten", title_justify="left")
        for col in ("layer", "module", "pattern", "heads", "kv", "dim", "past k/v", "gqa", "rope", "mask",
                    "rewritten"):
            table.add_column(col, overflow="fold")
        for r in self.rows:
            table.add_row(str(r["layer"]), r["key"], r["pattern"], str(r["heads"]), str(r["kv_heads"]),
                          str(r["head_dim"]), r["kv_source"], r["gqa"], r["rope"], r["mask"],
                          "yes" if r["rewritten"] else f"no: {r['reason']}")
        buf = io.StringIO()
        console = Console(file=buf, width=140, force_terminal=False)
        console.print(table)
        if self.bits_per_element is None:
            console.print("cache: not allocated yet (sites and buffers appear when the model first runs)")
        else:
            where = f" on this rank (1 of {self.ranks}, sequence-parallel: its slice of the tokens)" \
                if self.ranks > 1 else ""
            console.print(f"cache{where}: {self.cache_bytes / 2**20:.2f} MiB for batch {self.batch} x "
                          f"{self.capacity} tokens ({self.bytes_per_token:.0f} B/token) vs "
                          f"{self.dense_bytes / 2**20:.2f} MiB dense: {self.bits_per_element:.3f} bits/elem, "
                          f"{self.dense_bytes / max(self.cache_bytes, 1):.2f}x smaller")
        return buf.getvalue().rstrip()


def _option_text(v):
    """Options as JSON-able values: dtypes by name, a calibration by what it was made with."""
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "method") and hasattr(v, "model"):
        return f"calibration({v.method}, {v.model.get('architecture')})"
    if hasattr(v, "describe"):          # a policy's inner scheme: kivi(bits=2, ...)
        return v.describe()
    return type(v).__name__


def report(model) -> Report:
    """The :class:`Report` of a model returned by :func:`kvpass.compile`."""
    state = getattr(model, "_kvpass", None)
    if state is None:
        raise KVPassError("this model was not compiled by kvpass.compile; nothing to report")
    manager = state.manager
    rows = sorted((asdict(r) for r in state.records.values()),
                  key=lambda r: (r["layer"] is None, r["layer"] or 0, r["key"]))
    opts = {k: _option_text(v) for k, v in manager.scheme.options().items()}
    rep = Report(method=manager.scheme.name, options=opts, capacity=manager.capacity, batch=0, rows=rows)
    states = list(manager.states.values())
    if states:
        from .distributed import held_shape, ranks_of
        shapes = [held_shape(st) for st in states]          # a sequence-parallel rank: its slice of the tokens
        elements = sum(sh.elements for sh in shapes)
        rep.batch = states[0].shape.batch
        rep.ranks = ranks_of(manager.scheme)
        rep.cache_bytes = sum(st.nbytes for st in states)
        rep.dense_bytes = sum(sh.elements * torch.empty((), dtype=sh.dtype).element_size() for sh in shapes)
        rep.bits_per_element = 8 * rep.cache_bytes / elements
        rep.bytes_per_token = rep.cache_bytes / (rep.batch * shapes[0].capacity)
    return rep
