"""The one judge: a baseline entry against a measurement, by the policy."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from agent.compare import changed_fields, compare_entry, compare_tree
from agent.measure import Entry, measure_path
from agent.policy import Policy, parse_policy
from agent.walk import Same, SameRun
from agent.wire import decode_path
from tests.agent.imagetree import POLICY, at, build

FILE = Entry("/usr/bin/tool", "file", 0o755, 0, 0, 10, "aa" * 32, None, None, (), 0, 5, 6, 7, 1)


@pytest.fixture
def policy() -> Policy:
    import tomllib

    return parse_policy(tomllib.loads(POLICY), source="test.toml")


def changed(**fields: Any) -> Entry:
    return dataclasses.replace(FILE, **fields)


@pytest.mark.parametrize(
    ("after", "fields"),
    [
        (changed(type="dir", size=0, digest=None, nlink=0), {"type", "size", "hardlinks"}),
        (changed(mode=0o4755), {"mode"}),
        (changed(uid=1, gid=2), {"uid", "gid"}),
        (changed(size=11, digest="bb" * 32), {"size", "content"}),
        (changed(digest="bb" * 32), {"content"}),
        (changed(digest=None, state="unreadable"), {"content"}),
        (changed(digest=None, state="unstable"), {"content"}),
        (changed(xattrs=(("security.capability", b"\x01"),)), {"xattrs"}),
        (changed(nlink=2), {"hardlinks"}),
        (changed(mtime_ns=99), {"mtime"}),
        (changed(ctime_ns=99, ino=8), set()),  # hints alone are no change
        (changed(hardlink="/other"), set()),  # identity known on one side only
    ],
)
def test_changed_fields(after: Entry, fields: set[str]) -> None:
    assert set(changed_fields(FILE, after)) == fields


def test_symlink_target_and_device_numbers() -> None:
    link = changed(type="symlink", target="a", digest=None)
    assert changed_fields(link, dataclasses.replace(link, target="b")) == ("target",)
    dev = changed(type="chardev", rdev=5, digest=None, size=0)
    assert changed_fields(dev, dataclasses.replace(dev, rdev=6)) == ("device",)


def test_content_not_measured_on_one_side_is_no_change() -> None:
    assert changed_fields(changed(digest=None), FILE) == ()
    assert changed_fields(FILE, changed(digest=None)) == ()


def judge(policy: Policy, before: Entry | None, after: Entry | None, **kw: Any) -> Any:
    path = (after or before).path  # type: ignore[union-attr]
    return compare_entry(before, after, policy.decide(path), policy, first_boot=False, **kw)


def test_verdicts_by_rule(policy: Policy) -> None:
    finding = judge(policy, FILE, changed(mode=0o777))
    assert (finding.change, finding.fields, finding.drift) == ("modified", ("mode",), True)
    assert (finding.rule, finding.kind, finding.severity) == ("default", "immutable", "warning")

    shadow = changed(path="/etc/shadow")
    finding = judge(policy, shadow, None)
    assert (finding.change, finding.kind, finding.severity) == ("removed", "critical", "critical")

    app = changed(path="/var/lib/app/tool")
    assert judge(policy, app, dataclasses.replace(app, mode=0o777)) is None  # nothing it checks
    finding = judge(policy, None, app)
    assert (finding.change, finding.drift, finding.severity) == ("added", False, "info")

    assert judge(policy, FILE, changed(mtime_ns=1)) is None  # mtime is not a default attribute
    assert judge(policy, FILE, FILE) is None
    assert judge(policy, None, changed(path="/proc/1/status")) is None  # excluded


def test_first_boot_allowance_only_on_first_boot(policy: Policy) -> None:
    mid = changed(path="/etc/machine-id")
    new = dataclasses.replace(mid, digest="cc" * 32)
    decision = policy.decide("/etc/machine-id")
    later = compare_entry(mid, new, decision, policy, first_boot=False)
    first = compare_entry(mid, new, decision, policy, first_boot=True)
    assert later is not None and later.drift is True and later.kind == "first_boot"
    assert first is not None and first.drift is False


def test_growth_only_checks_the_old_content_is_a_prefix(policy: Policy, tmp_path: Path) -> None:
    root = build(tmp_path / "root")
    before = measure_path(root, "/var/log/app.log", policy)
    with at(root, "/var/log/app.log").open("ab") as fh:
        fh.write(b"appended\n")
    grown = measure_path(root, "/var/log/app.log", policy)
    finding = judge(policy, before, grown, root=root)
    assert finding.drift is False and finding.reason.startswith("log grew")
    assert judge(policy, before, grown).drift is True  # without the root, growth is not assumed

    at(root, "/var/log/app.log").write_bytes(b"STARTED\nappended\n")  # same length, new start
    rewritten = measure_path(root, "/var/log/app.log", policy)
    assert judge(policy, before, rewritten, root=root).drift is True


def test_finding_wire_shape(policy: Policy) -> None:
    odd = changed(path="/usr/bin/\udcffodd")
    finding = judge(policy, odd, dataclasses.replace(odd, uid=3))
    wire = json.loads(json.dumps(finding.to_wire()))
    assert set(wire) == {
        "type", "path", "change", "fields", "rule", "class", "drift", "severity", "reason",
        "before", "after",
    }  # fmt: skip
    assert wire["type"] == "file" and wire["path"].startswith("b64:")
    assert decode_path(wire["path"]) == odd.path
    assert ("u" not in wire["before"], wire["after"]["u"]) == (True, 3)  # 0 is left out


class _Reference:
    def __init__(self, entries: Iterable[Entry]) -> None:
        self.entries = {e.path: e for e in entries}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, path: str) -> Entry | None:
        return self.entries.get(path)

    def paths(self) -> Iterable[str]:
        return iter(self.entries)


def test_compare_tree_orders_findings_and_respects_skipped_mounts(policy: Policy) -> None:
    base = [
        changed(path="/usr"),
        changed(path="/usr/b"),
        changed(path="/usr/a"),
        changed(path="/mnt/tmp/x"),
    ]
    measured = [Same("/usr"), changed(path="/usr/a", mode=0o700), changed(path="/usr/new")]
    findings = list(
        compare_tree(_Reference(base), measured, policy, first_boot=False, skipped=["/mnt/tmp"])
    )
    assert [(f.path, f.change) for f in findings] == [
        ("/usr/a", "modified"),
        ("/usr/b", "removed"),
        ("/usr/new", "added"),
    ]


class _Counted(_Reference):
    """A reference that says when all of its paths were listed (to look for removed ones)."""

    listed = 0

    def paths(self) -> Iterable[str]:
        self.listed += 1
        return super().paths()


def test_runs_of_unchanged_paths_count_as_seen(policy: Policy) -> None:
    base = _Counted([changed(path=p) for p in ("/usr", "/usr/a", "/usr/b", "/usr/c")])
    runs = [SameRun(2, "/usr\0/usr/a"), changed(path="/usr/b", mode=0o700)]
    findings = list(compare_tree(base, [*runs, SameRun(1, "/usr/c")], policy, first_boot=False))
    assert [(f.path, f.change) for f in findings] == [("/usr/b", "modified")]
    assert base.listed == 0  # every path of the baseline was seen: none was looked for

    findings = list(compare_tree(base, [*runs, changed(path="/usr/d")], policy, first_boot=False))
    assert [(f.path, f.change) for f in findings] == [
        ("/usr/b", "modified"),
        ("/usr/c", "removed"),
        ("/usr/d", "added"),
    ]
    assert base.listed == 1
