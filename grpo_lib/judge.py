"""Judge the asserts of a test outside the program's process, on plain values the program sent back.

    _plan_test(source) -> _Plan                  what the sandbox's child evaluates, and what is judged here
    _judge(plan, raw_values) -> None | reason    every assert of the test, on the values that came back

This is the parent's half of running tests against untrusted code: grpo_lib.sandbox runs the program and the
leaves of each test in a confined child process and hands the values it reported to _judge. Nothing here
runs the program's code; this module imports only the standard library (no torch, no grpo_lib), and sandbox
imports it, never the reverse.

How tests are judged (reward hacking)
-------------------------------------
A test run inside the program's interpreter could be fooled: `assert add(1, 2) == 3` passes if add returns
an object whose __eq__ always says True. So the comparison is not made there. The parent splits each
top-level `assert` (see _plan_test): the child evaluates only the sub-expressions whose values come from the
program ("leaves": `add(1, 2)`, `s.pop()`, `len(stack)`, `[f(i) for i in range(3)]`) and sends each value
back as plain data, and the parent evaluates the rest of the assert (==, !=, <, in, is, and/or/not, + - * /,
abs, len, sorted, round, isinstance, type, math.isclose, ...) on those values itself (see _Judge).

  - Plain data: None, bool, int, float, complex, str, bytes, and list, tuple, dict, set, frozenset of plain
    data, read by exact type without calling any of the program's code (its __eq__, __bool__, __hash__,
    __repr__ never run). Also accepted, as their plain equivalents: collections.Counter, OrderedDict,
    defaultdict (dict), namedtuples (tuple), dict.keys()/items() views (frozenset). Refused, with a reason
    naming the value: objects of the program's own classes, subclasses of int, str, list... (`class I(int)`),
    generators, and anything nested deeper than 40 levels or larger than 1 MB encoded. (The child encodes,
    grpo_lib.sandbox._make_encoder; _decode reads it back.)
  - Equality is type-strict (see _canon): numbers compare by value (1 == 1.0 == 1+0j), but a bool is not a
    number (True != 1), str != bytes, list != tuple, set == frozenset, and so on all the way down. `is None`,
    `is True` work; a truth test (`assert is_prime(7)`) needs a plain value.
  - The expected values (`3` above) never enter the program's process, and the child's harness binds what it
    uses before the program runs (builtins, grpo_lib.sandbox's functions): monkey-patching builtins,
    __main__, AssertionError or sys.excepthook changes nothing, and sys.exit / os._exit stop the run with the
    tests that have passed so far. A program that walks stack frames into the harness can still write result
    lines, but all it can forge is the value of a leaf, which it controls anyway.

Limits (each such test fails, with a reason saying what to write instead): only the top level of an assert
is judged outside, so a comparison, and/or/not, a condition, a comprehension filter or a call such as all(),
isinstance(), operator.eq() inside a leaf or inside the test's other statements (`if f(1) != 2: raise`,
`assert g(f(x) == 3)`, `assert all(f(x) == y for ...)`, an assert inside a for loop or a `def check()`) is
refused. Write one top-level assert per check, or compare whole lists: `assert [f(x) for x in xs] == ys`.
Operations of the test on an object of the program's own class run in the sandbox where they are the
program's answer (method calls and attribute reads `s.pop()`, `p.x`, and len, list, sorted, str, sum, min,
max... of it); the rest (indexing `s[0]`, arithmetic, ==) need a plain value. Function calls made inside a
leaf are the program's business: a test that asks `f(x).count(3)` gets whatever count the program's object
reports, unless it is a builtin list, tuple, dict or set, whose comparing methods run only on plain data.
Each assert's leaves are all evaluated, left to right, before the parent judges it (no short-circuit).
"""

from __future__ import annotations

import ast
import builtins
import json
import math
import operator
from dataclasses import dataclass, field

# Shared with grpo_lib.sandbox's child, which runs sandbox.py alone (python -I -S) and cannot import this
# module: both define these two, and tests/test_judge.py checks that they agree.
_MAX_DEPTH = 40  # containers nested deeper are not plain values
_METHOD_GUARD = "__sandbox_method__"  # name of the guard for method calls inside leaves (sandbox._make_method_guard)

_MAX_ITEMS = 1_000_000  # largest sequence or range the judge builds
_MAX_INT_BITS = 1_000_000  # largest int the judge computes with ** or <<

