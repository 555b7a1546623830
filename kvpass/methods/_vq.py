"""Shared core of the codebook schemes (CQ and MILLION): vector quantization of channel groups.

A head vector of D channels is cut into G = D / c groups of c contiguous channels; each group stores the
index of its nearest centroid in a codebook of 2**b c-dimensional centroids learned offline (k-means on
calibration activations). MILLION's product quantization is the case b = 8 (256 centroids per subspace);
CQ's coupled quantization varies c and b (8c8b = 1 bit per channel). No scales, no zero-points.

Layout (B batch, H kv heads, C capacity, D head dim, R residual window, S sink, Hc = 1 or H codebook
heads):
  k_codes, v_codes        (B, H, C - R - S, G*b/8) uint8  codes bit-packed along the groups
  k_window, v_window      (B, H, min(C, R), D)           newest tokens in full precision (ring buffers)
  k_sink, v_sink          (B, H, min(C, S), D)           the first S tokens (attention sinks), exact
  k_codebook, v_codebook  (Hc, G, 2**b, c) fp16          this layer's codebooks (allocated per layer, counted)
Tokens leave the window one at a time, oldest first, so the cache does not depend on how tokens arrive.
Attention scores the quantized keys from a per-query lookup table LUT[g][j] = q_g . centroid_j (the
product of q with every centroid, once per step) instead of decoding keys; values are gathered from the
codebook.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention import attention_from_scores, merged, partial_attention
from ..errors import KVPassError, OptionError, ShapeError
from ..packing import pack_bits, unpack_bits
from .base import BufferSpec, CacheShape, KVState, Scheme, require_int
from .kivi import _ring_read, _ring_write

CODEBOOK_DTYPE = torch.float16


@dataclass
class ChannelGroupVQ(Scheme):
    """Base for codebook schemes; subclasses fix how options map to (channels per group, code bits)."""

    residual: int = 128
    sink: int = 1                            # first tokens kept exact (the attention sink; calibration skips them)
    # "layer": one codebook per layer; "head": one per KV head; "model": one learned on all layers' data
    # (MILLION's released code), copied into each layer's cache
    codebook: str = "layer"
    calibration: object = field(default=None, repr=False, compare=False)
    needs_calibration = True
    fisher_weighted = False                  # CQ weights k-means samples by Fisher information
    capturable_append = True                 # past the sink, token by token (see _append_at)

    # -- geometry -------------------------------------------------------------------------------
    @property
    def vq_channels(self) -> int:
        raise NotImplementedError

    @property
    def vq_bits(self) -> int:
        raise NotImplementedError

    def validate(self) -> None:
        require_int(self.name, "residual", self.residual, 0)
        require_int(self.name, "sink", self.sink, 0)
        if self.codebook not in ("layer", "head", "model"):
            raise OptionError(f"{self.name}: codebook must be 'layer', 'head' or 'model', got {self.codebook!r}")

    def check_shape(self, shape: CacheShape) -> None:
        c, b = self.vq_channels, self.vq_bits
        if shape.head_dim % c:
            raise ShapeError(f"{self.name}: head_dim {shape.head_dim} is not divisible by {c} channels per group")
        self._codebooks(shape)     # a calibration that fits this layer

    def layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        b, h, c, d = shape.batch, shape.kv_heads, shape.capacity, shape.head_dim
        g, n = d // self.vq_channels, max(c - self.residual - self.sink, 0)
        hc = h if self.codebook == "head" else 1
        codes = BufferSpec((b, h, n, _packed_groups(g, self.vq_bits) * self.vq_bits // 8), torch.uint8)
        window = BufferSpec((b, h, min(c, self.residual), d), shape.dtype)
        sink = BufferSpec((b, h, min(c, self.sink), d), shape.dtype)
        book = BufferSpec((hc, g, 2 ** self.vq_bits, self.vq_channels), CODEBOOK_DTYPE)
        return {"k_codes": codes, "v_codes": codes, "k_window": window, "v_window": window,
                "k_sink": sink, "v_sink": sink, "k_codebook": book, "v_codebook": book}

    # -- calibration ----------------------------------------------------------------------------
    def _codebooks(self, shape: CacheShape) -> dict[str, torch.Tensor]:
        if self.calibration is None:
            raise KVPassError(f"{self.name} needs a calibration: "
                              f"kvpass.calibrate(model, {self.name!r}, ...) and pass calibration=...")
        tensors = self.calibration.layer(shape.layer)
        hc = shape.kv_heads if self.codebook == "head" else 1
        want = (hc, shape.head_dim // self.vq_channels, 2 ** self.vq_bits, self.vq_channels)
        for t in ("k", "v"):
            book = tensors.get(f"{t}_codebook")
            if book is None or tuple(book.shape) != want:
                got = None if book is None else tuple(book.shape)
                raise ShapeError(f"{self.name}: the calibration's layer {shape.layer} {t} codebook is {got}, "
                                 f"this cache needs {want} (kv_heads={shape.kv_heads}, "
                                 f"head_dim={shape.head_dim}, codebook={self.codebook!r})")
        return tensors

    def initialize(self, state: KVState) -> None:
        tensors = self._codebooks(state.shape)
        for t in ("k", "v"):
            state[f"{t}_codebook"].copy_(tensors[f"{t}_codebook"])

    @classmethod
    def fit(cls, activations, **options) -> dict:
        """Codebooks for every layer of ``activations`` (``.layers[i].k / .v`` (N, H, D), pre-RoPE keys for
        pre-RoPE variants), k-means weighted by Fisher information when the scheme says so and the
        activations carry it. ``codebook="model"`` pools all layers' samples into one codebook."""
        s = cls(**{k: v for k, v in options.items() if k != "calibration"})
        out = {}
        for t in ("k", "v"):
            src = "k_pre" if t == "k" and s.key_space == "pre_rope" else t
            data = {i: (getattr(layer, src),
                        getattr(layer, f"{src}_fisher", None) if s.fisher_weighted else None)
                    for i, layer in activations.layers.items()}
            if s.codebook == "model":
                xs = torch.cat([x for x, _ in data.values()])
                ws = None if any(w is None for _, w in data.values()) else torch.cat([w for _, w in data.values()])
                book = cls.fit_codebooks(xs, ws, s.vq_channels, s.vq_bits, False)
                out.update({f"layers.{i}.{t}_codebook": book for i in data})
            else:
                for i, (x, w) in data.items():
                    out[f"layers.{i}.{t}_codebook"] = cls.fit_codebooks(
                        x, w, s.vq_channels, s.vq_bits, s.codebook == "head", seed=i)
        return out

    @classmethod
    def fit_codebooks(cls, x: torch.Tensor, weights: torch.Tensor | None, channels: int, bits: int,
                      per_head: bool, seed: int = 0) -> torch.Tensor:
        """k-means codebooks for samples x (N, H, D) (weights (N, H, D) or None): (Hc, G, 2**bits, c)."""
        from ..kmeans import kmeans_batched
        n, h, d = x.shape
        g = d // channels
        xs = x.float().reshape(n, h, g, channels).permute(1, 2, 0, 3)            # (H, G, N, c)
        ws = None if weights is None else weights.float().reshape(n, h, g, channels).sum(-1).permute(1, 2, 0)
        if not per_head:
            xs, ws = xs.permute(1, 0, 2, 3).reshape(1, g, h * n, channels), \
                None if ws is None else ws.permute(1, 0, 2).reshape(1, g, h * n)
        hc = xs.shape[0]
        books = kmeans_batched(xs.reshape(hc * g, -1, channels), 2 ** bits,
                               None if ws is None else ws.reshape(hc * g, -1), seed=seed)
        return books.reshape(hc, g, 2 ** bits, channels).to(CODEBOOK_DTYPE)

    # -- encode / decode ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        """x (B, H, n, D) -> nearest-centroid codes (B, H, n, G) int64 (chunked over tokens)."""
        b, h, n, d = x.shape
        c = self.vq_channels
        g = d // c
        bk = book.float().expand(h, -1, -1, -1) if book.shape[0] == 1 else book.float()   # (H, G, K, c)
        xg = x.float().reshape(b, h, n, g, c)
        codes = torch.empty(b, h, n, g, dtype=torch.int64, device=x.device)
        step = max(1, 2 ** 22 // max(1, b * h * g * bk.shape[2] * c))
        b2 = (bk * bk).sum(-1)                                                      # (H, G, K)
        for s in range(0, n, step):
            chunk = xg[:, :, s:s + step]                                            # (B, H, t, G, c)
            dots = torch.einsum("bhtgc,hgkc->bhtgk", chunk, bk)
            codes[:, :, s:s + step] = (b2[None, :, None] - 2 * dots).argmin(-1)
        return codes

    def lookup(self, codes: torch.Tensor, book: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """codes (B, H, n, G) -> vectors (B, H, n, D) in dtype."""
        b, h, n, g = codes.shape
        bk = book.float().expand(h, -1, -1, -1) if book.shape[0] == 1 else book.float()
        idx = codes.permute(1, 3, 0, 2).reshape(h, g, b * n)                         # (H, G, B*n)
        vec = torch.gather(bk, 2, idx[..., None].expand(-1, -1, -1, bk.shape[-1]))   # (H, G, B*n, c)
        c = bk.shape[-1]
        return vec.reshape(h, g, b, n, c).permute(2, 0, 3, 1, 4).reshape(b, h, n, g * c).to(dtype)

    def _codes(self, state: KVState, tag: str, n: int) -> torch.Tensor:
        g = state.shape.head_dim // self.vq_channels
        return unpack_bits(state[f"{tag}_codes"][:, :, :n], self.vq_bits, g).long()

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., G) -> bytes, padding G up to whole bytes (e.g. 2 groups of 10-bit codes: 3 bytes)."""
        g = codes.shape[-1]
        pad = _packed_groups(g, self.vq_bits) - g
        if pad:
            codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], dim=-1)
        return pack_bits(codes, self.vq_bits)

    # -- Scheme interface -----------------------------------------------------------------------
    def spans(self, length: int) -> tuple[int, int]:
        """(s, q): with ``length`` tokens cached, positions [0, s) are sink tokens, [s, q) codes and
        [q, length) the full-precision window."""
        s = min(length, self.sink)
        return s, max(length - self.residual, s)

    def exact_spans(self, length: int) -> tuple[int, int, int]:
        s, q = self.spans(length)
        return s, q, q

    def _append(self, state: KVState, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor) -> None:
        if isinstance(start, torch.Tensor):
            return self._append_at(state, k, v, start)
        end = start + k.shape[2]
        if start < self.sink:
            m = min(end, self.sink) - start
            state["k_sink"][:, :, start:start + m] = k[:, :, :m]
            state["v_sink"][:, :, start:start + m] = v[:, :, :m]
            k, v, start = k[:, :, m:], v[:, :, m:], start + m
            if start >= end:
                return
        (_, q0), (_, q1) = self.spans(start), self.spans(end)
        for tag, x in (("k", k), ("v", v)):
            window = state[f"{tag}_window"]
            if q1 > q0:
                leaving = torch.cat([_ring_read(window, q0, start), x], dim=2)[:, :, :q1 - q0]
                codes = self.encode(leaving, state[f"{tag}_codebook"])
                state[f"{tag}_codes"][:, :, q0 - self.sink:q1 - self.sink] = self._pack(codes)
            first = max(start, q1)
            if end > first:
                _ring_write(window, first, x[:, :, first - start:])

    def _append_at(self, state: KVState, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
        """:meth:`_append` from a device ``start`` (a CUDA-graph capture), token by token: the token entering
        the window at slot p % W pushes out position p - residual (same slot), which is encoded into its
        code row if it is past the sink; with no window the token is encoded directly. The sink must be
        full already (the eager prefill holds it; a device flag otherwise)."""
        from ..graphs import EAGER_ONLY, flag
        flag(start < self.sink, EAGER_ONLY)
        for i in range(k.shape[2]):
            p = (start + i).reshape(1)
            for tag, x in (("k", k[:, :, i:i + 1]), ("v", v[:, :, i:i + 1])):
                codes, window, book = state[f"{tag}_codes"], state[f"{tag}_window"], state[f"{tag}_codebook"]
                if self.residual == 0:
                    row = (p - self.sink).clamp(0, max(codes.shape[2] - 1, 0))   # past the capacity: flagged
                    codes.index_copy_(2, row, self._pack(self.encode(x, book)))
                    continue
                slot = p % window.shape[2]
                leaving = p - self.residual
                row = (leaving - self.sink).clamp(0, max(codes.shape[2] - 1, 0))
                if codes.shape[2]:
                    new = self._pack(self.encode(window.index_select(2, slot), book))
                    keep = codes.index_select(2, row)
                    codes.index_copy_(2, row, torch.where((leaving >= self.sink).reshape(1, 1, 1, 1), new, keep))
                window.index_copy_(2, slot, x)

    def decode_raw(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        length, dtype = state.length, state.shape.dtype
        s, q = self.spans(length)
        return tuple(torch.cat([state[f"{t}_sink"][:, :, :s],
                                self.lookup(self._codes(state, t, q - s), state[f"{t}_codebook"], dtype),
                                _ring_read(state[f"{t}_window"], q, length)], dim=2) for t in ("k", "v"))

    def decode(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key_space == "pre_rope":
            return Scheme.decode(self, state)
        return self.decode_raw(state)

    def attend(self, state: KVState, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
               attn_mask: torch.Tensor | None = None, sliding_window: int | None = None,
               softcap: float | None = None, return_lse: bool = False):
        """Quantized keys scored through the lookup table (never decoded), the window exactly; the two
        parts merged by log-sum-exp (``return_lse``: see :meth:`Scheme.attend`)."""
        if self.key_space == "pre_rope":   # RoPE mixes channels across groups: no lookup table
            return Scheme.attend(self, state, q, scale=scale, causal=causal, attn_mask=attn_mask,
                                 sliding_window=sliding_window, softcap=softcap, return_lse=return_lse)
        length, dev, dtype = state.length, q.device, state.shape.dtype
        s, n = self.spans(length)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        qpos = torch.arange(length - q.shape[2], length, device=dev)
        kw = dict(scale=scale, causal=causal, attn_mask=attn_mask, sliding_window=sliding_window,
                  softcap=softcap)
        parts = []
        if s:
            parts.append(partial_attention(q, state["k_sink"][:, :, :s], state["v_sink"][:, :, :s],
                                           torch.arange(s, device=dev), qpos, **kw))
        if n > s:
            scores = self.lut_scores(q, self._codes(state, "k", n - s), state["k_codebook"])
            values = self.lookup(self._codes(state, "v", n - s), state["v_codebook"], dtype)
            parts.append(attention_from_scores(scores, values, torch.arange(s, n, device=dev), qpos, **kw))
        if length > n:
            parts.append(partial_attention(q, _ring_read(state["k_window"], n, length),
                                           _ring_read(state["v_window"], n, length),
                                           torch.arange(n, length, device=dev), qpos, **kw))
        return merged(parts, q.dtype, return_lse)

    def lut_scores(self, q: torch.Tensor, codes: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        """q (B, Hq, T, D) . keys given by codes (B, H, n, G): (B, Hq, T, n) float32 via LUT[g][j]."""
        b, hq, t, d = q.shape
        h, g = codes.shape[1], codes.shape[3]
        bk = book.float().expand(h, -1, -1, -1) if book.shape[0] == 1 else book.float()   # (H, G, K, c)
        qg = q.float().reshape(b, h, hq // h, t, g, d // g)
        lut = torch.einsum("bhrtgc,hgkc->bhrtgk", qg, bk)                              # (B, H, r, T, G, K)
        idx = codes.permute(0, 1, 3, 2)[:, :, None, None].expand(-1, -1, hq // h, t, -1, -1)   # (B,H,r,T,G,n)
        scores = torch.gather(lut, 5, idx).sum(4)                                     # (B, H, r, T, n)
        return scores.reshape(b, hq, t, -1)

    def error_bound(self, k: torch.Tensor, v: torch.Tensor):
        """Each quantized group errs by at most its distance to the nearest centroid (per element, that
        L2 distance bounds every channel); sink and window tokens are exact."""
        shape = CacheShape(k.shape[0], k.shape[1], k.shape[3], k.shape[2], k.dtype)
        books = self._codebooks(shape)
        s, n = self.spans(k.shape[2])
        out = []
        for t, x in (("k", k), ("v", v)):
            bound = torch.zeros_like(x, dtype=torch.float32)
            if n > s:
                book = books[f"{t}_codebook"]
                xq = x[:, :, s:n]
                near = self.lookup(self.encode(xq, book), book, torch.float32)
                dist = (near - xq.float()).reshape(*near.shape[:3], -1, self.vq_channels)
                dist = dist.norm(dim=-1, keepdim=True).expand_as(dist).reshape(near.shape)
                eps = torch.finfo(x.dtype).eps
                bound[:, :, s:n] = dist * (1 + 1e-4) + 1e-5 + (xq.float().abs() + dist) * eps
            out.append(bound)
        return tuple(out)


def _packed_groups(groups: int, bits: int) -> int:
    """The smallest number of codes >= groups whose bits fill whole bytes."""
    n = groups
    while n * bits % 8:
        n += 1
    return n
