"""thrift_inductor: ThriftAttention (selective mixed-precision FP4/FP8 attention) as a torch.compile backend.

Public surface: ``ThriftConfig``, ``attention`` (eager entry point), ``explain``. Importing the package
registers the ``thrift::attention`` custom op; the Inductor lowering is registered when the ``thrift``
backend is first used (Inductor itself is imported lazily).
"""
from . import ops  # noqa: F401  (registers torch.ops.thrift.attention)
from .api import attention
from .config import ThriftConfig
from .explain import explain

__all__ = ["ThriftConfig", "attention", "explain"]
