"""Refuse to spawn from module-level code of a main script that lacks `if __name__ == "__main__":`.

A child started with "spawn" re-runs the parent's main module (as `__mp_main__`) before it runs
its target. If the code that created the child runs at module level outside the main guard, the
child re-runs it too and tries to start a child of its own during its bootstrap, which
multiprocessing refuses: the child dies before it ever reads its target, and depending on what the
parent was sending it at that moment the parent either waits forever or gets an error naming
neither the script nor the line. `check_main_guard` finds that situation in the parent, before
anything is spawned, and names the line.

It decides like multiprocessing does which main modules a spawned child re-runs (a script run by
path or a module run with `-m`, except a package's `__main__` and IPython's launcher), and skips
the check when there is no main file to read (the REPL, `python -c`, notebooks).
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from types import FrameType, ModuleType

__all__ = ["check_main_guard"]


def check_main_guard(what: str) -> None:
    """Raise RuntimeError if `what` (e.g. "HFRolloutEngine(mode='process')") is being created by
    module-level code of the main script outside `if __name__ == "__main__":`."""
    main = sys.modules.get("__main__")
    path = _main_path_rerun_by_spawn(main)
    if main is None or path is None:
        return
    frame = _main_module_frame(main, path)
    if frame is None:  # the main module's body has finished or is not on this thread's stack
        return
    line = frame.f_lineno
    del frame  # a frame held in a local keeps every local of the stack alive
    if _inside_main_guard(path, line) is not False:
        return
    raise RuntimeError(
        f"{what} is being created by module-level code of the main script {path}, line {line}, "
        'outside an `if __name__ == "__main__":` block. Its child process is started with '
        "'spawn', which re-runs that module-level code in the child, where it would try to start "
        "another child and die before it could serve. Move the code that creates it (or the call "
        f'that leads to it) under `if __name__ == "__main__":` in {path}, or pass mode="thread".'
    )


def _main_path_rerun_by_spawn(main: ModuleType | None) -> str | None:
    """The main module's source file when a spawned child would re-run it, else None."""
    if main is None:
        return None
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    path = getattr(main, "__file__", None)
    if spec_name is not None and (spec_name == "__main__" or spec_name.endswith(".__main__")):
        return None  # spawn leaves a package's __main__ alone
    if not isinstance(path, str) or not os.path.isfile(path):
        return None  # no script file to re-run or to read (a REPL, -c, a zip app, a notebook)
    if spec_name is None and Path(path).stem == "ipython":
        return None  # spawn's own exception for IPython's unguarded launcher
    return os.path.abspath(path)


def _main_module_frame(main: ModuleType, path: str) -> FrameType | None:
    """The frame running the main module's body on this thread's stack, if there is one."""
    frame = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_code.co_name == "<module>"
            and frame.f_globals is main.__dict__
            and os.path.abspath(frame.f_code.co_filename) == path
        ):
            return frame
        frame = frame.f_back
    return None


def _inside_main_guard(path: str, line: int) -> bool | None:
    """Whether `line` of `path` lies in the body of an `if __name__ == "__main__":` block; None
    when the file cannot be read or parsed (it changed, or it is not Python source)."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test):
            last = node.body[-1].end_lineno or node.body[-1].lineno
            if node.body[0].lineno <= line <= last:
                return True
    return False


def _is_main_test(test: ast.expr) -> bool:
    """`__name__ == "__main__"` (either way round), alone or as one term of an `and`."""
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return any(_is_main_test(value) for value in test.values)
    if not (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.Eq)
        and len(test.comparators) == 1
    ):
        return False
    sides = (test.left, test.comparators[0])
    has_name = any(isinstance(side, ast.Name) and side.id == "__name__" for side in sides)
    has_main = any(isinstance(side, ast.Constant) and side.value == "__main__" for side in sides)
    return has_name and has_main