# names a test may use in the judged part of an assert: builtins, which the judge runs itself on plain values
_SAFE_CALLS = ("abs", "all", "any", "bin", "bool", "chr", "complex", "dict", "divmod", "enumerate", "float",
               "frozenset", "hex", "int", "isinstance", "len", "list", "max", "min", "oct", "ord", "pow", "range",
               "repr", "reversed", "round", "set", "sorted", "str", "sum", "tuple", "type", "zip")
_SAFE_NAMES = _SAFE_CALLS + ("bytes", "slice")
# applied to a leaf, these run in the sandbox as part of it: len(stack), list(generator), str(obj) are the
# program's answers (its __len__, __iter__, __str__), not judgements. Their result must be plain.
_VIEW_CALLS = frozenset({"len", "list", "tuple", "sorted", "set", "frozenset", "dict", "str", "repr", "sum", "min",
                         "max", "enumerate", "zip", "reversed"})
# calls that judge (truth, type tests, comparisons): never inside a leaf, where the program's objects could
# answer them. Names of builtins, and of methods or module functions (operator.eq, numpy.allclose).
_JUDGE_CALLS = frozenset({"all", "any", "bool", "filter", "isinstance", "issubclass", "callable", "hasattr"})
_JUDGE_METHODS = frozenset({"eq", "ne", "lt", "le", "gt", "ge", "contains", "truth", "not_", "is_", "is_not",
                            "countOf", "indexOf", "isclose", "allclose", "array_equal", "__eq__", "__ne__", "__lt__",
                            "__le__", "__gt__", "__ge__", "__contains__", "__bool__"})
_MATH_CONSTANTS = frozenset({"pi", "e", "tau", "inf", "nan"})
_MATH_CALLS = frozenset({"isclose", "sqrt", "isqrt", "floor", "ceil", "trunc", "fabs", "exp", "expm1", "log", "log2",
                         "log10", "log1p", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh",
                         "tanh", "hypot", "degrees", "radians", "gcd", "fsum", "isnan", "isinf", "isfinite",
                         "copysign", "fmod", "modf", "frexp", "ldexp", "dist", "remainder"})

_WHY_EQ = "a custom __eq__ could fake equality"
_WHY_ORDER = "a custom __lt__ could fake the order"
_WHY_IN = "a custom __eq__ or __contains__ could fake membership"
_WHY_BOOL = "a custom __bool__ could fake the truth"
_WHY_OP = "its own operators could fake the result"


class _Unsupported(Exception):
    """The test has a form the parent cannot judge (raised while planning)."""


class _Fail(Exception):
    """The test fails; the message is the reason."""


@dataclass
class _Plan:
    steps: list | None = None
    """For the child: ["exec", source] | ["eval", [[leaf index, source], ...]], in the order to run them."""
    checks: list = field(default_factory=list)
    """(assert test expression node, message or None) judged here, in order."""
    leaf_of: dict = field(default_factory=dict)
    """id(node) -> leaf index, for the nodes the child evaluates."""
    texts: list = field(default_factory=list)
    """leaf index -> the leaf as the test wrote it, for reasons."""
    sources: list = field(default_factory=list)
    """leaf index -> what the child evaluates (method calls guarded, see _Guard)."""
    tree: object = None
    """The parsed test: keeps the nodes (whose ids leaf_of holds) alive."""
    shadowed: frozenset = frozenset()
    """Names the test's own statements bind (`max = 5`): not the builtins of that name for the judge."""
    error: str | None = None
    """Why the test cannot be judged (it then fails without running)."""


