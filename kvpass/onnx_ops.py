"""The ONNX translation of ``kvpass::attention``: per scheme, its append and attend written as functional
tensor code with static cache shapes, which torch.onnx turns into standard ONNX ops.

The op itself cannot go to ONNX as one node: what it does depends on the scheme (its JSON ``spec``) and on
host values (the cache length decides which tokens are quantized, which sit in a window). For export each
call is replaced by the translation of its scheme, for the step it is in:

- prefill (a fresh cache, T prompt tokens, T dynamic): attention of the prompt over its own full-precision
  keys/values (as the op does), then the whole cache computed at once: the prompt padded to the capacity,
  every row quantized, rows past what the scheme keeps masked out, ring windows filled by gathers;
- decode (one token at position p = the cache length, a tensor): the token's codes and the windows' updates
  written with ``Where`` over the static buffers (no data-dependent shape anywhere), then attention over
  the whole capacity with positions > p masked out: keys/values dequantized (uint8 codes unpacked with
  ``Div``/``BitwiseAnd``, codebook vectors by ``Gather``), ``MatMul`` + ``Softmax``.

Scales are rounded up / zero-points down in their fp16 storage exactly as :mod:`kvpass.quant` does
(``nextafter`` built from comparisons against powers of two), so the ONNX cache holds the same codes as
kvpass's. Covered: fp16, int8, kivi (1, 2, 4, 8 bits, residual > 0), million and cq (8-bit codes, keys after
RoPE). Everything else raises :class:`kvpass.export.ExportError` naming the op and scheme.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import dense_attention
from .ops import scheme_from_spec

OPSET = 18


def check_onnx_scheme(scheme) -> None:
    """Raise ExportError unless kvpass::attention with ``scheme`` has an ONNX translation."""
    from .export import ExportError
    name = scheme.name
    op = f"kvpass::attention with {scheme.describe()}"
    if name not in TRANSLATIONS:
        raise ExportError(f"{op} has no ONNX translation (covered: {', '.join(sorted(TRANSLATIONS))}); "
                          f"export it with format='pt2'")
    why = TRANSLATIONS[name].unsupported(scheme)
    if why:
        raise ExportError(f"{op} has no ONNX translation: {why}; export it with format='pt2'")


# -- the op's replacements ------------------------------------------------------------------------------
def functionalize(gm: torch.fx.GraphModule, plan, mode: str) -> None:
    """Point every ``kvpass::attention`` call of ``gm`` at the translation for ``mode``; the translations
    write their results into the state tensors (which the export step made fresh: no input is mutated)."""
    from .export import ATTENTION, ExportError
    target = prefill_attention if mode == "prefill" else decode_attention
    for node in gm.graph.nodes:
        if node.target is ATTENTION:
            if len(node.args) > 15 and node.args[15] is not None:
                raise ExportError("kvpass::attention with learned attention sinks (gpt-oss) has no ONNX "
                                  "translation yet; export format='pt2' keeps the op")
            node.target = target
    gm.recompile()


def _scheme(spec: str, k: Tensor):
    scheme, layer, capacity = scheme_from_spec(spec)
    from .methods import CacheShape
    shape = CacheShape(k.shape[0], k.shape[1], k.shape[3], capacity, k.dtype, layer)
    return scheme, shape, sorted(scheme.full_layout(shape))


def prefill_attention(buffers, length, q, k, v, start, attn_mask, scale, causal, softcap, windowed, k_pre,
                      inv_freq, rope_scale, spec, sinks=None):
    """kvpass::attention on a fresh cache (start 0): returns (B, Hq, T, D); fills ``buffers``/``length``."""
    scheme, shape, names = _scheme(spec, k)
    out = dense_attention(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask, softcap=softcap or None)
    t = k.new_ones(k.shape[2], dtype=torch.long).sum()
    new = TRANSLATIONS[scheme.name].prefill(scheme, shape, dict(zip(names, buffers)), k, v, t)
    for n, b in zip(names, buffers):
        b.copy_(new[n])
    length.copy_(t)
    return out


def decode_attention(buffers, length, q, k, v, start, attn_mask, scale, causal, softcap, windowed, k_pre,
                     inv_freq, rope_scale, spec, sinks=None):
    """kvpass::attention for one new token at position ``length``: returns (B, Hq, 1, D); updates state."""
    scheme, shape, names = _scheme(spec, k)
    p = length.reshape(())
    tr = TRANSLATIONS[scheme.name]
    new = tr.append(scheme, shape, dict(zip(names, buffers)), k, v, p)
    keys, values = tr.dense(scheme, shape, new, p + 1)
    out = masked_attention(q, keys, values, p + 1, scale, softcap or None)
    for n, b in zip(names, buffers):
        b.copy_(new[n])
    length.copy_(p + 1)
    return out


def masked_attention(q: Tensor, k: Tensor, v: Tensor, held: Tensor, scale: float, softcap) -> Tensor:
    """q (B, Hq, 1, D) over k, v (B, Hkv, C, D) of which positions < ``held`` (0-d) are real; float32 math,
    GQA by head grouping. Returns (B, Hq, 1, D) in q.dtype."""
    b, hq, t, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    qg = q.float().reshape(b, hkv, hq // hkv * t, d)
    scores = torch.matmul(qg, k.float().transpose(2, 3)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    live = torch.arange(c, device=q.device) < held
    scores = scores.masked_fill(~live, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())
    return out.reshape(b, hq, t, v.shape[-1]).to(q.dtype)


# -- shared pieces -----------------------------------------------------------------------------------------
def pad_to(x: Tensor, n: int) -> Tensor:
    """x (B, H, T, D) padded with zeros to n tokens (T <= n; T may be dynamic). A gather, not a concatenation
    with zeros of n - T tokens: that shape would make torch.export specialize T = n - 1 away."""
    pos = torch.arange(n, device=x.device)
    got = x.index_select(2, pos.clamp(max=x.shape[2] - 1))
    return torch.where((pos < x.shape[2])[:, None], got, torch.zeros_like(got))


def put_row(buf: Tensor, row: Tensor, value: Tensor, when: Tensor | None = None) -> Tensor:
    """``buf`` (B, H, N, X) with row ``row`` (0-d) replaced by value (B, H, 1, X) (if ``when``)."""
    hit = torch.arange(buf.shape[2], device=buf.device) == row
    if when is not None:
        hit = hit & when
    return torch.where(hit[:, None], value.to(buf.dtype), buf)


def ring_fill(x: Tensor, size: int, first: Tensor, end: Tensor) -> Tensor:
    """A ring buffer of ``size`` slots holding positions [first, end) of x (B, H, >=end, D), position p in
    slot p % size; slots holding none of them are zero."""
    slots = torch.arange(size, device=x.device)
    pos = slots + size * torch.div(end - 1 - slots + size, size, rounding_mode="floor") - size
    ok = (pos >= first) & (pos >= 0)
    got = x.index_select(2, pos.clamp(min=0))
    return torch.where(ok[:, None], got, torch.zeros_like(got))


def ring_at(ring: Tensor, positions: Tensor) -> Tensor:
    """The ring buffer's entries for ``positions`` (N,) int64: (B, H, N, D)."""
    return ring.index_select(2, positions % ring.shape[2])


