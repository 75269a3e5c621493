r"""Runs a Python program as ``python PROGRAM ARGS`` would, and records what it imported.

COMMAND (``benchmarks/gpu_run.py --check`` runs every tiny part through it):
  python benchmarks/import_audit.py REPORT.json BLOCKED PROGRAM [ARGS...]

* ``BLOCKED`` is a comma-separated list of top-level module names (may be empty) that
  the GPU machine does not have (grain, tensorflow_datasets, ...): they are hidden from every
  import finder, so importing one raises ``ModuleNotFoundError`` and ``find_spec`` returns
  None, as there; a program that needs one fails here too, one that only tries it goes on;
* at exit (normal, ``sys.exit`` or an exception) ``REPORT.json`` gets
  ``{"modules": [top-level names], "files": [each imported module's file], "blocked_attempts": [...]}``;
  the caller maps the files to the distributions that own them and compares those with the
  GPU machine's packages.
"""
import atexit
import json
import os
import runpy
import sys


def main() -> None:
    report, blocked_csv, program, *args = sys.argv[1:]
    blocked = frozenset(name for name in blocked_csv.split(",") if name)
    attempts = set()

    class _Hidden:
        """Wraps one import finder: the blocked modules (and their distributions' metadata) are
        not found, so ``import x`` raises ModuleNotFoundError and ``importlib.util.find_spec(x)``
        returns None, as on a machine without them."""

        def __init__(self, inner):
            self._inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in blocked:
                attempts.add(name.partition(".")[0])
                return None
            find = getattr(self._inner, "find_spec", None)
            return find(name, path, target) if find is not None else None

        def find_distributions(self, *args, **kwargs):
            find = getattr(self._inner, "find_distributions", None)
            for dist in (find(*args, **kwargs) if find is not None else ()):
                if (dist.metadata["Name"] or "").lower().replace("-", "_") not in blocked_dists:
                    yield dist

        def __getattr__(self, attr):  # invalidate_caches and the rest
            return getattr(self._inner, attr)

    blocked_dists = {name.lower().replace("-", "_") for name in blocked}
    sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]

    def dump() -> None:
        modules = dict(sys.modules)
        names = sorted({m.partition(".")[0] for m in modules})
        files = sorted({os.path.abspath(f) for f in (getattr(m, "__file__", None) for m in modules.values())
                        if isinstance(f, str)})
        with open(report, "w") as f:
            json.dump({"program": program, "modules": names, "files": files,
                       "blocked_attempts": sorted(attempts)}, f)

    atexit.register(dump)
    sys.argv = [program, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(program))  # as `python PROGRAM` sets it
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main()
