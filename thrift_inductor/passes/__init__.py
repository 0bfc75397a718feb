"""FX passes that rewrite attention into ``thrift::attention`` (see ``attention_pass.py``)."""
from .attention_pass import ThriftAttentionPass, ThriftPatternPass, source_hash
from .sites import Site, clear_sites, sites

__all__ = ["ThriftAttentionPass", "ThriftPatternPass", "Site", "sites", "clear_sites", "source_hash"]
