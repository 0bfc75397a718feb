"""Decide what a symbolic mask keeps: causal ``j <= i + offset``, banded ``i - W < j <= i``, everything, or unknown.

Input: a ``mask_symbolic.Sym`` whose expression is a boolean formula (bool mask) or a ``Piecewise`` of
constants (additive mask) over the index symbols ``t_0 = j`` (key), ``t_1 = i`` (query), ``t_2, t_3``
(head, batch). The procedure, all on formulas (no N-sized work):

1. Lift: relations over ``Piecewise`` values become ``Or(And(case, relation on the case's value))``, so
   only linear integer atoms ``a·t + c  rel  0`` remain (``c`` may hold size symbols).
2. Box: an atom that holds (or fails) on every index of the box ``0 <= t_k < size_k`` is replaced by
   True (False); its extreme values sit at the box corners, compared with sympy under the size
   symbols' positivity.
3. Diagonal: with ``j = i + d`` every remaining atom must be free of ``i``; the kept set of ``d`` is
   then a union of integer intervals, which is compared with the causal / banded shapes on the ``d``
   range the scores actually have, ``1 - Lq <= d <= Lk - 1``.
"""
from __future__ import annotations

import sympy
from sympy.core.relational import Relational

from .mask_symbolic import Sym, Unproven, as_number, index_symbol, is_index_symbol

# An additive mask entry at or below this is "masked": exp() underflows to 0 in every dtype after the
# row max is subtracted (HF uses finfo.min, old BERT code -10000).
ADDITIVE_MASKED_MAX = -1.0e4
# Diagonal offset symbol d = j - i (any integer).
_D = sympy.Symbol("_thrift_d", integer=True)
_INF = sympy.oo


def holds(rel) -> bool | None:
    """True / False when sympy can decide ``rel`` under the symbols' assumptions, else None."""
    if rel is sympy.true or rel is True:
        return True
    if rel is sympy.false or rel is False:
        return False
    return None


def _exclusive_cases(pw: sympy.Piecewise):
    """``[(condition, value)]`` with each condition excluding the earlier ones (first match wins)."""
    taken, out = sympy.false, []
    for value, cond in pw.args:
        out.append((sympy.And(cond, sympy.Not(taken)), value))
        taken = sympy.Or(taken, cond)
    return out


def lift(f):
    """``f`` without Piecewise inside relations (see module docstring, step 1)."""
    if f is sympy.true or f is sympy.false:
        return f
    if isinstance(f, Relational):
        e = sympy.piecewise_fold(f.lhs - f.rhs)
        if isinstance(e, sympy.Piecewise):
            return sympy.Or(*[sympy.And(lift(c), lift(f.func(v, 0))) for c, v in _exclusive_cases(e)])
        return f.func(e, 0)
    if isinstance(f, sympy.Piecewise):   # a bool-valued Piecewise
        return sympy.Or(*[sympy.And(lift(c), lift(v)) for c, v in _exclusive_cases(f)])
    if isinstance(f, (sympy.And, sympy.Or, sympy.Not, sympy.Xor)):
        return f.func(*[lift(a) for a in f.args])
    raise Unproven(f"boolean form {type(f).__name__}")


def _linear(e, symbols):
    """``(coefficients, constant)`` of ``e`` linear in ``symbols`` with integer coefficients."""
    coeffs = {}
    for s in symbols:
        a = sympy.diff(e, s)
        if a.free_symbols or not a.is_integer:
            raise Unproven("non-linear index arithmetic")
        if a != 0:
            coeffs[s] = a
    const = sympy.expand(e - sum(a * s for s, a in coeffs.items()))
    if any(is_index_symbol(s) or s == _D for s in const.free_symbols):
        raise Unproven("non-linear index arithmetic")
    return coeffs, const


def _index_symbols(f):
    return sorted((s for s in f.free_symbols if is_index_symbol(s) or s == _D), key=lambda s: s.name)


def _as_le_or_eq(rel):
    """Integer atom as ``(e, kind)`` with kind in {"le", "eq", "ne"} meaning ``e <= 0`` / ``e == 0`` / ``e != 0``."""
    e = sympy.expand(rel.lhs - rel.rhs)
    if not e.is_integer:
        raise Unproven("comparison of non-integer values")
    if isinstance(rel, sympy.Le):
        return e, "le"
    if isinstance(rel, sympy.Lt):
        return e + 1, "le"
    if isinstance(rel, sympy.Ge):
        return -e, "le"
    if isinstance(rel, sympy.Gt):
        return 1 - e, "le"
    if isinstance(rel, sympy.Eq):
        return e, "eq"
    if isinstance(rel, sympy.Ne):
        return e, "ne"
    raise Unproven(f"relation {type(rel).__name__}")


