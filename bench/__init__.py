"""Benchmarks of driftwarden against its peers (AIDE, debsums, sha256sum) and the disk.

``python3 bench/run.py`` runs everything and writes ``docs/performance.md``;
``python3 bench/run.py --quick`` tries the harness on a small tree. ``bench/suites/`` holds
one module per issue's targets; ``bench/treegen.py`` makes the reproducible tree.
"""
