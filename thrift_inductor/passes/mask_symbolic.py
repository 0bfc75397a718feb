"""Interpret a mask's FX subgraph symbolically: every tensor becomes one sympy expression of its indices.

A mask that is a pure function of shapes (``arange`` comparisons, HF's mask functions, index arithmetic
with cache positions...) is, element for element, a formula in the element's coordinates. Here each
tensor value is ``expr(t_0, t_1, ...)`` where ``t_k`` is the index along the k-th dim *from the right*
(so broadcasting needs no bookkeeping: ``[L, 1]`` and ``[1, L]`` already share ``t_0`` / ``t_1``), and a
size-1 dim never appears in its expression (its index is substituted by 0). Bool tensors are sympy
booleans, numeric tensors sympy expressions (``where`` becomes ``Piecewise``). Sizes are ints or the
graph's own size symbols (``meta['val']`` shapes), so nothing is ever materialised: the cost depends
on the graph, not on N.

Anything not understood raises ``Unproven`` (the site then stays stock).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator

import sympy
import torch
from torch.fx import Node

aten = torch.ops.aten
prims = torch.ops.prims


class Unproven(Exception):
    """The mask uses something the prover does not model; the message is the reason."""


@functools.lru_cache(maxsize=None)
def index_symbol(k: int) -> sympy.Symbol:
    """Index along the k-th dim from the right (k = 0: keys, k = 1: queries of a score-shaped mask)."""
    return sympy.Symbol(f"_thrift_t{k}", integer=True, nonnegative=True)


def is_index_symbol(s) -> bool:
    return isinstance(s, sympy.Symbol) and s.name.startswith("_thrift_t")


@dataclasses.dataclass(frozen=True)
class Sym:
    expr: sympy.Basic         # sympy Boolean when is_bool, else a sympy Expr (maybe Piecewise)
    shape: tuple              # sympy sizes
    is_bool: bool


def to_sympy(x):
    """A size / scalar (int, float, bool, SymInt, SymFloat, SymBool) as a sympy object."""
    if isinstance(x, bool):
        return sympy.true if x else sympy.false
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, float):
        if math.isnan(x):
            raise Unproven("nan constant")
        return sympy.oo if x == math.inf else -sympy.oo if x == -math.inf else sympy.Float(x)
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return sympy.sympify(x.node.expr)
    raise Unproven(f"scalar {x!r}")


def _shape(node: Node) -> tuple:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise Unproven(f"{node.name} has no tensor metadata")
    return tuple(to_sympy(s) for s in val.shape)


def _normalise(expr, shape: tuple):
    """Substitute index 0 for size-1 dims and reject indices the tensor does not have."""
    rank = len(shape)
    subs = {index_symbol(k): 0 for k, size in enumerate(reversed(shape)) if size == 1}
    if subs:
        expr = expr.subs(subs)
    for s in expr.free_symbols:
        if is_index_symbol(s) and int(s.name[len("_thrift_t"):]) >= rank:
            raise Unproven("index symbol outside the tensor's rank")
    return expr


def _remap(expr, in_rank: int, out_rank: int, mapping: dict):
    """Move input dim p to output dim mapping[p] (simultaneous substitution of index symbols)."""
    subs = {index_symbol(in_rank - 1 - p): index_symbol(out_rank - 1 - q) for p, q in mapping.items()}
    return expr.subs(subs, simultaneous=True) if subs else expr


def as_number(v: Sym):
    """A numeric view of ``v`` (torch promotes bool to 1 / 0 in arithmetic)."""
    return sympy.Piecewise((1, v.expr), (0, True)) if v.is_bool else v.expr


def as_bool(v: Sym):
    return v.expr if v.is_bool else sympy.Ne(v.expr, 0)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# --------------------------------------------------------------------------- op handlers
# Each handler gets (node, args, kwargs) with Nodes already replaced by Sym (tensors) or sympy scalars,
# and returns (expr, is_bool); the caller attaches the node's shape and normalises.
_HANDLERS: dict = {}


def _handles(*targets):
    def register(fn):
        for t in targets:
            _HANDLERS[t] = fn
        return fn
    return register


def _scalar(x):
    if isinstance(x, Sym):
        return x
    return Sym(to_sympy(x), (), isinstance(x, bool) or x in (sympy.true, sympy.false))


def _is_bool_dtype(dtype) -> bool:
    return dtype is torch.bool


@_handles(prims.iota.default)
def _iota(node, args, kw):
    return to_sympy(kw.get("start", 0)) + to_sympy(kw.get("step", 1)) * index_symbol(0), False


@_handles(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(node, args, kw):
    start, step = (0, 1) if node.target is aten.arange.default else (args[0], args[2] if len(args) > 2 else 1)
    return to_sympy(start) + to_sympy(step) * index_symbol(0), False


@_handles(aten.full.default, aten.scalar_tensor.default, aten.zeros.default, aten.ones.default)
def _constant(node, args, kw):
    value = {aten.zeros.default: 0, aten.ones.default: 1}.get(node.target)
    if value is None:
        value = args[1] if node.target is aten.full.default else args[0]
    dtype = kw.get("dtype", node.meta["val"].dtype)
    if _is_bool_dtype(dtype):
        return (sympy.true if bool(value) else sympy.false), True
    return to_sympy(float(value) if isinstance(value, bool) else value), False


def _binary(fn):
    def handler(node, args, kw):
        a, b = _scalar(args[0]), _scalar(args[1])
        if a.is_bool and b.is_bool:
            raise Unproven(f"arithmetic on two bool tensors ({node.target})")
        alpha = to_sympy(kw.get("alpha", 1))
        return fn(as_number(a), as_number(b), alpha), False
    return handler


_handles(aten.add.Tensor, aten.add.Scalar)(_binary(lambda a, b, alpha: a + alpha * b))
_handles(aten.sub.Tensor, aten.sub.Scalar)(_binary(lambda a, b, alpha: a - alpha * b))
_handles(aten.rsub.Tensor, aten.rsub.Scalar)(_binary(lambda a, b, alpha: b - alpha * a))
_handles(aten.mul.Tensor, aten.mul.Scalar)(_binary(lambda a, b, alpha: a * b))


@_handles(aten.neg.default)
def _neg(node, args, kw):
    return -as_number(args[0]), False


_COMPARISONS = {
    "le": sympy.Le, "lt": sympy.Lt, "ge": sympy.Ge, "gt": sympy.Gt, "eq": sympy.Eq, "ne": sympy.Ne,
}
for _name, _rel in _COMPARISONS.items():
    for _overload in ("Tensor", "Scalar"):
        _handles(getattr(getattr(aten, _name), _overload))(
            (lambda rel: lambda node, args, kw: (rel(as_number(_scalar(args[0])), as_number(_scalar(args[1]))), True))(_rel))


def _logical(fn):
    def handler(node, args, kw):
        vals = [_scalar(a) for a in args[:2]]
        if node.target in _BITWISE and not all(v.is_bool for v in vals):
            raise Unproven(f"bitwise op on integers ({node.target})")
        return fn(*[as_bool(v) for v in vals]), True
    return handler


_BITWISE = {aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_xor.Tensor, aten.bitwise_not.default}
_handles(aten.logical_and.default, aten.bitwise_and.Tensor)(_logical(sympy.And))
_handles(aten.logical_or.default, aten.bitwise_or.Tensor)(_logical(sympy.Or))
_handles(aten.logical_xor.default, aten.bitwise_xor.Tensor)(_logical(sympy.Xor))
_handles(aten.logical_not.default, aten.bitwise_not.default)(_logical(sympy.Not))


def _select(cond, a: Sym, b: Sym):
    if a.is_bool and b.is_bool:
        return sympy.Or(sympy.And(cond, a.expr), sympy.And(sympy.Not(cond), b.expr)), True
    return sympy.Piecewise((as_number(a), cond), (as_number(b), True)), False


@_handles(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(node, args, kw):
    return _select(as_bool(args[0]), _scalar(args[1]), _scalar(args[2]))


@_handles(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(node, args, kw):
    return _select(as_bool(args[1]), _scalar(args[2]), args[0])


def _triangle(lower: bool):
    def handler(node, args, kw):
        x = args[0]
        k = to_sympy(args[1] if len(args) > 1 else kw.get("diagonal", 0))
        d = index_symbol(0) - index_symbol(1)                 # j - i on the last two dims
        inside = sympy.Le(d, k) if lower else sympy.Ge(d, k)
        if x.is_bool:
            return sympy.And(inside, x.expr), True
        return sympy.Piecewise((x.expr, inside), (0, True)), False
    return handler


_handles(aten.tril.default)(_triangle(lower=True))
_handles(aten.triu.default)(_triangle(lower=False))


@_handles(aten._to_copy.default, prims.convert_element_type.default)
def _convert(node, args, kw):
    x = args[0]
    dtype = args[1] if node.target is prims.convert_element_type.default else kw.get("dtype")
    if dtype is None or dtype == node.meta["val"].dtype and x.is_bool == _is_bool_dtype(dtype):
        return x.expr, x.is_bool
    if _is_bool_dtype(dtype):
        return as_bool(x), True
    if not dtype.is_floating_point and not x.is_bool and not as_number(x).is_integer:
        raise Unproven("float -> int conversion")
    return as_number(x), False


@_handles(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default, aten.detach.default,
          aten.expand.default, aten.expand_copy.default, aten.contiguous.default)
def _same(node, args, kw):
    # expand only prepends dims or broadcasts size-1 ones: right-aligned indices are unchanged.
    return args[0].expr, args[0].is_bool


def _mapped(x: Sym, out_rank: int, mapping: dict):
    return _remap(x.expr, len(x.shape), out_rank, mapping), x.is_bool


@_handles(aten.unsqueeze.default)
def _unsqueeze(node, args, kw):
    x, r = args[0], len(args[0].shape)
    d = _dim(args[1], r + 1)
    return _mapped(x, r + 1, {p: (p if p < d else p + 1) for p in range(r)})


def _keep_non_unit(x: Sym, out_shape: tuple):
    """view / reshape / squeeze that only adds or drops size-1 dims: match the other dims in order."""
    src = [p for p, s in enumerate(x.shape) if s != 1]
    dst = [q for q, s in enumerate(out_shape) if s != 1]
    if len(src) != len(dst) or any(sympy.simplify(x.shape[p] - out_shape[q]) != 0 for p, q in zip(src, dst)):
        raise Unproven("reshape that merges or splits dims")
    return _mapped(x, len(out_shape), dict(zip(src, dst)))


@_handles(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim,
          aten.squeeze.dims, aten.squeeze.default)
def _view(node, args, kw):
    return _keep_non_unit(args[0], _shape(node))


@_handles(aten.permute.default)
def _permute(node, args, kw):
    x, r = args[0], len(args[0].shape)
    return _mapped(x, r, {_dim(p, r): q for q, p in enumerate(args[1])})


@_handles(aten.transpose.int)
def _transpose(node, args, kw):
    x, r = args[0], len(args[0].shape)
    a, b = _dim(args[1], r), _dim(args[2], r)
    perm = list(range(r))
    perm[a], perm[b] = perm[b], perm[a]
    return _mapped(x, r, {p: q for q, p in enumerate(perm)})


@_handles(aten.slice.Tensor)
def _slice(node, args, kw):
    x, r = args[0], len(args[0].shape)
    d = _dim(args[1] if len(args) > 1 else 0, r)
    start = args[2] if len(args) > 2 and args[2] is not None else 0
    step = args[4] if len(args) > 4 else 1
    start = to_sympy(start)
    if start.is_negative:
        start = start + x.shape[d]
    if not (start.is_nonnegative and to_sympy(step).is_positive):
        raise Unproven("slice with a start or step of unknown sign")
    t = index_symbol(r - 1 - d)
    return x.expr.subs(t, start + to_sympy(step) * t), x.is_bool


@_handles(aten.select.int)
def _select_int(node, args, kw):
    x, r = args[0], len(args[0].shape)
    d = _dim(args[1], r)
    index = to_sympy(args[2])
    if index.is_negative:
        index = index + x.shape[d]
    expr = x.expr.subs(index_symbol(r - 1 - d), index)
    return _remap(expr, r, r - 1, {p: (p if p < d else p - 1) for p in range(r) if p != d}), x.is_bool


@_handles(aten.cat.default)
def _cat(node, args, kw):
    parts = [p for p in args[0] if not (len(p.shape) == 1 and p.shape[0] == 0)]   # cat skips empty 1-D
    out_shape = _shape(node)
    r = len(out_shape)
    d = _dim(args[1] if len(args) > 1 else 0, r)
    t = index_symbol(r - 1 - d)
    is_bool = all(p.is_bool for p in parts)
    pieces, offset = [], sympy.Integer(0)
    for p in parts:
        expr = p.expr if is_bool else as_number(p)
        pieces.append((expr.subs(t, t - offset), sympy.Lt(t, offset + p.shape[d])))
        offset = offset + p.shape[d]
    pieces[-1] = (pieces[-1][0], sympy.true)
    if is_bool:
        taken, terms = sympy.false, []
        for expr, cond in pieces:
            terms.append(sympy.And(cond, sympy.Not(taken), expr))
            taken = sympy.Or(taken, cond)
        return sympy.Or(*terms), True
    return sympy.Piecewise(*pieces), False


@_handles(aten.cumsum.default)
def _cumsum(node, args, kw):
    # Only sums of a value constant along the axis (HF's packed-sequence ids of an arange: all 0).
    from .mask_decide import constant_along   # decision procedures live with the decisions
    x, r = args[0], len(args[0].shape)
    d = _dim(args[1], r)
    t = index_symbol(r - 1 - d)
    value = constant_along(x, t, x.shape[d])
    return value * (t + 1), False


@_handles(aten.index.Tensor)
def _index(node, args, kw):
    """``x[i0, i1, ...]`` with broadcastable integer index tensors on the leading dims."""
    x, indices = args[0], list(args[1])
    if any(i is None for i in indices) or any(i.is_bool for i in indices):
        raise Unproven("index with None or bool indices")
    from .mask_decide import nonnegative
    _shape(node)     # the result must carry tensor metadata (else: not proven)
    r, n = len(x.shape), len(indices)
    trailing = r - n
    subs = {}
    for p, idx in enumerate(indices):
        if not nonnegative(idx):
            raise Unproven("index that may be negative")
        # index tensors broadcast into the leading out dims: shift their symbols left past the trailing dims
        shifted = _remap(idx.expr, len(idx.shape), len(idx.shape) + trailing,
                         {q: q for q in range(len(idx.shape))})
        subs[index_symbol(r - 1 - p)] = shifted
    return x.expr.subs(subs, simultaneous=True), x.is_bool


# --------------------------------------------------------------------------- the interpreter
def _load(env: dict, a):
    if isinstance(a, Node):
        if a in env:
            return env[a]
        val = a.meta.get("val")
        if isinstance(val, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
            return to_sympy(val)
        raise Unproven(f"{a.name} not interpreted")
    if isinstance(a, (list, tuple)):
        return type(a)(_load(env, x) for x in a)
    return a


def interpret(nodes: list) -> Sym:
    """Symbolic value of the last of ``nodes`` (ancestors in graph order, no tensor inputs)."""
    env: dict = {}
    for n in nodes:
        val = n.meta.get("val")
        if n.op == "placeholder" and not isinstance(val, torch.Tensor):
            continue          # a size symbol: read from meta['val'] where used
        if not isinstance(val, torch.Tensor):
            if n.target in (operator.getitem,):
                raise Unproven("tuple-valued op in the mask")
            continue          # symbolic scalar arithmetic: its value is its meta expression
        handler = _HANDLERS.get(n.target)
        if handler is None:
            raise Unproven(f"op {n.target}")
        args = _load(env, n.args)
        kwargs = {k: _load(env, v) for k, v in n.kwargs.items()}
        expr, is_bool = handler(n, args, kwargs)
        shape = _shape(n)
        env[n] = Sym(_normalise(expr, shape), shape, is_bool)
    return env[nodes[-1]]