def _plan_test(source: str) -> _Plan:
    """Split a test into statements the child runs as they are and asserts the parent judges."""
    try:
        tree = ast.parse(source, "<test>")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return _Plan(error=_describe_exception(e))
    plan, pending = _Plan(steps=[], tree=tree), []
    plan.shadowed = frozenset(_bound_names([s for s in tree.body if not isinstance(s, ast.Assert)]))
    try:
        for stmt in tree.body:
            if not isinstance(stmt, ast.Assert):
                nested = next((n for n in ast.walk(stmt) if isinstance(n, ast.Assert)), None)
                if nested is not None:
                    raise _Unsupported(f"an assert inside a {type(stmt).__name__} statement (line {nested.lineno}) "
                                       f"cannot be judged outside the program's process; write each check as a "
                                       f"top-level assert")
                _refuse_judgement(stmt, f"`{_short(stmt)}`")
                pending.append(_Guard().visit(stmt))
                continue
            if pending:
                plan.steps.append(["exec", ast.unparse(ast.Module(body=pending, type_ignores=[]))])
                pending = []
            first = len(plan.texts)
            _plan_expr(stmt.test, plan)
            if len(plan.texts) > first:
                plan.steps.append(["eval", [[j, plan.sources[j]] for j in range(first, len(plan.texts))]])
            msg = stmt.msg.value if isinstance(stmt.msg, ast.Constant) and isinstance(stmt.msg.value, str) else None
            plan.checks.append((stmt.test, msg))
        if pending:
            plan.steps.append(["exec", ast.unparse(ast.Module(body=pending, type_ignores=[]))])
    except _Unsupported as e:
        return _Plan(error=str(e))
    except Exception as e:  # RecursionError on a deeply nested test, ast.unparse giving up on an f-string
        return _Plan(error=f"the test could not be prepared for judging: {_describe_exception(e)}")
    return plan


def _bound_names(statements: list) -> set:
    """Names that statements bind (assignments, def, class, for targets, imports other than `import math`)."""
    names = set()
    for n in (x for stmt in statements for x in ast.walk(stmt)):
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in n.names
                         if not (isinstance(n, ast.Import) and a.name == "math" and a.asname in (None, "math")))
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            names.update(n.names)
    return names


def _short(node: ast.AST, n: int = 80) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _describe_exception(e: BaseException) -> str:
    try:
        msg = str(e)
    except BaseException:  # a hostile __str__
        msg = "<unprintable>"
    return (type(e).__name__ + (f": {msg}" if msg else ""))[:300]


def _is_judged_here(node: ast.expr, shadowed: frozenset = frozenset()) -> bool:
    """True for the node types the parent evaluates itself; every other sub-expression is a leaf."""
    if isinstance(node, (ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.UnaryOp, ast.BinOp, ast.BoolOp,
                         ast.Compare, ast.IfExp, ast.Slice, ast.Subscript, ast.Starred)):
        return True
    if isinstance(node, ast.Name):
        return node.id not in shadowed and (node.id in _SAFE_NAMES or node.id == "math")
    if isinstance(node, ast.Attribute):
        return (isinstance(node.value, ast.Name) and node.value.id == "math" and "math" not in shadowed
                and node.attr in _MATH_CONSTANTS | _MATH_CALLS)
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute):
            return (isinstance(f.value, ast.Name) and f.value.id == "math" and "math" not in shadowed
                    and f.attr in _MATH_CALLS)
        if not (isinstance(f, ast.Name) and f.id in _SAFE_CALLS and f.id not in shadowed):
            return False
        if f.id in _VIEW_CALLS:  # len(stack), list(gen()): the program's answer, evaluated with the leaf
            args = [a.value if isinstance(a, ast.Starred) else a for a in node.args] + [k.value for k in node.keywords]
            return all(_is_judged_here(a, shadowed) for a in args)
        return True
    return False


def _children(node: ast.AST) -> list:
    """Sub-expressions in the order Python evaluates them."""
    if isinstance(node, ast.Dict):
        return [x for k, v in zip(node.keys, node.values) for x in (k, v) if x is not None]
    if isinstance(node, ast.Call):
        return [node.func, *node.args, *[k.value for k in node.keywords]]
    return [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr)]


def _plan_expr(node: ast.expr, plan: _Plan, iterated: bool = False) -> None:
    """Walk the judged part of an assert; make each other sub-expression a leaf. `iterated`: the judge only
    iterates this value (all(x), any(x)), so the child may send list(x) for a generator or map object."""
    if _is_judged_here(node, plan.shadowed):
        iterate = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("all", "any")
        for child in _children(node):
            if not (isinstance(node, ast.Call) and child is node.func):
                _plan_expr(child, plan, iterate and child in node.args)
        return
    _refuse_judgement(node, f"`{_short(node)}`")
    leaf = _Guard().visit(ast.fix_missing_locations(_copy_node(node)))
    if isinstance(leaf, ast.GeneratorExp):  # all(is_prime(p) for p in ps): send the values, not a generator
        leaf = ast.ListComp(elt=leaf.elt, generators=leaf.generators)
    elif iterated and "list" not in plan.shadowed:  # all(map(is_prime, ps))
        leaf = ast.Call(func=ast.Name(id="list", ctx=ast.Load()), args=[leaf], keywords=[])
    plan.leaf_of[id(node)] = len(plan.texts)
    plan.texts.append(_short(node))
    plan.sources.append(ast.unparse(leaf))


