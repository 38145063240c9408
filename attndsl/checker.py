"""Pass 2, check: surface declarations -> typed :class:`~attndsl.ir.PatternIR` per pattern.

Input: the parser's declarations for one file plus the prelude's defs. Output: a dict of
pattern name -> PatternIR satisfying the invariants in :mod:`attndsl.ir` and those of
:mod:`attndsl.limits` (every root at most MAX_DEPTH high; and/or chains of more than LOGIC_RUN
operands balanced), or an AttnError carrying every name/type error found (one per clause at
most; all clauses are visited).

Scoping: a def sees its own parameters, the other defs, the prelude and the builtins; a
pattern's clauses also see its parameters and the earlier lets. Defs are macros: their bodies
are checked when inlined at a call, with the call's argument IR substituted for parameters.
Each op is typed by its rule in :data:`TYPING` (signatures and spellings: :mod:`attndsl.ops`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import check_constants
from .decls import cycles, parse_type, walk_surface
from .errors import AttnError, AttnNameError, AttnTypeError, ErrorSink, Span
from .ir import BUILTIN_LEAVES, Expr, Op, Param, PatternIR, TensorType, Type, const, kv_head_expr, rewrite
from .limits import MAX_DEPTH, Heights, depth_message, logic_chain, surface_operands, tree_size
from .ops import OPS, REDUCE_OPS, SELECTOR_OPS
from .parser import HUGE_INT, DefDecl, Node, PatternDecl
from .reserved import BUILTIN_NAMES, why_reserved
from .typing_rules import TYPING, TypingRules

PRELUDE_FILENAME = "<prelude>"
MAX_TREE_SIZE = 200_000
INT_MIN, INT_MAX = -(2 ** 63), 2 ** 63 - 1     # ints are int64 in the reference and the kernels

# surface syntax -> op, from the registry (attndsl.ops)
_INFIX = {i.spelling: op for op, i in OPS.items() if i.form == "infix"}
_SURFACE = _INFIX | {"neg": Op.NEG, "not": Op.NOT, "if": Op.IF, "~": Op.INVERT}  # (and, or: _BY_KIND)
_FUNCTIONS = {i.spelling: op for op, i in OPS.items() if i.form == "call" and not i.selector}
FUNCTIONS = set(_FUNCTIONS) | {"clamp"}         # clamp(x, lo, hi) is min(max(x, lo), hi)
# selector signatures: (parameter name, type, default or None when required)
SELECTORS = {i.spelling: (op, i.params) for op, i in OPS.items() if i.selector}
# the functions that take a generator, 'any(E for i in range(N))': name -> op
REDUCTIONS = {OPS[op].spelling: op for op in REDUCE_OPS}
AT = "at"                                       # at(E, q = E1, k = E2): position rebinding
RESERVED = set(BUILTIN_LEAVES) | {"score", "inf", "kv_head", AT, "range"} | FUNCTIONS | \
    set(SELECTORS) | set(REDUCTIONS)
_BUILTIN = RESERVED | set(BUILTIN_NAMES)       # cannot be declared (builtins to come included)
# ops whose operands are type-checked one by one, each before the next is checked (_t_operand)
_EARLY = {Op.NOT, Op.AND, Op.OR, Op.IF, Op.INDEX, Op.TOPK_BLOCKS, Op.TOPP_BLOCKS, Op.RANDOM_BLOCKS}


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
    depth: int = 0                     # reductions around the expression (loop variables bound)


class Checker(TypingRules):
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
                self.sink.add(AttnNameError, f"'{d.name}' is already declared at line "
                              f"{seen[d.name].line}", d.span)
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
        self._check_names(d.body, {p.name for p in d.params or ()})

    def _check_names(self, node: Node, local: set[str]) -> None:
        """Report unknown names in a def body (types are checked when the def is used); a
        reduction's loop variable is known inside its body."""
        stack = [(node, frozenset(local))]
        while stack:
            n, names = stack.pop()
            if n.kind == "reduction":
                stack.append((n.children[0], names | {n.value[1]}))
                stack.extend((c, names) for c in n.children[1:])
                continue
            stack.extend((c, names) for c in n.children if isinstance(c, Node))
            if n.value in self.broken or n.value in names:
                continue
            if n.kind in ("name", "call") and n.value not in self.defs and n.value not in \
                    (RESERVED if n.kind == "name" else FUNCTIONS | set(SELECTORS) | {AT}):
                self.sink.add(AttnNameError, f"unknown name '{n.value}'", n.span)
            elif n.kind == "index":
                self.sink.add(AttnNameError, f"'{n.value}' is not a tensor input here: a def cannot "
                              "index a pattern's tensors", n.span)

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
                kind = const(v).type
                if kind is Type.INT and not INT_MIN <= v <= INT_MAX:
                    self.sink.add(AttnTypeError, f"the default of '{p.name}' is out of range (ints are "
                                  "64-bit)", p.span)
                params[p.name] = Param(p.name, kind, v, p.span)
                continue
            if ptype is None:
                self.sink.add(AttnTypeError, f"unknown type '{p.type_name}' (expected int, float, bool, "
                              "or a tensor type: int, float or bool followed by 1 to 3 '[]')", p.span)
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
            except (AttnError, _Reported) as err:     # (_Reported: an error reported before)
                if isinstance(err, AttnError):
                    self.sink.errors.append(err)
                if clause.kind == "let":
                    lets[clause.name] = None
        if mask is None and "mask" not in clause_names:
            self.sink.add(AttnNameError, f"pattern '{decl.name}' has no 'mask = ...' clause", decl.span)
        if len(self.sink.errors) > n_errors or mask is None:
            return None
        ir = PatternIR(decl.name, tuple(params.values()), mask, score, decl.span)
        if tree_size(ir.roots()) > MAX_TREE_SIZE:
            raise _TooLarge()
        try:
            check_constants(ir, {p.name: p.default for p in ir.params if p.default is not None},
                            self.sink.source, partial=True)
        except AttnError as err:
            self.sink.errors.extend(err.all_errors())
            return None
        return ir

    def _expect(self, expr: Expr, want: Type, what: str, span: Span) -> Expr:
        if expr.type is not want:
            raise self._err(AttnTypeError, f"{what} must be {want.value}, got {expr.type.value}", span)
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
        if kind in ("int", "float", "bool"):
            if kind == "int" and not INT_MIN <= node.value <= INT_MAX:
                shown = "" if node.value == HUGE_INT else f" {node.value}"
                raise self._err(AttnTypeError, f"integer literal{shown} is out of range (ints are "
                                "64-bit)", node.span)
            return self._typed(Op.CONST, [], [], node.span, node.value)
        if kind in _BY_KIND:                # names, and/or, comparisons, calls, indexing
            return _BY_KIND[kind](self, node, scope)
        if kind not in _SURFACE:
            raise self._err(AttnTypeError, "unsupported expression", node.span)  # pragma: no cover
        op = _SURFACE[kind]                 # -x, not x, if and the binary operators
        return self._typed(op, self._operands(op, node.children, scope),
                           [c.span for c in node.children], node.span)

    def _operands(self, op: Op, nodes, scope: _Scope) -> list[Expr]:
        """The checked operands of ``op`` (a loop, no comprehension: on the recursive path)."""
        args = []
        for c in nodes:
            x = self.expr(c, scope)
            if op in _EARLY:
                self._t_operand(op, len(args), x, c.span)
            args.append(x)
        return args

    def _typed(self, op: Op, args: list, spans: list, span: Span, value=None) -> Expr:
        """The node of ``op`` over checked operands, by its typing rule (see TYPING)."""
        return TYPING[op](self, op, args, spans, span, value)

    def _name(self, node: Node, scope: _Scope) -> Expr:
        name = node.value
        if name in scope.locals:
            value = scope.locals[name]
            if value is None:           # a let that failed to check: its error is reported
                raise _Reported()
            return value
        if name in scope.params:
            return self._typed(Op.PARAM, [], [], node.span, scope.params[name])
        if name in BUILTIN_LEAVES:
            return self._typed(BUILTIN_LEAVES[name], [], [], node.span)
        if name == "kv_head":
            return kv_head_expr(node.span)
        if name == "score":
            if not scope.allow_score:
                raise self._err(AttnTypeError, "'score' may only be used in the score clause", node.span)
            return self._typed(Op.SCORE, [], [], node.span)
        if name == "inf":
            return self._typed(Op.CONST, [], [], node.span, float("inf"))
        if name in self.defs:
            return self._inline(self.defs[name], (), node, scope)
        if name in FUNCTIONS or name in SELECTORS:
            raise self._err(AttnTypeError, f"'{name}' is a function; call it", node.span)
        if name in self.broken:
            raise _Reported()
        raise self._err(AttnNameError, f"unknown name '{name}'", node.span)

    def _chain(self, node: Node, scope: _Scope) -> Expr:
        operands = self._operands(None, node.children, scope)
        cmps = [self._typed(_INFIX[op_text], [operands[i], operands[i + 1]],
                            [node.children[i].span, node.children[i + 1].span], node.span)
                for i, op_text in enumerate(node.value)]

        def left_deep():
            result = cmps[0]
            for cmp in cmps[1:]:
                result = self._typed(Op.AND, [result, cmp], [], node.span)
            return result
        return self._logic_ir(Op.AND, cmps, node.span, left_deep)

    def _logic(self, node: Node, scope: _Scope) -> Expr:
        """A chain of 'and' (or of 'or'), however long, in one call (see logic_chain)."""
        kind, op, operands = node.kind, _INFIX[node.kind], surface_operands(node)
        checked = dict(zip(map(id, operands), self._operands(op, operands, scope)))

        def as_written(n: Node = node) -> Expr:     # <= LOGIC_RUN operands: shallow
            if n.kind != kind:
                return checked[id(n)]
            a, b = (as_written(c) for c in n.children)
            return self._typed(op, [a, b], [], n.span)
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
        return self._typed(Op.INDEX, self._operands(Op.INDEX, node.children, scope), [], node.span, p)

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
        if name == AT:
            return self._at(node, scope)
        if name in REDUCTIONS and name not in FUNCTIONS:
            raise self._err(AttnTypeError, f"'{name}' takes a generator: {name}(E for i in "
                            "range(N))", node.span)
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
        op = _FUNCTIONS.get(name)               # None: clamp
        n, variadic = (3, False) if op is None else (OPS[op].arity, OPS[op].variadic)
        if len(args) < n or (len(args) != n and not variadic):
            want = f"at least {n} arguments" if variadic else f"{n} argument{'s' if n > 1 else ''}"
            raise self._err(AttnTypeError, f"'{name}' takes {want}, got {len(args)}", node.span)
        spans = [c.span for c in pos]
        if op is not None:
            return self._typed(op, args, spans, node.span)
        t = self._one_type(name, args, spans)                          # clamp
        inner = Expr(Op.MAX, t, (args[0], args[1]), None, node.span)
        return Expr(Op.MIN, t, (inner, args[2]), None, node.span)

    def _selector(self, node: Node, scope: _Scope) -> Expr:
        op, signature = SELECTORS[node.value]
        names = [s[0] for s in signature]
        defaults = {s[0]: s[2] for s in signature}
        bound = self._bind_args(node.value, names, defaults, node)
        if op is Op.ROUTE:
            arg = bound["c"]
            p = scope.params.get(arg.value) if arg.kind == "name" else None
            return self._typed(op, [], [arg.span], node.span, p)
        args = []
        for pname, ptype, _default in signature:
            value = bound[pname]
            if isinstance(value, Node):
                x, span = self.expr(value, scope), value.span
            else:
                x, span = Expr(Op.CONST, ptype, (), value, node.span), node.span
            self._t_operand(op, len(args), x, span)
            args.append(x)
        return self._typed(op, args, [], node.span)

    def _reduction(self, node: Node, scope: _Scope) -> Expr:
        """``any/all/sum/max/min(E for i in range(N))``: N checked in the enclosing scope, E
        with ``i`` bound to a loop variable (Op.VAR) whose value is the binder's depth."""
        func, var, var_span, range_name, range_span = node.value
        if func not in REDUCTIONS:
            raise self._err(AttnTypeError, f"'{func}' does not take a generator; any, all, sum, "
                            "max and min do", node.span)
        if range_name != "range":
            raise self._err(AttnTypeError, f"a reduction loops over range(N), not "
                            f"'{range_name}'", range_span)
        body, *bounds = node.children
        if len(bounds) != 1 or bounds[0].kind == "kwarg":
            raise self._err(AttnTypeError, f"range() takes one argument N here (the loop runs "
                            f"over 0 .. N-1), got {len(bounds)}", range_span)
        if var in scope.locals or var in scope.params or var in self.defs or var in _BUILTIN:
            what = "a builtin name" if var in _BUILTIN else "already a name in scope"
            raise self._err(AttnNameError, f"loop variable '{var}' is {what}; choose another name",
                            var_span)
        n = self.expr(bounds[0], scope)
        inner = _Scope({**scope.locals, var: Expr(Op.VAR, Type.INT, (), scope.depth, var_span)},
                       scope.params, scope.allow_score, scope.def_stack, scope.depth + 1)
        items = self.expr(body, inner)
        return self._typed(REDUCTIONS[func], [n, items], [bounds[0].span, body.span], node.span,
                           scope.depth)

    def _at(self, node: Node, scope: _Scope) -> Expr:
        """``at(E, q = E1, k = E2)``: E with the builtins q and k replaced (after its defs and
        lets are inlined) by E1 and E2, checked in the enclosing scope."""
        pos, kw = self._split_args(node)
        if len(pos) != 1:
            raise self._err(AttnTypeError, f"'at' takes one expression and q = ... and/or k = ..., "
                            f"got {len(pos)} positional arguments", node.span)
        if not kw:
            raise self._err(AttnTypeError, "'at' needs q = ... or k = ... (the positions to "
                            "rebind)", node.span)
        new: dict[Op, Expr] = {}
        for k in kw:
            op = {"q": Op.Q, "k": Op.K}.get(k.value)
            if op is None:
                raise self._err(AttnTypeError, f"'at' rebinds only q and k, not '{k.value}'", k.span)
            if op in new:
                raise self._err(AttnTypeError, f"argument '{k.value}' of 'at' given twice", k.span)
            x = self.expr(k.children[0], scope)
            if x.type is not Type.INT:
                raise self._err(AttnTypeError, f"'at' rebinds {k.value} to an int, got "
                                f"{x.type.value}", k.children[0].span)
            new[op] = x
        inner = self.expr(pos[0], scope)
        bad = next((n for n in inner.walk() if n.op is Op.SCORE or n.op in SELECTOR_OPS), None)
        if bad is not None:
            what = "'score'" if bad.op is Op.SCORE else f"the selector '{OPS[bad.op].spelling}'"
            raise self._err(AttnTypeError, f"{what} cannot be used inside 'at' (only positions "
                            "are rebound)", bad.span)
        return rewrite(inner, lambda e: new.get(e.op))

    def _inline(self, d: DefDecl, arg_nodes: tuple, node: Node, scope: _Scope) -> Expr:
        if d.name in self.recursive:
            raise _Reported()
        if node.kind == "name" and d.params:
            raise self._err(AttnTypeError, f"'{d.name}' takes parameters; call it as "
                            f"{d.name}(...)", node.span)
        names = [p.name for p in d.params or ()]
        defaults = {p.name: p.default for p in d.params or ()}
        bound = self._bind_args(d.name, names, defaults, node) if node.kind == "call" else {}
        def_scope = _Scope({}, {}, scope.allow_score, scope.def_stack + (d.name,), scope.depth)
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


_C = Checker
_BY_KIND = {"name": _C._name, "and": _C._logic, "or": _C._logic, "chain": _C._chain,
            "call": _C._call, "index": _C._index, "reduction": _C._reduction}