def simplify_over_box(f, box: dict):
    """Replace atoms decided by ``box`` (symbol -> (lo, hi), inclusive) with True / False (step 2)."""
    def atom(rel):
        syms = _index_symbols(rel)
        if not syms or any(s not in box for s in syms):
            return rel
        e, kind = _as_le_or_eq(rel)
        coeffs, const = _linear(e, syms)
        lo = const + sum(a * (box[s][0] if a > 0 else box[s][1]) for s, a in coeffs.items())
        hi = const + sum(a * (box[s][1] if a > 0 else box[s][0]) for s, a in coeffs.items())
        if kind == "le":
            if holds(sympy.Le(hi, 0)):
                return sympy.true
            if holds(sympy.Gt(lo, 0)):
                return sympy.false
        else:
            never_zero = holds(sympy.Gt(lo, 0)) or holds(sympy.Lt(hi, 0))
            always_zero = holds(sympy.Eq(lo, 0)) and holds(sympy.Eq(hi, 0))
            if never_zero or always_zero:
                return sympy.true if (kind == "eq") == bool(always_zero) else sympy.false
        return rel
    return f.replace(lambda x: isinstance(x, Relational), atom)


# --------------------------------------------------------------------------- integer interval sets
# A set of integers is a sorted list of disjoint, non-adjacent closed intervals (lo, hi); ends may
# be -oo / oo or hold size symbols. Every comparison must be decidable, else Unproven.
def _le(a, b) -> bool:
    r = holds(sympy.Le(a, b))
    if r is None:
        raise Unproven(f"cannot order {a} and {b}")
    return r


def _intersect(a: list, b: list) -> list:
    out = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            lo = lo2 if _le(lo1, lo2) else lo1
            hi = hi1 if _le(hi1, hi2) else hi2
            if _le(lo, hi):
                out.append((lo, hi))
    return _union(out, [])


def _union(a: list, b: list) -> list:
    items = a + b
    for i in range(len(items)):     # insertion sort on lo (few items; only pairwise comparisons)
        j = i
        while j > 0 and not _le(items[j - 1][0], items[j][0]):
            items[j - 1], items[j] = items[j], items[j - 1]
            j -= 1
    out = []
    for lo, hi in items:
        if out and _le(lo, out[-1][1] + 1):
            if not _le(hi, out[-1][1]):
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _complement(a: list) -> list:
    out, lo = [], -_INF
    for s, e in a:
        if s != -_INF:
            out.append((lo, s - 1))
        lo = e + 1
    if lo != _INF and not (a and a[-1][1] == _INF):
        out.append((lo, _INF))
    return out


def _atom_set(rel, x) -> list:
    e, kind = _as_le_or_eq(rel)
    coeffs, c = _linear(e, [x])
    a = coeffs.get(x, 0)
    if a == 0:
        r = holds({"le": sympy.Le, "eq": sympy.Eq, "ne": sympy.Ne}[kind](c, 0))
        if r is None:
            raise Unproven(f"undecided condition {rel}")
        return [(-_INF, _INF)] if r else []
    if abs(a) != 1 and c.free_symbols:
        raise Unproven("symbolic bound with a scaled index")
    bound = -c / a                                   # a x + c == 0  <=>  x == bound
    if kind == "le":                                 # a x + c <= 0
        return [(-_INF, sympy.floor(bound))] if a > 0 else [(sympy.ceiling(bound), _INF)]
    point = [(bound, bound)] if bound.is_integer else []
    return point if kind == "eq" else _complement(point)


def integer_set(f, x) -> list:
    """The integers ``x`` at which ``f`` (only ``x`` free among index symbols) holds."""
    if f is sympy.true:
        return [(-_INF, _INF)]
    if f is sympy.false:
        return []
    if isinstance(f, Relational):
        return _atom_set(f, x)
    if isinstance(f, sympy.Not):
        return _complement(integer_set(f.args[0], x))
    parts = [integer_set(a, x) for a in f.args]
    if isinstance(f, sympy.And):
        out = [(-_INF, _INF)]
        for p in parts:
            out = _intersect(out, p)
        return out
    if isinstance(f, sympy.Or):
        out = []
        for p in parts:
            out = _union(out, p)
        return out
    raise Unproven(f"boolean form {type(f).__name__}")


