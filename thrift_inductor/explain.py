"""``thrift_inductor.explain``: which attention sites the ``thrift`` backend rewrote, and why not the rest."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:   # the passes pull in Inductor (seconds): imported when explain() runs, not with the package
    from .passes.sites import Site

_COLUMNS = ("graph", "node", "op", "q_shape", "kv_shape", "dtype", "causal", "result")


@dataclasses.dataclass
class ExplainReport:
    sites: list[Site]
    output: Any = None          # what the compiled call returned

    @property
    def rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)

    @property
    def skipped(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sites:
            if not s.rewritten:
                out[s.reason] = out.get(s.reason, 0) + 1
        return out

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    def rows(self) -> list[tuple[str, ...]]:
        def shape(t):
            return "x".join(str(d) for d in t)
        return [(str(s.graph), s.node, s.op.replace("aten.", ""), shape(s.q_shape), shape(s.kv_shape), s.dtype,
                 "yes" if s.is_causal else "no", "rewritten" if s.rewritten else f"skipped: {s.reason}")
                for s in self.sites]

    def __str__(self) -> str:
        rows = [_COLUMNS] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        config = self.sites[0].config if self.sites else "-"
        lines.append(f"{self.rewritten} of {len(self.sites)} attention sites rewritten (config {config})")
        return "\n".join(lines)


def explain(model_or_fn: Callable, *inputs, **compile_kwargs) -> ExplainReport:
    """Compile ``model_or_fn`` with ``backend="thrift"`` (fresh Dynamo state), run it on ``inputs``
    under ``torch.no_grad()`` and report every attention site the pass inspected.

    ``compile_kwargs`` go to ``torch.compile`` (``options={"thrift.format": "fp8"}``, ``dynamic=...``).
    The FX graph cache is switched off for this compile so the pass really runs.
    """
    from .backend import thrift_backend
    from .passes.sites import clear_sites, sites
    compile_kwargs = dict(compile_kwargs)
    compile_kwargs.pop("backend", None)
    options = dict(compile_kwargs.pop("options", None) or {})
    options.setdefault("fx_graph_cache", False)
    torch._dynamo.reset()
    clear_sites()
    compiled = torch.compile(model_or_fn, backend=thrift_backend, options=options, **compile_kwargs)
    with torch.no_grad():
        out = compiled(*inputs)
    report = ExplainReport(sites=sites(), output=out)
    torch._dynamo.reset()
    return report
