"""Hand-written attention patterns (placeholder; filled in next)."""
def apply_patterns(graph, cfg, graph_id):
    return 0
