"""``python pipelines/benchmark.py ...``: the same as ``himatch-med benchmark ...`` (:mod:`himatch_med.benchmark`).

The benchmark is loaded from this checkout's file even when ``PYTHONPATH`` puts an older checkout's package first,
so that ``PYTHONPATH=old/ python pipelines/benchmark.py ...`` measures the older code with today's measuring code.
"""

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("himatch_benchmark", Path(__file__).resolve().parents[1] / "himatch_med"
                                              / "benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)
main, parser = benchmark.main, benchmark.parser

if __name__ == "__main__":
    sys.exit(main())
