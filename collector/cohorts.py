"""Cohorts: hosts launched from one image compared with each other.

Fifty hosts of one image should look alike. A host whose boot measurement (Merkle root) is not
the one most of its cohort has, or that drifted on paths most of its cohort did not, is the odd
one out, named with those paths. A change every host shares is not odd (it points at the image
or a fleet-wide push, which the storm rails handle).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from collector.model import GONE_STATES, Host


def compare(build_id: str, hosts: Sequence[Host], drift: Mapping[str, set[str]]) -> dict[str, Any]:
    live = [h for h in hosts if h.state not in GONE_STATES]
    roots = Counter(h.measured_root for h in live if h.measured_root)
    top = roots.most_common(1)
    majority_root = top[0][0] if top and top[0][1] > roots.total() / 2 else None
    shared = Counter(path for h in live for path in drift.get(h.host_id, ()))
    half = len(live) / 2
    odd = []
    for host in live:
        paths = sorted(p for p in drift.get(host.host_id, ()) if shared[p] <= half)
        # a host that sent no root (no boot check yet, or an older agent) is not compared
        other_root = majority_root is not None and host.measured_root not in (
            None,
            "",
            majority_root,
        )
        if paths or other_root:
            odd.append(
                {
                    "host_id": host.host_id,
                    "state": host.state.value,
                    "measured_root": host.measured_root,
                    "root_differs": other_root,
                    "paths": paths,
                }
            )
    return {"build_id": build_id, "hosts": len(live), "majority_root": majority_root, "odd": odd}