# --------------------------------------------------------------------------- helpers for the interpreter
def _box_of(shape: tuple) -> dict:
    return {index_symbol(k): (sympy.Integer(0), size - 1) for k, size in enumerate(reversed(shape))}


def nonnegative(v: Sym) -> bool:
    """Every element of the integer tensor ``v`` is >= 0 (Piecewise cases checked one by one)."""
    e = sympy.piecewise_fold(as_number(v))
    values = [val for _, val in _exclusive_cases(e)] if isinstance(e, sympy.Piecewise) else [e]
    box = _box_of(v.shape)
    for val in values:
        f = simplify_over_box(sympy.Ge(val, 0), box)
        if f is not sympy.true:
            return False
    return True


def constant_along(x: Sym, t, size):
    """The value of ``x`` if it does not vary along index ``t`` (0 <= t < size), else Unproven."""
    if not x.is_bool:
        if t in as_number(x).free_symbols:
            raise Unproven("cumulative sum of a varying value")
        return as_number(x)
    f = simplify_over_box(lift(x.expr), _box_of(x.shape))
    if any(s != t for s in _index_symbols(f)):
        raise Unproven("cumulative sum of a value with other index dependencies")
    kept = _intersect(integer_set(f, t), [(sympy.Integer(0), size - 1)])
    if not kept:
        return sympy.Integer(0)
    if kept == [(0, size - 1)] or (len(kept) == 1 and _le(kept[0][0], 0) and _le(size - 1, kept[0][1])):
        return sympy.Integer(1)
    raise Unproven("cumulative sum of a varying value")


# --------------------------------------------------------------------------- the decision
def keep_formula(v: Sym):
    """Boolean formula "element is kept" for a bool mask or an additive one (0 keep, <= -1e4 drop)."""
    if v.is_bool:
        return lift(v.expr)
    e = sympy.piecewise_fold(v.expr)
    cases = _exclusive_cases(e) if isinstance(e, sympy.Piecewise) else [(sympy.true, e)]
    keep = []
    for cond, value in cases:
        if value.free_symbols:
            raise Unproven("additive mask value varies with the index")
        if value.is_zero:
            keep.append(lift(cond))
        elif not (value == -_INF or (value.is_real and value <= ADDITIVE_MASKED_MAX)):
            raise Unproven(f"additive mask value {value} is neither 0 nor very negative")
    return sympy.Or(*keep)


def classify(v: Sym, lq, lk) -> tuple:
    """``(kind, offset, window)`` for a mask broadcast to scores ``[..., lq, lk]`` (sympy sizes).

    kind "all_keep"; "causal" (keep ``j <= i + offset``); "banded" (keep ``offset - window < j - i <=
    offset``). Raises Unproven otherwise (including all-masked and batch / head dependent masks)."""
    if v.shape and len(v.shape) > 4:
        raise Unproven("mask of rank > 4")
    box = _box_of(v.shape)
    box[index_symbol(0)] = (sympy.Integer(0), lk - 1)
    box[index_symbol(1)] = (sympy.Integer(0), lq - 1)
    f = simplify_over_box(keep_formula(v), box)
    if f is sympy.true:
        return "all_keep", 0, None
    if f is sympy.false:
        raise Unproven("mask drops every element")
    if any(s not in (index_symbol(0), index_symbol(1)) for s in _index_symbols(f)):
        raise Unproven("mask depends on batch or head")
    i, j = index_symbol(1), index_symbol(0)
    f = f.subs(j, i + _D)
    if i in f.free_symbols:
        f = simplify_over_box(f, {i: box[i]})
        if i in f.free_symbols:
            raise Unproven("mask is not a function of j - i")
    kept = integer_set(f, _D)
    d_lo, d_hi = 1 - lq, lk - 1
    clipped = []
    for lo, hi in kept:
        if holds(sympy.Gt(lo, d_hi)) or holds(sympy.Lt(hi, d_lo)):
            continue      # entirely outside the score matrix
        clipped.append((-_INF if holds(sympy.Le(lo, d_lo)) else lo, _INF if holds(sympy.Ge(hi, d_hi)) else hi))
    if clipped == [(-_INF, _INF)]:
        return "all_keep", 0, None
    if len(clipped) != 1:
        raise Unproven("mask keeps several diagonal bands" if clipped else "mask drops every element")
    lo, hi = clipped[0]
    if lo == -_INF:
        return "causal", hi, None
    if hi == _INF:
        raise Unproven("anti-causal mask")
    return "banded", hi, sympy.expand(hi - lo + 1)