def _copy_node(node: ast.AST) -> ast.AST:
    return ast.parse(ast.unparse(node), mode="eval").body


def _refuse_judgement(node: ast.AST, where: str) -> None:
    """A comparison, truth test or type test that would run in the program's process, where the program's
    objects could answer it, makes the test unjudgeable: raise _Unsupported saying so."""
    for n in ast.walk(node):
        what = None
        if isinstance(n, ast.Compare):
            what = "a comparison"
        elif isinstance(n, ast.BoolOp) or (isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not)):
            what = "and/or/not"
        elif isinstance(n, (ast.If, ast.IfExp, ast.While, ast.Match)):
            what = "a condition"
        elif isinstance(n, ast.comprehension) and n.ifs:
            what = "a comprehension filter"
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _JUDGE_CALLS:
            what = f"{n.func.id}()"
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in _JUDGE_METHODS:
            what = f".{n.func.attr}()"
        if what is not None:
            raise _Unsupported(f"{what} in {where} would run in the program's process, where the program's "
                               f"objects could fake it; only the top level of an assert is judged outside "
                               f"(`assert f(x) == y` is, `assert g(f(x) == y)` is not)")


def _judge(plan: _Plan, raw_values: dict) -> str | None:
    """None if every assert of the test holds on the values sent back, else the reason it fails."""
    judge = _Judge(plan, raw_values)
    for test, msg in plan.checks:
        try:
            if not judge.truth(judge.value(test)):
                return "AssertionError" + (f": {msg}" if msg else "")
        except _Fail as e:
            return str(e)
        except TimeoutError:
            raise
        except Exception as e:  # what Python would raise evaluating the assert on these values
            return _describe_exception(e)
    return None


class _Opaque:
    """Stands for a value that is not plain. Any use other than `is` fails the test with a reason."""

    __slots__ = ("text", "desc", "limit")

    def __init__(self, text: str, desc: str, limit: bool = False):
        self.text, self.desc, self.limit = text, desc, limit

    def refuse(self, why: str = _WHY_OP):
        if self.limit:
            raise _Fail(f"result of {self.text} could not be sent back: {self.desc}")
        raise _Fail(f"result of {self.text} is {self.desc}, not a plain value ({why})")

    def __eq__(self, other):
        self.refuse(_WHY_EQ)

    __hash__ = object.__hash__


def _opaque_refuses(name: str):
    def method(self, *args):
        self.refuse()

    method.__name__ = name
    return method


for _dunder in ("__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__len__", "__iter__", "__contains__",
                "__getitem__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
                "__rtruediv__", "__floordiv__", "__mod__", "__pow__", "__neg__", "__abs__", "__index__", "__int__",
                "__float__", "__complex__", "__round__", "__str__", "__repr__", "__format__"):
    setattr(_Opaque, _dunder, _opaque_refuses(_dunder))
del _dunder


