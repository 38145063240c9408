"""Helpers of the checker over surface declarations (no IR is built here).

* :func:`walk_surface` — every node of a surface expression, iteratively.
* :func:`parse_type` — a parameter's type text ('int', 'float[][]', ...) -> Type, TensorType or
  None when the language has no such type.
* :func:`cycles` — input: the def call graph (def name -> [(callee, span of the use)]).
  Output: each cycle found by a depth-first search in the graph's order, as (the list of names
  from the callee round to itself, the span of the use closing it). Iterative: a file may hold
  long chains of defs.
"""

from __future__ import annotations

from .errors import Span
from .ir import TensorType, Type
from .parser import Node

_TYPE_NAMES = {"int": Type.INT, "float": Type.FLOAT, "bool": Type.BOOL}


def walk_surface(node: Node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(c for c in n.children if isinstance(c, Node))


def parse_type(text: str):
    base = text.rstrip("[]")
    rank = (len(text) - len(base)) // 2
    t = _TYPE_NAMES.get(base)
    if t is None:
        return None
    if rank == 0:
        return t
    if rank > 3:
        return None
    return TensorType(t, rank)


def cycles(graph: dict[str, list[tuple[str, Span]]]) -> list[tuple[list[str], Span]]:
    found = []
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    for root in graph:
        if root in state:
            continue
        state[root] = 1
        path, todo = [root], [iter(graph[root])]
        while todo:
            callee, span = next(todo[-1], (None, None))
            if callee is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(callee) == 1:
                found.append((path[path.index(callee):] + [callee], span))
            elif callee not in state:
                state[callee] = 1
                path.append(callee)
                todo.append(iter(graph[callee]))
    return found
