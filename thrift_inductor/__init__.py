"""thrift_inductor: ThriftAttention (selective mixed-precision FP4/FP8 attention) as a torch.compile backend.

Public surface: ``ThriftConfig``, ``attention`` (eager entry point), ``explain``. Importing the package
registers the ``thrift::*`` custom ops; the Inductor lowering is registered when the ``thrift`` backend
is first used.
"""
from .config import ThriftConfig

__all__ = ["ThriftConfig"]
