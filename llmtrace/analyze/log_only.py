"""The source lines of a program that exist only to feed a log call: the call itself (all
its lines, the formatting of its arguments included) and the assignments whose every use
is in such a line, e.g. a top-k sort computed the line before it is logged:

    top = np.argsort(probs)[-5:]                  # only logged: the log call's cost
    log.info("top tokens %s", top.tolist())

A sample on either line is time that removing (or guarding) the log call saves; without
this, the sort's time stayed in the step's unattributed host work. Found from the
function's syntax tree, by names: a value that is also returned, stored or passed to
anything else is not log-only (a conservative reading: a name used anywhere else in the
function, nested functions included, keeps its assignment out).
"""

from __future__ import annotations

import ast
import functools
import linecache
import re
from collections import defaultdict
from collections.abc import Iterator

LEVELS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "log"})
# the receiver of a log call: log, logger, LOG, _logger, logging, self.log, self.logger, ...
_LOGGER = r"_*(?i:log|logger|logging)"
LOGGER_NAME = re.compile(rf"^{_LOGGER}$")
# a log call in a line's text (its time there is the formatting of its arguments: an
# f-string or a %-format runs before the call, whether or not the level is enabled)
LOG_CALL_TEXT = re.compile(rf"\b{_LOGGER}\.({'|'.join(sorted(LEVELS))})\s*\(")
_COMPOUND = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match)


@functools.lru_cache(maxsize=256)
def log_only_lines(path: str) -> dict[int, str]:
    """{line: the log call's level} for every log-only line of the file at `path` ({} when
    it cannot be read or parsed)."""
    try:
        tree = ast.parse("".join(linecache.getlines(path)))
    except (SyntaxError, ValueError):
        return {}
    out: dict[int, str] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.update(_in_function(fn))
    return out


def log_level(stmt: ast.stmt) -> str | None:
    """The level of a statement that is a log call (`log.debug(...)`, `self.logger.info(...)`)."""
    call = stmt.value if isinstance(stmt, ast.Expr) else None
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute) or call.func.attr not in LEVELS:
        return None
    receiver = call.func.value
    name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", "")
    return call.func.attr if LOGGER_NAME.match(name) else None


def _in_function(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[int, str]:
    statements = list(_own_statements(fn.body))
    loads: dict[str, list[ast.stmt]] = defaultdict(list)  # name -> the statements that read it
    for stmt in statements:
        for name in _loaded(stmt):
            loads[name].append(stmt)
    level = {id(s): lv for s in statements if (lv := log_level(s))}
    if not level:
        return {}
    changed = True
    while changed:  # assignments read only by log-only statements, to a fixed point
        changed = False
        for stmt in statements:
            targets = _assigned_names(stmt)
            if id(stmt) in level or not targets:
                continue
            readers = [r for name in targets for r in loads[name] if r is not stmt]
            if readers and all(id(r) in level for r in readers):
                level[id(stmt)] = level[id(readers[0])]
                changed = True
    return {
        line: level[id(s)]
        for s in statements
        if id(s) in level
        for line in range(s.lineno, (s.end_lineno or s.lineno) + 1)
    }


def _own_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The simple statements of a function's body, inside its compound statements too, not
    those of the functions and classes it defines."""
    for stmt in body:
        if isinstance(stmt, _COMPOUND):
            for field in ("body", "orelse", "finalbody"):
                yield from _own_statements(getattr(stmt, field, []))
            for handler in getattr(stmt, "handlers", []):
                yield from _own_statements(handler.body)
            for case in getattr(stmt, "cases", []):
                yield from _own_statements(case.body)
            yield stmt  # its header (a test, an iterable) reads names too
        else:
            yield stmt  # a nested def too: its reads count as uses; it is never log-only


def _loaded(stmt: ast.stmt) -> set[str]:
    """Names a statement reads; a compound statement's header only (its body's statements
    are visited on their own), a nested def's whole body."""
    if isinstance(stmt, _COMPOUND):
        parts: list[ast.AST] = [getattr(stmt, f) for f in ("test", "iter", "subject") if hasattr(stmt, f)]
        parts += [item.context_expr for item in getattr(stmt, "items", [])]
    else:
        parts = [stmt]
    return {n.id for p in parts for n in ast.walk(p) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _assigned_names(stmt: ast.stmt) -> list[str]:
    """The names a plain assignment binds (`a = ...`, `a, b = ...`, `a: T = ...`, `a += ...`);
    [] for any other statement or any other target (an attribute, an item: a store that
    outlives the function)."""
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) and stmt.value is not None:
        targets = [stmt.target]
    else:
        return []
    names: list[str] = []
    for t in targets:
        elts = t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]
        if not all(isinstance(e, ast.Name) for e in elts):
            return []
        names += [e.id for e in elts if isinstance(e, ast.Name)]
    return names
