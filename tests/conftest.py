import functools
from types import SimpleNamespace

import pytest
import torch

from kvpass.methods import get_scheme, methods, scheme_class
from kvpass.rotary import Rotary


@pytest.fixture(autouse=True)
def _reset_dynamo():
    """Every test starts with Dynamo's caches empty: compiled copies of earlier tests' models would count
    towards its recompile limit, past which it silently runs the model uncompiled."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def scheme_cases():
    """(name, options) for every registered scheme and each of its test variants."""
    cases = []
    for name in methods():
        for opts in scheme_class(name).test_variants:
            cases.append(pytest.param(name, opts, id=f"{name}-" + "-".join(f"{k}{v}" for k, v in opts.items())))
    return cases


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class TensorCalibration:
    """The part of a calibration a scheme reads: per-layer tensors."""

    def __init__(self, tensors):
        self.tensors = tensors

    def layer(self, i):
        prefix = f"layers.{i}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def synthetic_activations(kv_heads, head_dim, n=256, seed=0):
    """Activations shaped like real ones (per-channel offsets, an outlier channel) for one layer."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, kv_heads, head_dim, generator=g) + torch.randn(1, kv_heads, head_dim, generator=g) * 2
    k[..., 1] *= 8
    v = torch.randn(n, kv_heads, head_dim, generator=g)
    fisher = torch.rand(n, kv_heads, head_dim, generator=g)
    layer = SimpleNamespace(k=k, v=v, k_pre=k.clone(), k_fisher=fisher, v_fisher=fisher, k_pre_fisher=fisher,
                            q_norm=torch.rand(n, kv_heads) + 1, positions=torch.arange(n))
    return SimpleNamespace(layers={0: layer})


@functools.lru_cache(maxsize=None)
def _calibration(name, opts_key, kv_heads, head_dim):
    cls = scheme_class(name)
    return TensorCalibration(cls.fit(synthetic_activations(kv_heads, head_dim), **dict(opts_key)))


def make(name, opts, kv_heads=2, head_dim=32):
    """The scheme ``name`` with ``opts``; calibrated schemes get a calibration for (kv_heads, head_dim)."""
    cls = scheme_class(name)
    if not cls.needs_calibration:
        return get_scheme(name, **opts)
    cal = _calibration(name, tuple(sorted(opts.items())), kv_heads, head_dim)
    return get_scheme(name, calibration=cal, **opts)


def rotary_for(scheme, head_dim):
    """RoPE parameters for pre-RoPE schemes (None for the others)."""
    if scheme.key_space != "pre_rope":
        return None
    return Rotary(1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)), 1.0)