class _Guard(ast.NodeTransformer):
    """Inside a leaf, `x.m(args)` becomes `__sandbox_method__(x, 'm', args)`: on a list, tuple, dict or set,
    methods that compare (count, index, get, ...) run only when the container and the arguments are plain."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Attribute):
            return ast.Call(func=ast.Name(id=_METHOD_GUARD, ctx=ast.Load()),
                            args=[f.value, ast.Constant(value=f.attr), *node.args], keywords=node.keywords)
        return node


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.LShift: operator.lshift,
           ast.RShift: operator.rshift, ast.BitOr: operator.or_, ast.BitXor: operator.xor, ast.BitAnd: operator.and_}
_UNARYOPS = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}


class _Judge:
    """Evaluates the judged part of an assert: builtins and operators on plain values, with type-strict
    equality (see _canon). Values of leaves come from the child; nothing here runs the program's code."""

    def __init__(self, plan: _Plan, raw_values: dict):
        self.plan, self.raw = plan, raw_values

    def value(self, node: ast.expr):
        j = self.plan.leaf_of.get(id(node))
        if j is not None:
            return self.leaf(j)
        return getattr(self, "_" + type(node).__name__)(node)

    def leaf(self, j: int):
        raw, text = self.raw.get(j), self.plan.texts[j]
        if raw is None:
            raise _Fail(f"no value came back for {text}")
        if raw[0] == "!":  # it raised: the test fails as `assert` would have
            raise _Fail(raw[1:])
        if raw[0] in "?#":
            return _Opaque(text, raw[1:], limit=raw[0] == "#")
        try:
            return _decode(raw[1:])
        except Exception:
            raise _Fail(f"the value of {text} could not be read back") from None

    def plain(self, v, why: str):
        if isinstance(v, _Opaque):
            v.refuse(why)
        return v

    def truth(self, v) -> bool:
        return bool(self.plain(v, _WHY_BOOL))

    # --- nodes
    def _Constant(self, node):
        return node.value

    def _Name(self, node):
        return math if node.id == "math" else getattr(builtins, node.id)

    def _Attribute(self, node):
        return getattr(math, node.attr)

    def _items(self, nodes) -> list:
        out = []
        for n in nodes:
            if isinstance(n, ast.Starred):
                out.extend(self.iterable(self.value(n.value)))
            else:
                out.append(self.value(n))
        return out

    def iterable(self, v):
        v = self.plain(v, _WHY_OP)
        if isinstance(v, range) and len(v) > _MAX_ITEMS:
            raise _Fail(f"the judge does not expand a range of {len(v)} items")
        return v

    def _Tuple(self, node):
        return tuple(self._items(node.elts))

    def _List(self, node):
        return self._items(node.elts)

    def _Set(self, node):
        return set(self._items(node.elts))

    def _Dict(self, node):
        d = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                d.update(self.plain(self.value(v), _WHY_OP))
            else:
                key = self.plain(self.value(k), _WHY_EQ)
                d[key] = self.value(v)
        return d

    def _UnaryOp(self, node):
        v = self.value(node.operand)
        if isinstance(node.op, ast.Not):
            return not self.truth(v)
        return _UNARYOPS[type(node.op)](self.plain(v, _WHY_OP))

    def _BinOp(self, node):
        a = self.plain(self.value(node.left), _WHY_OP)
        b = self.plain(self.value(node.right), _WHY_OP)
        if type(node.op) not in _BINOPS:
            raise _Fail(f"the judge does not compute {type(node.op).__name__}")
        _check_size(type(node.op), a, b)
        return _BINOPS[type(node.op)](a, b)

    def _BoolOp(self, node):
        v = None
        for e in node.values:
            v = self.value(e)
            if self.truth(v) == isinstance(node.op, ast.Or):
                return v
        return v

    def _Compare(self, node):
        left = self.value(node.left)
        for op, comp in zip(node.ops, node.comparators):
            right = self.value(comp)
            if not self.compare(op, left, right):
                return False
            left = right
        return True

    def compare(self, op, a, b) -> bool:
        if isinstance(op, ast.Is):
            return a is b
        if isinstance(op, ast.IsNot):
            return a is not b
        if isinstance(op, (ast.Eq, ast.NotEq)):
            equal = _canon(self.plain(a, _WHY_EQ)) == _canon(self.plain(b, _WHY_EQ))
            return equal if isinstance(op, ast.Eq) else not equal
        if isinstance(op, (ast.In, ast.NotIn)):
            found = _contains(self.plain(b, _WHY_IN), self.plain(a, _WHY_IN))
            return found if isinstance(op, ast.In) else not found
        a, b = self.plain(a, _WHY_ORDER), self.plain(b, _WHY_ORDER)
        return {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}[type(op)](a, b)

    def _IfExp(self, node):
        return self.value(node.body) if self.truth(self.value(node.test)) else self.value(node.orelse)

    def _Subscript(self, node):
        container = self.plain(self.value(node.value), _WHY_OP)
        return container[self.plain(self.value(node.slice), _WHY_OP)]

    def _Slice(self, node):
        parts = [None if n is None else self.plain(self.value(n), _WHY_OP) for n in (node.lower, node.upper, node.step)]
        return slice(*parts)

    def _Call(self, node):
        f = node.func
        fn = getattr(math, f.attr) if isinstance(f, ast.Attribute) else getattr(builtins, f.id)
        args = self._items(node.args)
        kwargs = {}
        for k in node.keywords:
            if k.arg is None:
                kwargs.update(self.plain(self.value(k.value), _WHY_OP))
            else:
                kwargs[k.arg] = self.value(k.value)
        if fn is type:
            if len(args) != 1 or kwargs:
                raise _Fail("the judge calls type() with one argument only")
            return type(args[0])  # type(<not plain>) is _Opaque: `type(f(x)) is int` is False
        why = _WHY_BOOL if fn in (all, any, bool) else _WHY_OP
        args = [self.plain(a, why) for a in args]
        kwargs = {k: self.plain(v, why) for k, v in kwargs.items()}
        if fn is range:
            r = range(*args, **kwargs)
            if len(r) > _MAX_ITEMS:
                raise _Fail(f"the judge does not build a range of {len(r)} items")
            return r
        if fn is pow and len(args) == 2:
            _check_size(ast.Pow, *args)
        for a in args:  # list(range(10**9)), sorted(...): expanding a huge range
            if isinstance(a, range):
                self.iterable(a)
        return fn(*args, **kwargs)


