"""The daemon's own modules loaded without their function and class docstrings (asserts kept).

A function's docstring lives as long as the function (its code object's first constant), a
class's as long as the class: about 140 kB of the idle daemon's resident memory, a tenth of
what its own modules cost, for text nothing reads at run time. ``python -OO`` would drop them
too, but also every ``assert`` of every library, and for every package, ONNX Runtime's and
numpy's included. This import hook compiles only ``agent.*`` without them, caching the result
beside the usual bytecode (``module.cpython-311.opt-nodoc.pyc``, timestamp-checked as CPython
checks its own). Module docstrings stay (the CLI's help is one). Where that cache is missing
and cannot be written (a root-owned install that was not precompiled: ``python -m
agent.nodoc``, which the Debian package runs), the usual bytecode is loaded, docstrings and
all, rather than compiling every module at every start.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import marshal
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import CodeType, ModuleType

PACKAGE = "agent"
TAG = "nodoc"  # the `optimization` part of the cache file's name
_FLAGS = b"\x00\x00\x00\x00"  # PEP 552: a timestamp-based pyc


def strip_docstrings(tree: ast.Module) -> ast.Module:
    """Remove the docstring of every function and class in ``tree`` (the module's own stays)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            body = node.body
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                # A body cannot be empty: `pass` at the docstring's line keeps line numbers
                body[0] = ast.copy_location(ast.Pass(), first)
    return tree


def _header(source: str) -> bytes:
    st = Path(source).stat()
    return (
        importlib.util.MAGIC_NUMBER
        + _FLAGS
        + (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
        + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    )


def compile_source(source: str) -> CodeType:
    """``source``'s module code without its function and class docstrings."""
    tree = ast.parse(Path(source).read_bytes(), source)
    return compile(strip_docstrings(tree), source, "exec", dont_inherit=True)


def cache_path(source: str) -> str:
    return importlib.util.cache_from_source(source, optimization=TAG)


def write_cache(source: str) -> CodeType:
    """Compile ``source`` and write its cache file whole (temporary, rename)."""
    code = compile_source(source)
    target = Path(cache_path(source))
    target.parent.mkdir(exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        partial.write_bytes(_header(source) + marshal.dumps(code))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return code


def _writable(cache: str) -> bool:
    folder = Path(cache).parent
    return os.access(folder if folder.is_dir() else folder.parent, os.W_OK)


class _Loader(importlib.machinery.SourceFileLoader):
    """A source loader that compiles without docstrings, or falls back to the usual bytecode."""

    def get_code(self, fullname: str) -> CodeType:
        source = self.get_filename(fullname)
        cache = cache_path(source)
        try:
            data = Path(cache).read_bytes()
            if data[:16] == _header(source):
                # as trusted as CPython's own .pyc beside it, in the same folder
                code = marshal.loads(memoryview(data)[16:])  # noqa: S302
                if isinstance(code, CodeType):
                    return code
        except (OSError, EOFError, ValueError, TypeError):
            pass  # missing, unreadable or torn: compiled again below
        if sys.dont_write_bytecode or not _writable(cache):
            return super().get_code(fullname)  # type: ignore[return-value]
        try:
            return write_cache(source)
        except OSError:
            return compile_source(source)


class _Finder:
    """A meta path finder that hands ``agent.*`` source modules to the loader above."""

    @classmethod
    def find_spec(
        cls, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(PACKAGE + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or type(spec.loader) is not importlib.machinery.SourceFileLoader:
            return spec
        spec.loader = _Loader(fullname, spec.origin or "")
        return spec


def install() -> None:
    """Load ``agent.*`` modules imported from now on without docstrings (once per process)."""
    if _Finder not in sys.meta_path:
        sys.meta_path.insert(0, _Finder)


def precompile(root: Path | None = None) -> int:
    """Write the cache of every module under the package (an install step); how many."""
    base = root or Path(__file__).resolve().parent
    count = 0
    for source in sorted(base.rglob("*.py")):
        write_cache(str(source))
        count += 1
    return count


if __name__ == "__main__":
    print(f"agent.nodoc: {precompile()} modules compiled without docstrings")
