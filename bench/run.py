"""Run the benchmarks and write docs/performance.md: ``python3 bench/run.py [--quick]``.

See ``bench/harness.py`` for the options, and ``bench/suites/`` for what is measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