def _check_size(op: type, a, b) -> None:
    """Refuse arithmetic whose result would be huge (the values come from the program)."""
    ints = type(a) in (int, bool) and type(b) in (int, bool)
    if op is ast.Pow and ints and b > 0 and abs(a) > 1 and a.bit_length() * b > _MAX_INT_BITS:
        raise _Fail(f"the judge does not compute a power with more than {_MAX_INT_BITS} bits")
    if op is ast.LShift and ints and b > _MAX_INT_BITS:
        raise _Fail(f"the judge does not shift by more than {_MAX_INT_BITS} bits")
    if op is ast.Mod and isinstance(a, (str, bytes)) and ("*" in a if isinstance(a, str) else b"*" in a):
        raise _Fail("the judge does not format with * widths")  # '%*d' % (10**9, 1): a width from the program
    if op is ast.Mult:
        for seq, n in ((a, b), (b, a)):
            if isinstance(seq, (str, bytes, list, tuple)) and type(n) is int and len(seq) * n > _MAX_ITEMS:
                raise _Fail(f"the judge does not build a sequence of more than {_MAX_ITEMS} items")


def _canon(v):
    """A key that is equal for equal values, type-strictly: numbers (int, float, complex) compare by value
    (1 == 1.0), but bool is not a number (True != 1), and str, bytes, list, tuple, dict, set (== frozenset)
    and None each equal only their own kind, all the way down."""
    t = type(v)
    if v is None:
        return ("None",)
    if t is bool:
        return ("bool", v)
    if t in (int, float, complex):
        return ("number", v)
    if t in (str, bytes):
        return (t.__name__, v)
    if t in (list, tuple):
        return (t.__name__, tuple(_canon(x) for x in v))
    if t in (set, frozenset):
        return ("set", frozenset(_canon(x) for x in v))
    if t is dict:
        return ("dict", frozenset((_canon(k), _canon(x)) for k, x in v.items()))
    if t is _Opaque:
        v.refuse(_WHY_EQ)
    return ("object", v)  # made by the judge (a type, a range): their own equality is trusted


def _contains(container, item) -> bool:
    """`item in container` with _canon's equality; substrings for str and bytes."""
    if type(container) in (str, bytes):
        return item in container
    if isinstance(container, range) and type(item) in (int, float):
        return item in container
    key = _canon(item)
    return any(_canon(x) == key for x in container)


def _decode(text: str):
    """The child's JSON (see grpo_lib.sandbox._make_encoder) back to plain values."""
    return _untag(json.loads(text), 0)


def _untag(x, depth: int):
    if depth > _MAX_DEPTH + 1:
        raise ValueError("too deep")
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is list and len(x) in (2, 3) and type(x[0]) is str:
        tag = x[0]
        if tag == "b" and len(x) == 2:
            return bytes.fromhex(x[1])
        if tag == "c" and len(x) == 3 and all(type(v) in (int, float) for v in x[1:]):
            return complex(x[1], x[2])
        if tag == "D" and len(x) == 2:
            return {_untag(k, depth + 1): _untag(v, depth + 1) for k, v in x[1]}
        make = {"L": list, "T": tuple, "S": set, "F": frozenset}.get(tag)
        if make is not None and len(x) == 2 and type(x[1]) is list:
            return make(_untag(v, depth + 1) for v in x[1])
    raise ValueError(f"not an encoded value: {t.__name__}")