_POW2 = [2.0 ** e for e in range(-24, 16)]          # the binary exponents of fp16 values


def _ulp16(m: Tensor, below: bool) -> Tensor:
    """The fp16 spacing above (or below) the non-negative fp16 values m (float32)."""
    pow2 = torch.tensor(_POW2, dtype=torch.float32, device=m.device)
    e = (m.unsqueeze(-1) >= pow2).to(torch.int32).sum(-1) - 25           # floor(log2 m); -25 for 0
    ulp = torch.pow(2.0, (e.clamp(min=-14) - 10).float())
    if below:
        ulp = torch.where((m == torch.pow(2.0, e.float())) & (e > -14), ulp * 0.5, ulp)
    return ulp


def round_toward(x: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """:func:`kvpass.quant.round_toward` without ``nextafter``: float32 x rounded to ``dtype`` toward +inf
    (``up``) or -inf. fp16 and fp32 only."""
    y = x.to(dtype)
    if dtype == torch.float32:
        return y
    yf = y.float()
    mag = yf.abs()
    if up:
        step = torch.where(yf >= 0, yf + _ulp16(mag, False), yf + _ulp16(mag, True))
        off = yf < x
    else:
        step = torch.where(yf > 0, yf - _ulp16(mag, True), yf - _ulp16(mag, False))
        off = yf > x
    return torch.where(off, step, yf).to(dtype)


def minmax_params(x: Tensor, bits: int, dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`kvpass.quant.minmax_params` (scale rounded up, zero down) without its host checks."""
    xf = x.float()
    zero = round_toward(xf.amin(dim, keepdim=True), dtype, up=False)
    span = xf.amax(dim, keepdim=True) - zero.float()
    scale = round_toward((span / float(2 ** bits - 1)).clamp_min(2.0 ** -24), dtype, up=True)
    return scale, zero


def quantize_minmax(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return torch.round((x.float() - zero.float()) / scale.float()).clamp(0, 2 ** bits - 1).to(torch.uint8)


def pack_planar(codes: Tensor, bits: int) -> Tensor:
    """:func:`kvpass.packing.pack_planar` for 1, 2, 4, 8 bits (codes (..., N) uint8 -> (..., N*bits/8))."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    n = codes.shape[-1] // per
    slots = codes.to(torch.int32).reshape(*codes.shape[:-1], per, n)
    weights = torch.tensor([2 ** (i * bits) for i in range(per)], dtype=torch.int32, device=codes.device)[:, None]
    return (slots * weights).sum(-2).to(torch.uint8)


def unpack_planar(packed: Tensor, bits: int) -> Tensor:
    """:func:`kvpass.packing.unpack_planar`: (..., B) uint8 -> (..., B*8/bits) codes (int32 for bits < 8).
    The byte is shifted by an exact integer division and masked with ``BitwiseAnd`` (torch.onnx types a uint8
    right shift as int8, which onnxruntime rejects)."""
    if bits == 8:
        return packed
    x = packed.to(torch.int32)
    mask = torch.tensor(2 ** bits - 1, dtype=torch.int32, device=packed.device)
    parts = [torch.bitwise_and(torch.div(x, 2 ** (i * bits), rounding_mode="floor") if i else x, mask)
             for i in range(8 // bits)]
    return torch.cat(parts, dim=-1)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    return (codes.float() * scale.float() + zero.float()).to(dtype)


# -- schemes -----------------------------------------------------------------------------------------------
class FP16:
    """Dense (B, H, C, D) buffers: rows written in place."""

    @staticmethod
    def unsupported(scheme):
        return None

    @staticmethod
    def prefill(s, shape, b, k, v, t):
        return {"k": pad_to(k, shape.capacity), "v": pad_to(v, shape.capacity)}

    @staticmethod
    def append(s, shape, b, k, v, p):
        return {"k": put_row(b["k"], p, k), "v": put_row(b["v"], p, v)}

    @staticmethod
    def dense(s, shape, b, held):
        return b["k"], b["v"]


class Int8:
    """Per-token absmax int8 codes with an fp16 scale per (token, head)."""

    @staticmethod
    def unsupported(scheme):
        return None if scheme.scale_dtype in (torch.float16, torch.float32) else \
            f"scale_dtype {scheme.scale_dtype} (fp16 and fp32 scales are covered)"

    @staticmethod
    def _quantize(s, x):
        amax = x.float().abs().amax(-1, keepdim=True)
        scale = round_toward((amax / 127.0).clamp_min(2.0 ** -24), s.scale_dtype, up=True)
        codes = torch.round(x.float() / scale.float()).clamp(-127, 127).to(torch.int8)
        return codes, scale

    @classmethod
    def prefill(cls, s, shape, b, k, v, t):
        out = {}
        for tag, x in (("k", k), ("v", v)):
            out[f"{tag}_codes"], out[f"{tag}_scale"] = cls._quantize(s, pad_to(x, shape.capacity))
        return out

    @classmethod
    def append(cls, s, shape, b, k, v, p):
        out = {}
        for tag, x in (("k", k), ("v", v)):
            codes, scale = cls._quantize(s, x)
            out[f"{tag}_codes"] = put_row(b[f"{tag}_codes"], p, codes)
            out[f"{tag}_scale"] = put_row(b[f"{tag}_scale"], p, scale)
        return out

    @staticmethod
    def dense(s, shape, b, held):
        return tuple((b[f"{t}_codes"].float() * b[f"{t}_scale"].float()).to(shape.dtype) for t in ("k", "v"))


class KIVI:
    """Keys per channel over groups of G tokens, values per token over groups of G channels, planar-packed
    codes, full-precision rings of the newest tokens (see :mod:`kvpass.methods.kivi`)."""

    @staticmethod
    def unsupported(s):
        if s.bits not in (1, 2, 4, 8):
            return f"bits={s.bits} (1, 2, 4 and 8 bits are covered)"
        if s.residual == 0:
            return "residual=0 (a full-precision window is required)"
        if s.scale_dtype not in (torch.float16, torch.float32):
            return f"scale_dtype {s.scale_dtype} (fp16 and fp32 scales are covered)"
        return None

    @staticmethod
    def _nk(s, n):
        return torch.div((n - s.residual).clamp(min=0), s.group_size, rounding_mode="floor") * s.group_size

    @staticmethod
    def _nv(s, n):
        return (n - s.residual).clamp(min=0)

    @staticmethod
    def _keys(s, x):
        """x (B, H, n*G, D) -> codes, scale, zero (B, H, n, D): per channel over G tokens."""
        b, h, t, d = x.shape
        g = x.reshape(b, h, t // s.group_size, s.group_size, d)
        scale, zero = minmax_params(g, s.bits, 3, s.scale_dtype)
        codes = quantize_minmax(g, scale, zero, s.bits).reshape(b, h, t, d)
        return pack_planar(codes, s.bits), scale.squeeze(3), zero.squeeze(3)

    @staticmethod
    def _values(s, x):
        b, h, t, d = x.shape
        g = x.reshape(b, h, t, d // s.group_size, s.group_size)
        scale, zero = minmax_params(g, s.bits, 4, s.scale_dtype)
        codes = quantize_minmax(g, scale, zero, s.bits).reshape(b, h, t, d)
        return pack_planar(codes, s.bits), scale.squeeze(4), zero.squeeze(4)

    @classmethod
    def prefill(cls, s, shape, b, k, v, t):
        c, g = shape.capacity, s.group_size
        kp, vp = pad_to(k, c), pad_to(v, c)
        out = {}
        nk, nv = cls._nk(s, t), cls._nv(s, t)
        rows_k, rows_v = b["k_codes"].shape[2], b["v_codes"].shape[2]
        if rows_k:
            codes, scale, zero = cls._keys(s, kp[:, :, :rows_k])
            keep = (torch.arange(rows_k, device=k.device) < nk)[:, None]
            gkeep = (torch.arange(rows_k // g, device=k.device) < torch.div(nk, g, rounding_mode="floor"))[:, None]
            out.update(k_codes=torch.where(keep, codes, 0), k_scale=torch.where(gkeep, scale, 0),
                       k_zero=torch.where(gkeep, zero, 0))
        else:
            out.update(k_codes=b["k_codes"], k_scale=b["k_scale"], k_zero=b["k_zero"])
        if rows_v:
            codes, scale, zero = cls._values(s, vp[:, :, :rows_v])
            keep = (torch.arange(rows_v, device=k.device) < nv)[:, None]
            out.update(v_codes=torch.where(keep, codes, 0), v_scale=torch.where(keep, scale, 0),
                       v_zero=torch.where(keep, zero, 0))
        else:
            out.update(v_codes=b["v_codes"], v_scale=b["v_scale"], v_zero=b["v_zero"])
        out["k_window"] = ring_fill(kp, b["k_window"].shape[2], nk, t)
        out["v_window"] = ring_fill(vp, b["v_window"].shape[2], nv, t)
        return out

    @classmethod
    def append(cls, s, shape, b, k, v, p):
        g, dev = s.group_size, k.device
        out = dict(b)
        rows_k, rows_v = b["k_codes"].shape[2], b["v_codes"].shape[2]
        q0, q1 = cls._nk(s, p), cls._nk(s, p + 1)
        if rows_k:      # a group of keys leaves the window when it completes
            pos = q0 + torch.arange(g, device=dev)
            group = torch.where((pos == p)[:, None], k, ring_at(b["k_window"], pos))
            codes, scale, zero = cls._keys(s, group)
            rows = torch.arange(rows_k, device=dev)
            hit = ((rows >= q0) & (rows < q0 + g) & (q1 > q0))[:, None]
            out["k_codes"] = torch.where(hit, codes.index_select(2, (rows - q0).clamp(0, g - 1)), b["k_codes"])
            gi = torch.div(q0, g, rounding_mode="floor")
            out["k_scale"] = put_row(b["k_scale"], gi, scale, q1 > q0)
            out["k_zero"] = put_row(b["k_zero"], gi, zero, q1 > q0)
        out["k_window"] = put_row(b["k_window"], p % b["k_window"].shape[2], k)
        if rows_v:      # the value residual positions back leaves the window
            lp = p - s.residual
            old = ring_at(b["v_window"], lp.clamp(min=0).reshape(1))
            codes, scale, zero = cls._values(s, old)
            out["v_codes"] = put_row(b["v_codes"], lp, codes, lp >= 0)
            out["v_scale"] = put_row(b["v_scale"], lp, scale, lp >= 0)
            out["v_zero"] = put_row(b["v_zero"], lp, zero, lp >= 0)
        out["v_window"] = put_row(b["v_window"], p % b["v_window"].shape[2], v)
        return out

    @classmethod
    def dense(cls, s, shape, b, held):
        c, d, g, dev = shape.capacity, shape.head_dim, s.group_size, b["k_window"].device
        pos = torch.arange(c, device=dev)
        parts = []
        for tag, n in (("k", cls._nk(s, held)), ("v", cls._nv(s, held))):
            codes = b[f"{tag}_codes"]
            bsz, h, rows, _ = codes.shape
            window = ring_at(b[f"{tag}_window"], pos)
            if rows == 0:
                parts.append(window)
                continue
            q = unpack_planar(codes, s.bits)
            if tag == "k":
                q = q.reshape(bsz, h, rows // g, g, d)
                x = dequantize(q, b["k_scale"][:, :, :, None], b["k_zero"][:, :, :, None], shape.dtype)
            else:
                q = q.reshape(bsz, h, rows, d // g, g)
                x = dequantize(q, b["v_scale"][..., None], b["v_zero"][..., None], shape.dtype)
            x = pad_to(x.reshape(bsz, h, rows, d), c)
            parts.append(torch.where((pos < n)[:, None], x, window))
        return tuple(parts)


class Codebook:
    """MILLION / CQ: 8-bit codebook indices per channel group, an exact sink and a full-precision ring
    (see :mod:`kvpass.methods._vq`); keys after RoPE."""

    @staticmethod
    def unsupported(s):
        if s.vq_bits != 8:
            return f"{s.vq_bits}-bit codes (8-bit codes are covered)"
        if s.key_space == "pre_rope":
            return "keys cached before RoPE"
        if s.residual == 0:
            return "residual=0 (a full-precision window is required)"
        return None

    @staticmethod
    def _book(book: Tensor, h: int) -> Tensor:
        return book.float().expand(h, -1, -1, -1) if book.shape[0] == 1 else book.float()

    @classmethod
    def encode(cls, s, x, book):
        """x (B, H, n, D) -> codes (B, H, n, G) uint8: the nearest centroid, as the scheme's encode."""
        b, h, n, d = x.shape
        c = s.vq_channels
        bk = cls._book(book, h)
        xg = x.float().reshape(b, h, n, d // c, c)
        dots = torch.einsum("bhtgc,hgkc->bhtgk", xg, bk)
        b2 = (bk * bk).sum(-1)
        return (b2[None, :, None] - 2 * dots).argmin(-1).to(torch.uint8)

    @classmethod
    def lookup(cls, s, codes, book, dtype):
        """codes (B, H, n, G) uint8 -> vectors (B, H, n, D) by one Gather from the flattened codebooks."""
        b, h, n, g = codes.shape
        k = book.shape[2]
        flat = cls._book(book, h).reshape(h * g * k, -1)
        base = (torch.arange(h, device=codes.device)[:, None] * g + torch.arange(g, device=codes.device)) * k
        idx = codes.long() + base[None, :, None, :]
        return flat[idx].reshape(b, h, n, -1).to(dtype)

    @classmethod
    def prefill(cls, s, shape, b, k, v, t):
        c, sink = shape.capacity, s.sink
        out = dict(b)
        first = torch.maximum(t - s.residual, t.clamp(max=sink))
        for tag, x in (("k", k), ("v", v)):
            xp = pad_to(x, c)
            rows = b[f"{tag}_codes"].shape[2]
            out[f"{tag}_sink"] = xp[:, :, :b[f"{tag}_sink"].shape[2]]
            if rows:
                codes = cls.encode(s, xp[:, :, sink:sink + rows], b[f"{tag}_codebook"])
                keep = (torch.arange(rows, device=x.device) + sink < first)[:, None]
                out[f"{tag}_codes"] = torch.where(keep, codes, 0)
            out[f"{tag}_window"] = ring_fill(xp, b[f"{tag}_window"].shape[2], first, t)
        return out

    @classmethod
    def append(cls, s, shape, b, k, v, p):
        out = dict(b)
        for tag, x in (("k", k), ("v", v)):
            window, codes = b[f"{tag}_window"], b[f"{tag}_codes"]
            slot = p % window.shape[2]
            leaving = p - s.residual
            if codes.shape[2]:
                new = cls.encode(s, window.index_select(2, slot.reshape(1)), b[f"{tag}_codebook"])
                out[f"{tag}_codes"] = put_row(codes, leaving - s.sink, new, leaving >= s.sink)
            out[f"{tag}_window"] = put_row(window, slot, x)
        return out

    @classmethod
    def dense(cls, s, shape, b, held):
        c, dev = shape.capacity, b["k_window"].device
        pos = torch.arange(c, device=dev)
        n = torch.maximum(held - s.residual, held.clamp(max=s.sink))
        parts = []
        for tag in ("k", "v"):
            codes, sink = b[f"{tag}_codes"], b[f"{tag}_sink"]
            x = ring_at(b[f"{tag}_window"], pos)
            if codes.shape[2]:
                vec = cls.lookup(s, codes, b[f"{tag}_codebook"], shape.dtype)
                vec = torch.cat([vec.new_zeros(*vec.shape[:2], s.sink, vec.shape[3]), vec], dim=2)
                x = torch.where((pos < n)[:, None], pad_to(vec, c), x)
            if sink.shape[2]:
                x = torch.where((pos < sink.shape[2])[:, None], pad_to(sink, c), x)
            parts.append(x)
        return tuple(parts)


TRANSLATIONS = {"fp16": FP16, "int8": Int8, "kivi": KIVI, "million": Codebook, "cq": Codebook}


# -- writing the file ---------------------------------------------------------------------------------------
def onnx_program(step, mode: str, plan):
    """torch.onnx (dynamo) export of a functionalized step, in memory (prefill with a dynamic prompt length).
    Inputs: input_ids then (decode) ``past.<state name>``; outputs: logits then ``present.<state name>``."""
    from .export import example_inputs
    names = plan.names()
    args = example_inputs(plan, mode)
    inputs = ["input_ids"] + ([] if mode == "prefill" else [f"past.{n}" for n in names])
    dyn = None
    if mode == "prefill":
        dyn = ({1: torch.export.Dim("T", min=min_prompt(plan), max=plan.capacity - 1)},)
    with torch.no_grad():
        return torch.onnx.export(step, args, dynamic_shapes=dyn, input_names=inputs,
                                 output_names=["logits"] + [f"present.{n}" for n in names], opset_version=OPSET,
                                 dynamo=True, optimize=True, verbose=False)


def min_prompt(plan) -> int:
    """The shortest prompt the exported prefill takes: 2 tokens, and the whole attention sink of codebook
    schemes (their decode step appends past the sink)."""
    return max(2, getattr(plan.scheme, "sink", 0) + 1)


__all__ = ["check_onnx_scheme", "functionalize", "prefill_attention", "decode_attention", "onnx_program",
           "TRANSLATIONS", "OPSET"]
