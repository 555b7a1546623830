import pytest
import torch

from kvpass.methods import get_scheme, methods, scheme_class


def scheme_cases():
    """(name, options) for every registered scheme and each of its test variants."""
    cases = []
    for name in methods():
        cls = scheme_class(name)
        if cls.needs_calibration:
            continue
        for opts in cls.test_variants:
            cases.append(pytest.param(name, opts, id=f"{name}-" + "-".join(f"{k}{v}" for k, v in opts.items())))
    return cases


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make(name, opts):
    return get_scheme(name, **opts)
