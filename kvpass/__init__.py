"""kvpass: compress the KV cache of any traced LLM (KIVI, KVQuant, QAQ, CQ, MILLION; DuoAttention heads).

Public API so far: the scheme registry (:func:`methods`, :func:`get_scheme`), the per-layer compressed
state (:class:`KVState`, :class:`CacheShape`) and the errors. The graph pass (``kvpass.compile``) builds
on these.
"""

from .errors import (CapacityError, KVPassError, NonFiniteError, OptionError, ShapeError,
                     UnknownMethodError)
from .methods import BufferSpec, CacheShape, KVState, Scheme, get_scheme, methods, policies, register
from . import ops as _ops  # noqa: F401  (registers the kvpass:: custom ops)
from .compiler import compile
from .report import Report, report
from .calibration import Calibration, CalibrationMismatchError
from .fit import calibrate
from .export import export          # torch only; onnx/onnxruntime are imported when an ONNX file is written

__version__ = "0.1.0"

__all__ = ["compile", "calibrate", "export", "Calibration", "CalibrationMismatchError", "report", "Report", "BufferSpec", "CacheShape", "CapacityError", "KVPassError", "KVState", "NonFiniteError",
           "OptionError", "Scheme", "ShapeError", "UnknownMethodError", "get_scheme", "methods", "policies", "register"]
