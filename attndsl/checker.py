"""Pass 2, check: surface declarations -> typed :class:`~attndsl.ir.PatternIR` per pattern.

Input: the parser's declarations for one file plus the prelude's defs. Output: a dict of
pattern name -> PatternIR satisfying the invariants in :mod:`attndsl.ir` and those of
:mod:`attndsl.limits` (every root at most MAX_DEPTH high; and/or chains of more than LOGIC_RUN
operands balanced), or an AttnError carrying every name/type error found (one per clause at
most; all clauses are visited).

Scoping: a def sees its own parameters, the other defs, the prelude and the builtins; a
pattern's clauses also see its parameters and the earlier lets. Defs are macros: their bodies
are checked when inlined at a call, with the call's argument IR substituted for parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import check_constants, is_constant
from .decls import cycles, parse_type, walk_surface
from .errors import AttnError, AttnNameError, AttnTypeError, ErrorSink, Span
from .ir import BUILTIN_LEAVES, UNARY_FLOAT_FUNCS, Expr, Op, Param, PatternIR, TensorType, Type
from .limits import MAX_DEPTH, Heights, depth_message, logic_chain, surface_operands, tree_size
from .parser import HUGE_INT, DefDecl, Node, PatternDecl
from .reserved import BUILTIN_NAMES, why_reserved

PRELUDE_FILENAME = "<prelude>"
MAX_TREE_SIZE = 200_000
INT_MIN, INT_MAX = -(2 ** 63), 2 ** 63 - 1     # ints are int64 in the reference and the kernels

_BINARY = {"+": Op.ADD, "-": Op.SUB, "*": Op.MUL, "/": Op.DIV, "//": Op.FLOORDIV, "%": Op.MOD,
           "**": Op.POW}
_COMPARE = {"<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE, "==": Op.EQ, "!=": Op.NE}
_UNARY_FUNCS = {op.value: op for op in UNARY_FLOAT_FUNCS}
FUNCTIONS = {"abs", "min", "max", "clamp", "float"} | set(_UNARY_FUNCS)

# selector signatures: (parameter name, type, default or None when required)
SELECTORS: dict[str, tuple[Op, tuple[tuple[str, object, object], ...]]] = {
    "topk_blocks": (Op.TOPK_BLOCKS, (("n", Type.INT, None), ("b", Type.INT, None),
                                     ("causal", Type.BOOL, True))),
    "topp_blocks": (Op.TOPP_BLOCKS, (("p", Type.FLOAT, None), ("b", Type.INT, None),
                                     ("causal", Type.BOOL, True))),
    "random_blocks": (Op.RANDOM_BLOCKS, (("r", Type.INT, None), ("b", Type.INT, None),
                                         ("seed", Type.INT, 0))),
    "route": (Op.ROUTE, (("c", TensorType(Type.FLOAT, 3), None),)),
}
RESERVED = set(BUILTIN_LEAVES) | {"score", "inf"} | FUNCTIONS | set(SELECTORS)   # names in scope
_BUILTIN = RESERVED | set(BUILTIN_NAMES)       # cannot be declared (builtins to come included)


class _Reported(Exception):
    """An error already reported elsewhere (e.g. a use of a recursive def); adds nothing."""


class _TooLarge(Exception):
    """Inlining the defs of one pattern made more than MAX_TREE_SIZE nodes of work."""


@dataclass
class _Scope:
    """What names mean inside one expression."""

    locals: dict[str, Expr]            # def parameters and lets: name -> checked IR
    params: dict[str, Param]           # pattern parameters (empty inside a def)
    allow_score: bool
    def_stack: tuple[str, ...] = ()


def _type_word(t) -> str:
    return str(t) if isinstance(t, TensorType) else t.value


class Checker:
    def __init__(self, decls: tuple, source: str, prelude: tuple[DefDecl, ...] = (),
                 sink: ErrorSink | None = None, broken: set | None = None):
        self.sink = sink if sink is not None else ErrorSink(source)
        self.broken = set(broken or ())     # declarations that did not parse (already reported)
        self.prelude = {d.name: d for d in prelude}
        self.defs: dict[str, DefDecl] = dict(self.prelude)
        self.patterns: list[PatternDecl] = []
        self.recursive: set[str] = set()
        self._work = 0                  # expression nodes checked for the current pattern
        self._level = 0                 # nesting of the expression being checked (defs expanded)
        self._heights = Heights()
        self._declare(decls)

    # ------------------------------------------------------------------ declarations
    def _declare(self, decls) -> None:
        seen: dict[str, Span] = {}
        for d in decls:
            if d.name in self.prelude:
                self.sink.add(AttnNameError, f"'{d.name}' is already defined by the prelude", d.span)
                continue
            if d.name in _BUILTIN:
                self.sink.add(AttnNameError, f"'{d.name}' is a builtin name and cannot be redeclared",
                              d.span)
                continue
            if d.name in seen:
                first = seen[d.name]
                self.sink.add(AttnNameError, f"'{d.name}' is already declared at line {first.line}",
                              d.span)
                continue
            seen[d.name] = d.span
            if isinstance(d, DefDecl):
                self.defs[d.name] = d
            else:
                self.patterns.append(d)
        for d in self.defs.values():
            if d.name not in self.prelude:
                self._check_def_names(d)
        self._find_recursion()

    def _check_def_names(self, d: DefDecl) -> None:
        params = [p.name for p in d.params or ()]
        seen: set[str] = set()
        for p in d.params or ():
            if p.name in _BUILTIN:
                self.sink.add(AttnNameError, f"'{p.name}' is a builtin name and cannot be a parameter",
                              p.span)
            elif p.name in seen:
                self.sink.add(AttnNameError, f"parameter '{p.name}' is declared twice", p.span)
            seen.add(p.name)
            if p.default is not None:
                self._check_names(p.default, set())
        self._check_names(d.body, set(params))

    def _check_names(self, node: Node, local: set[str]) -> None:
        """Report unknown names in a def body (types are checked when the def is used)."""
        for n in walk_surface(node):
            if n.value in self.broken:
                continue
            if n.kind == "name" and n.value not in local and n.value not in self.defs \
                    and n.value not in RESERVED:
                self.sink.add(AttnNameError, f"unknown name '{n.value}'", n.span)
            elif n.kind == "call" and n.value not in local and n.value not in self.defs \
                    and n.value not in FUNCTIONS and n.value not in SELECTORS:
                self.sink.add(AttnNameError, f"unknown name '{n.value}'", n.span)
            elif n.kind == "index" and n.value not in local:
                self.sink.add(AttnNameError,
                              f"'{n.value}' is not a tensor input here: a def cannot index "
                              "a pattern's tensors", n.span)

    def _find_recursion(self) -> None:
        graph: dict[str, list[tuple[str, Span]]] = {}
        for d in self.defs.values():
            local = {p.name for p in d.params or ()}
            refs = [d.body] + [p.default for p in d.params or () if p.default is not None]
            graph[d.name] = [(n.value, n.span) for r in refs for n in walk_surface(r)
                             if n.kind in ("name", "call") and n.value in self.defs
                             and n.value not in local]
        for cycle, span in cycles(graph):
            self.recursive.update(cycle)
            self.sink.add(AttnNameError, f"recursive def '{cycle[0]}': " + " -> ".join(cycle), span)

    # ------------------------------------------------------------------ patterns
    def check(self) -> dict[str, PatternIR]:
        out: dict[str, PatternIR] = {}
        for decl in self.patterns:
            ir = self._check_pattern(decl)
            if ir is not None:
                out[decl.name] = ir
        self.sink.raise_if_any()
        return out

    def _check_params(self, decl: PatternDecl) -> dict[str, Param]:
        params: dict[str, Param] = {}
        for p in decl.params:
            ptype = parse_type(p.type_name) if p.type_name is not None else None
            reserved = "is a builtin name" if p.name in _BUILTIN else \
                why_reserved(p.name, isinstance(ptype, TensorType))
            if reserved or p.name in self.defs:
                what = reserved or "is already defined as a def"
                self.sink.add(AttnNameError, f"'{p.name}' {what} and cannot be a parameter", p.span)
                continue
            if p.name in params:
                self.sink.add(AttnNameError, f"parameter '{p.name}' is declared twice", p.span)
                continue
            if p.type_name is None:
                v = p.default
                kind = Type.BOOL if isinstance(v, bool) else Type.INT if isinstance(v, int) else Type.FLOAT
                if kind is Type.INT and not INT_MIN <= v <= INT_MAX:
                    self.sink.add(AttnTypeError, f"the default of '{p.name}' is out of range (ints are "
                                  "64-bit)", p.span)
                params[p.name] = Param(p.name, kind, v, p.span)
                continue
            if ptype is None:
                self.sink.add(AttnTypeError, f"unknown type '{p.type_name}' (expected int, float, bool, "
                              "int[], float[], int[][], float[][] or float[][][])", p.span)
                continue
            params[p.name] = Param(p.name, ptype, None, p.span)
        return params

    def _check_pattern(self, decl: PatternDecl) -> PatternIR | None:
        self._work, self._level, self._heights = 0, 0, Heights()
        try:
            return self._check_pattern_body(decl)
        except _TooLarge:
            self.sink.add(AttnTypeError, f"pattern '{decl.name}' is too large after inlining its defs "
                          f"(over {MAX_TREE_SIZE} nodes)", decl.span)
            return None

    def _check_pattern_body(self, decl: PatternDecl) -> PatternIR | None:
        n_errors = len(self.sink.errors)
        params = self._check_params(decl)
        lets: dict[str, Expr | None] = {}      # None: a let whose error is already reported
        mask = score = None
        clause_names: dict[str, Span] = {}
        for clause in decl.clauses:
            if clause.kind not in ("let", "mask", "score"):
                self.sink.add(AttnNameError, f"unknown clause '{clause.name}'; expected 'let NAME = ...', "
                              "'mask = ...' or 'score = ...'", clause.span)
                continue
            key = clause.kind if clause.kind != "let" else "let " + clause.name
            if key in clause_names:
                what = f"let '{clause.name}'" if clause.kind == "let" else f"'{clause.kind}' clause"
                self.sink.add(AttnNameError, f"{what} is already declared at line "
                              f"{clause_names[key].line}", clause.span)
                continue
            clause_names[key] = clause.span
            if clause.kind == "let" and (clause.name in _BUILTIN or clause.name in params
                                         or clause.name in self.defs):
                self.sink.add(AttnNameError, f"'{clause.name}' is already defined and cannot be "
                              "redeclared by let", clause.span)
                continue
            scope = _Scope(dict(lets), params, allow_score=clause.kind != "mask")
            try:
                expr = self.expr(clause.expr, scope)
                if clause.kind == "let":
                    lets[clause.name] = expr
                elif clause.kind == "mask":
                    mask = self._expect(expr, Type.BOOL, "the mask", clause.expr.span)
                    # a let may mention 'score' (for the score clause), but the mask cannot use it
                    use = next((n for n in mask.walk() if n.op is Op.SCORE), None)
                    if use is not None:
                        mask = None
                        raise self._err(AttnTypeError, "'score' may only be used in the score clause "
                                        "(the mask uses it through a let)", use.span)
                else:
                    score = self._expect(expr, Type.FLOAT, "the score", clause.expr.span)
            except AttnError as err:
                self.sink.errors.append(err)
                if clause.kind == "let":
                    lets[clause.name] = None
            except _Reported:
                if clause.kind == "let":
                    lets[clause.name] = None
        if mask is None and "mask" not in clause_names:
            self.sink.add(AttnNameError, f"pattern '{decl.name}' has no 'mask = ...' clause", decl.span)
        if len(self.sink.errors) > n_errors or mask is None:
            return None
        ir = PatternIR(decl.name, tuple(params.values()), mask, score, decl.span)
        if tree_size(ir.roots()) > MAX_TREE_SIZE:
            self.sink.add(AttnTypeError, f"pattern '{decl.name}' is too large after inlining its defs "
                          f"(over {MAX_TREE_SIZE} nodes)", decl.span)
            return None
        try:
            check_constants(ir, {p.name: p.default for p in ir.params if p.default is not None},
                            self.sink.source, partial=True)
        except AttnError as err:
            self.sink.errors.extend(err.all_errors())
            return None
        return ir

    def _expect(self, expr: Expr, want: Type, what: str, span: Span) -> Expr:
        if expr.type is not want:
            raise AttnTypeError(f"{what} must be {want.value}, got {expr.type.value}", span,
                                self.sink.source)
        return expr

    # ------------------------------------------------------------------ expressions
    def _err(self, cls, message: str, span: Span) -> AttnError:
        return cls(message, span, self.sink.source)

    def expr(self, node: Node, scope: _Scope) -> Expr:
        """The checked IR of ``node``. Bounds the nesting (MAX_DEPTH), so that neither this
        recursion nor any later pass recurses deeper: the nesting as written with each use of a
        def replaced by its body (at the node where it is crossed), and the height of the IR
        with lets expanded (at the smallest sub-expression that is too high)."""
        self._work += 1
        if self._work > MAX_TREE_SIZE:
            raise _TooLarge()
        self._level += 1
        try:
            if self._level > MAX_DEPTH:
                raise self._err(AttnTypeError, depth_message(" once defs are expanded"),
                                node.span)      # (the parser bounds the text as written)
            result = self._expr(node, scope)
        finally:
            self._level -= 1
        if self._heights.of(result) > MAX_DEPTH:
            raise self._err(AttnTypeError, depth_message(" once defs and lets are expanded"),
                            node.span)
        return result

    def _expr(self, node: Node, scope: _Scope) -> Expr:
        kind = node.kind
        if kind == "int":
            if not INT_MIN <= node.value <= INT_MAX:
                shown = "" if node.value == HUGE_INT else f" {node.value}"
                raise self._err(AttnTypeError, f"integer literal{shown} is out of range (ints are "
                                "64-bit)", node.span)
            return Expr(Op.CONST, Type.INT, (), node.value, node.span)
        if kind == "float":
            return Expr(Op.CONST, Type.FLOAT, (), node.value, node.span)
        if kind == "bool":
            return Expr(Op.CONST, Type.BOOL, (), node.value, node.span)
        if kind == "name":
            return self._name(node, scope)
        if kind == "neg":
            x = self.expr(node.children[0], scope)
            self._numeric(x, "unary '-'", node.span)
            return Expr(Op.NEG, x.type, (x,), None, node.span)
        if kind == "not":
            x = self._bool(self.expr(node.children[0], scope), "'not'", node.children[0].span)
            return Expr(Op.NOT, Type.BOOL, (x,), None, node.span)
        if kind in ("and", "or"):
            return self._logic(node, scope)
        if kind in _BINARY:
            return self._binary(node, scope)
        if kind == "chain":
            return self._chain(node, scope)
        if kind == "if":
            test = self._bool(self.expr(node.children[0], scope), "the condition of 'if'",
                              node.children[0].span)
            a = self.expr(node.children[1], scope)
            b = self.expr(node.children[2], scope)
            if a.type is not b.type:
                raise self._err(AttnTypeError, f"both branches of 'if' must have one type, got "
                                f"{a.type.value} and {b.type.value}", node.children[2].span)
            return Expr(Op.IF, a.type, (test, a, b), None, node.span)
        if kind == "call":
            return self._call(node, scope)
        if kind == "index":
            return self._index(node, scope)
        raise self._err(AttnTypeError, "unsupported expression", node.span)  # pragma: no cover

    def _numeric(self, x: Expr, what: str, span: Span) -> None:
        if x.type not in (Type.INT, Type.FLOAT):
            raise self._err(AttnTypeError, f"{what} needs an int or float, got {x.type.value}", span)

    def _bool(self, x: Expr, what: str, span: Span) -> Expr:
        if x.type is not Type.BOOL:
            raise self._err(AttnTypeError, f"{what} needs a bool, got {x.type.value}", span)
        return x

    def _name(self, node: Node, scope: _Scope) -> Expr:
        name = node.value
        if name in scope.locals:
            value = scope.locals[name]
            if value is None:           # a let that failed to check: its error is reported
                raise _Reported()
            return value
        if name in scope.params:
            p = scope.params[name]
            if p.is_tensor:
                raise self._err(AttnTypeError, f"'{name}' is a tensor input ({p.type}); index it, "
                                f"as in {name}[q]", node.span)
            return Expr(Op.PARAM, p.type, (), name, node.span)
        if name in BUILTIN_LEAVES:
            return Expr(BUILTIN_LEAVES[name], Type.INT, (), None, node.span)
        if name == "score":
            if not scope.allow_score:
                raise self._err(AttnTypeError, "'score' may only be used in the score clause", node.span)
            return Expr(Op.SCORE, Type.FLOAT, (), None, node.span)
        if name == "inf":
            return Expr(Op.CONST, Type.FLOAT, (), float("inf"), node.span)
        if name in self.defs:
            return self._inline(self.defs[name], (), node, scope)
        if name in FUNCTIONS or name in SELECTORS:
            raise self._err(AttnTypeError, f"'{name}' is a function; call it", node.span)
        if name in self.broken:
            raise _Reported()
        raise self._err(AttnNameError, f"unknown name '{name}'", node.span)

    def _binary(self, node: Node, scope: _Scope) -> Expr:
        op = _BINARY[node.kind]
        a = self.expr(node.children[0], scope)   # no comprehensions on the recursive paths:
        b = self.expr(node.children[1], scope)   # each adds a frame per level
        if op in (Op.DIV, Op.POW):
            for x, c in ((a, node.children[0]), (b, node.children[1])):
                if x.type is not Type.FLOAT:
                    hint = " (write float(x), or use '//' for floor division)" if op is Op.DIV else \
                        " (write float(x))"
                    raise self._err(AttnTypeError, f"'{node.kind}' needs float operands, got "
                                    f"{x.type.value}{hint}", c.span)
            return Expr(op, Type.FLOAT, (a, b), None, node.span)
        if op in (Op.FLOORDIV, Op.MOD):
            for x, c in ((a, node.children[0]), (b, node.children[1])):
                if x.type is not Type.INT:
                    raise self._err(AttnTypeError, f"'{node.kind}' needs int operands, got "
                                    f"{x.type.value}", c.span)
            if not is_constant(b):
                raise self._err(AttnTypeError, f"the divisor of '{node.kind}' must be a compile-time "
                                "constant (a literal or a scalar parameter)", node.children[1].span)
            return Expr(op, Type.INT, (a, b), None, node.span)
        self._numeric(a, f"'{node.kind}'", node.children[0].span)
        if a.type is not b.type:
            raise self._err(AttnTypeError, f"operands of '{node.kind}' must have one type, got "
                            f"{a.type.value} and {b.type.value} (convert with float(x))",
                            node.children[1].span)
        return Expr(op, a.type, (a, b), None, node.span)

    def _compare(self, op_text: str, a: Expr, b: Expr, span: Span) -> Expr:
        op = _COMPARE[op_text]
        if a.type is not b.type:
            raise self._err(AttnTypeError, f"cannot compare {a.type.value} with {b.type.value} "
                            f"using '{op_text}'", span)
        if a.type is Type.BOOL and op not in (Op.EQ, Op.NE):
            raise self._err(AttnTypeError, f"'{op_text}' does not order bools", span)
        return Expr(op, Type.BOOL, (a, b), None, a.span)

    def _chain(self, node: Node, scope: _Scope) -> Expr:
        operands = []
        for c in node.children:
            operands.append(self.expr(c, scope))
        cmps = [self._compare(op_text, operands[i], operands[i + 1], node.children[i + 1].span)
                for i, op_text in enumerate(node.value)]

        def left_deep():
            result = cmps[0]
            for cmp in cmps[1:]:
                result = Expr(Op.AND, Type.BOOL, (result, cmp), None, node.span)
            return result
        return self._logic_ir(Op.AND, cmps, node.span, left_deep)

    def _logic(self, node: Node, scope: _Scope) -> Expr:
        """A chain of 'and' (or of 'or'), however long, in one call (see logic_chain)."""
        kind = node.kind
        operands = surface_operands(node)
        checked = {}
        for c in operands:
            checked[id(c)] = self._bool(self.expr(c, scope), f"'{kind}'", c.span)
        op = Op.AND if kind == "and" else Op.OR

        def as_written(n: Node = node) -> Expr:     # <= LOGIC_RUN operands: shallow
            if n.kind != kind:
                return checked[id(n)]
            a, b = (as_written(c) for c in n.children)
            return Expr(op, Type.BOOL, (a, b), None, n.span)
        return self._logic_ir(op, list(checked.values()), node.span, as_written)

    def _logic_ir(self, op: Op, items: list[Expr], span: Span, as_written) -> Expr:
        out = logic_chain(op, items, span, as_written, MAX_TREE_SIZE - self._work)
        if out is None:
            raise _TooLarge()
        self._work += len(items)
        return out

    def _index(self, node: Node, scope: _Scope) -> Expr:
        name = node.value
        p = scope.params.get(name)
        if p is None or not p.is_tensor:
            if name in scope.params or name in scope.locals or name in self.defs or name in RESERVED:
                raise self._err(AttnTypeError, f"'{name}' is not a tensor input and cannot be indexed",
                                node.span)
            raise self._err(AttnNameError, f"unknown name '{name}'", node.span)
        if len(node.children) != p.type.rank:
            raise self._err(AttnTypeError, f"'{name}' has type {p.type} and takes {p.type.rank} "
                            f"index{'es' if p.type.rank > 1 else ''}, got {len(node.children)}",
                            node.span)
        idx = []
        for c in node.children:
            x = self.expr(c, scope)
            if x.type is not Type.INT:
                raise self._err(AttnTypeError, f"an index must be int, got {x.type.value}", c.span)
            idx.append(x)
        return Expr(Op.INDEX, p.type.elem, tuple(idx), name, node.span)

    # ------------------------------------------------------------------ calls
    def _split_args(self, node: Node) -> tuple[list[Node], list[Node]]:
        pos = [c for c in node.children if c.kind != "kwarg"]
        kw = [c for c in node.children if c.kind == "kwarg"]
        first_kw = next((i for i, c in enumerate(node.children) if c.kind == "kwarg"), None)
        if first_kw is not None and any(c.kind != "kwarg" for c in node.children[first_kw:]):
            bad = next(c for c in node.children[first_kw:] if c.kind != "kwarg")
            raise self._err(AttnTypeError, "a positional argument cannot follow a named one", bad.span)
        return pos, kw

    def _bind_args(self, fname: str, names: list[str], defaults: dict[str, object], node: Node):
        """Match a call's arguments to parameter names; returns name -> surface node (or default)."""
        pos, kw = self._split_args(node)
        if len(pos) > len(names):
            raise self._err(AttnTypeError, f"'{fname}' takes at most {len(names)} argument"
                            f"{'s' if len(names) != 1 else ''}, got {len(pos)}", pos[len(names)].span)
        bound: dict[str, object] = dict(zip(names, pos))
        for k in kw:
            if k.value not in names:
                raise self._err(AttnTypeError, f"'{fname}' has no parameter '{k.value}'", k.span)
            if k.value in bound:
                raise self._err(AttnTypeError, f"argument '{k.value}' of '{fname}' given twice", k.span)
            bound[k.value] = k.children[0]
        for n in names:
            if n not in bound:
                if defaults.get(n) is None:
                    raise self._err(AttnTypeError, f"'{fname}' is missing its argument '{n}'", node.span)
                bound[n] = defaults[n]
        return bound

    def _call(self, node: Node, scope: _Scope) -> Expr:
        name = node.value
        if name in scope.locals or name in scope.params:
            raise self._err(AttnTypeError, f"'{name}' is not a function", node.span)
        if name in self.defs:
            return self._inline(self.defs[name], node.children, node, scope)
        if name in SELECTORS:
            return self._selector(node, scope)
        if name not in FUNCTIONS:
            if name in self.broken:
                raise _Reported()
            raise self._err(AttnNameError, f"unknown name '{name}'", node.span)
        pos, kw = self._split_args(node)
        if kw:
            raise self._err(AttnTypeError, f"'{name}' takes no named arguments", kw[0].span)
        args = []
        for c in pos:
            args.append(self.expr(c, scope))
        arity = {"min": None, "max": None, "clamp": 3}.get(name, 1)
        if (arity is None and len(args) < 2) or (arity is not None and len(args) != arity):
            want = "at least 2 arguments" if arity is None else \
                f"{arity} argument{'s' if arity > 1 else ''}"
            raise self._err(AttnTypeError, f"'{name}' takes {want}, got {len(args)}", node.span)
        if name == "float":
            if args[0].type is Type.FLOAT:
                return args[0]
            if args[0].type is not Type.INT:
                raise self._err(AttnTypeError, f"float() takes an int, got {args[0].type.value}",
                                pos[0].span)
            return Expr(Op.FLOAT, Type.FLOAT, (args[0],), None, node.span)
        if name in _UNARY_FUNCS:
            if args[0].type is not Type.FLOAT:
                raise self._err(AttnTypeError, f"'{name}' takes a float, got {args[0].type.value} "
                                "(write float(x))", pos[0].span)
            return Expr(_UNARY_FUNCS[name], Type.FLOAT, (args[0],), None, node.span)
        for a, c in zip(args, pos):
            self._numeric(a, f"'{name}'", c.span)
            if a.type is not args[0].type:
                raise self._err(AttnTypeError, f"the arguments of '{name}' must have one type, got "
                                f"{args[0].type.value} and {a.type.value}", c.span)
        t = args[0].type
        if name == "abs":
            return Expr(Op.ABS, t, (args[0],), None, node.span)
        if name == "clamp":
            inner = Expr(Op.MAX, t, (args[0], args[1]), None, node.span)
            return Expr(Op.MIN, t, (inner, args[2]), None, node.span)
        return Expr(Op.MIN if name == "min" else Op.MAX, t, tuple(args), None, node.span)

    def _selector(self, node: Node, scope: _Scope) -> Expr:
        op, signature = SELECTORS[node.value]
        names = [s[0] for s in signature]
        defaults = {s[0]: s[2] for s in signature}
        bound = self._bind_args(node.value, names, defaults, node)
        if op is Op.ROUTE:
            arg = bound["c"]
            p = scope.params.get(arg.value) if arg.kind == "name" else None
            if p is None or p.type != TensorType(Type.FLOAT, 3):
                raise self._err(AttnTypeError, "route(c) needs a tensor input c of type float[][][] "
                                "(centroids [heads, C, head_dim])", arg.span)
            return Expr(Op.ROUTE, Type.BOOL, (), arg.value, node.span)
        args = []
        for pname, ptype, _default in signature:
            value = bound[pname]
            if isinstance(value, Node):
                x = self.expr(value, scope)
                span = value.span
            else:
                x = Expr(Op.CONST, ptype, (), value, node.span)
                span = node.span
            if x.type is not ptype:
                raise self._err(AttnTypeError, f"argument '{pname}' of '{node.value}' must be "
                                f"{ptype.value}, got {x.type.value}", span)
            if not is_constant(x):
                raise self._err(AttnTypeError, f"argument '{pname}' of '{node.value}' must be a "
                                "compile-time constant (a literal or a scalar parameter)", span)
            args.append(x)
        return Expr(op, Type.BOOL, tuple(args), None, node.span)

    def _inline(self, d: DefDecl, arg_nodes: tuple, node: Node, scope: _Scope) -> Expr:
        if d.name in self.recursive:
            raise _Reported()
        if node.kind == "name" and d.params:
            raise self._err(AttnTypeError, f"'{d.name}' takes parameters; call it as "
                            f"{d.name}(...)", node.span)
        names = [p.name for p in d.params or ()]
        defaults = {p.name: p.default for p in d.params or ()}
        bound = self._bind_args(d.name, names, defaults, node) if node.kind == "call" else {}
        def_scope = _Scope({}, {}, scope.allow_score, scope.def_stack + (d.name,))
        if len(def_scope.def_stack) > MAX_DEPTH:
            raise self._err(AttnTypeError, f"defs nested too deeply: more than {MAX_DEPTH} "
                            "uses of defs inside one another", node.span)
        local: dict[str, Expr] = {}
        for n in names:
            arg = bound[n]
            is_default = any(arg is p.default for p in d.params if p.name == n)
            local[n] = self.expr(arg, def_scope if is_default else scope)
        def_scope.locals = local
        self._level -= 1            # the body takes the place of the use: no level of its own
        try:
            return self.expr(d.body, def_scope)
        except AttnError as err:
            if d.name in self.prelude and (err.span is None or err.span.filename == PRELUDE_FILENAME):
                raise self._err(type(err), f"{err.message} (inside the prelude's '{d.name}')",
                                node.span) from None
            raise
        finally:
            self._level += 1
