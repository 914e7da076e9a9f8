"""Alias of the benchmark package, which moved to ``benchmarks/bench`` in the repository (it is not installed).

Kept only so that scripts still importing ``datacredit.bench`` (``benchmarks/queries.py``) run from a checkout; it
is excluded from the wheel (pyproject) and is to be removed once no script imports it. The submodules are the very
``benchmarks.bench`` modules (one registry of methods, not two copies).
"""

import importlib
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if not (_ROOT / "benchmarks" / "bench" / "__init__.py").is_file():
    raise ImportError("datacredit.bench moved to benchmarks/bench in the datacredit repository; it is not installed "
                      "with the package. Run the benchmarks from a checkout and import benchmarks.bench")
if str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))

from benchmarks.bench import *  # noqa: E402, F403
from benchmarks.bench import __all__  # noqa: E402, F401

for _name in ("cases", "isolate", "measure", "methods", "peers", "report", "runner"):
    globals()[_name] = sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"benchmarks.bench.{_name}")
