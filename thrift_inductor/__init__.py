"""thrift_inductor: ThriftAttention (selective mixed-precision FP4/FP8 attention) as a torch.compile backend.

Public surface: ``ThriftConfig``, ``attention`` (eager entry point), ``explain``. Importing the package
registers the ``thrift::attention``, ``thrift::prepass`` and ``thrift::select``
custom ops; the Inductor lowering is registered when the ``thrift``
backend is first used (Inductor itself is imported lazily).
"""
from . import kernel_ops, ops  # noqa: F401  (register thrift::attention, thrift::prepass, thrift::select)
from .api import attention
from .config import ThriftConfig
from .explain import explain

__all__ = ["ThriftConfig", "attention", "explain"]
