"""The ``check`` command: measure a root against a baked manifest (``docs/check-output.md``);
``run_check`` is what the boot check runs too. ``bake`` is ``agent.bake``."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import keys, logs
from agent.compare import Finding, PackageFinding, compare_packages, compare_tree
from agent.errors import EXIT_DRIFT, EXIT_OK
from agent.imageroot import own_paths, root_dir
from agent.manifest import Baseline, Head, load_baseline, read_head
from agent.measure import Entry
from agent.packages import PackageFileMismatch, PackageSet, read_packages, verify_package_files
from agent.policy import Policy, load_policy
from agent.walk import Walk
from agent.wire import display_path

CHECK_FORMAT: Final = "driftwarden-check"
CHECK_VERSION: Final = 1

log = logs.get_logger()


@dataclass(frozen=True)
class CheckResult:
    """One measurement of a root against its baseline, as ``check`` and the boot check need."""

    baseline: Baseline
    policy: Policy
    findings: list[Finding | PackageFinding]
    paths: int
    measured: int
    skipped: tuple[str, ...]
    seconds: float
    verified: bool
    packages: PackageSet  # the package set read from the root during the check
    own: frozenset[str] = frozenset()  # the tool's own files inside the root, not measured
    drifted: Mapping[str, Entry | None] = field(default_factory=dict)  # compare_tree's
    vendor: VendorCheck | None = None  # package files against the vendor's digests, if asked

    @property
    def drift(self) -> bool:
        return any(f.drift for f in self.findings)

    @functools.cached_property
    def measured_root(self) -> str:
        """The image's Merkle root with this root's drift in it (``Baseline.measured_root``):
        made when asked for, as it reads every record once there is drift."""
        return self.baseline.measured_root(self.drifted)

    @property
    def failed(self) -> bool:
        """What the exit status says: drift, or (when asked) package files that are not the
        vendor's where the policy expects them to be."""
        return self.drift or (self.vendor is not None and self.vendor.counted > 0)


@dataclass(frozen=True)
class VendorFile:
    """A package file that is not what its vendor shipped, judged by the policy: it
    ``counts`` (fails the check) unless it is a configuration file, which an administrator
    may edit on purpose, or the policy does not hold its path to its content (outside its
    roots, mutable, excluded, a rule that leaves content out, a first-boot path on the first
    boot)."""

    mismatch: PackageFileMismatch
    rule: str
    kind: str
    severity: str
    counts: bool

    def to_wire(self) -> dict[str, Any]:
        m = self.mismatch
        return {
            "type": "package_file",
            "package": m.package,
            "path": m.path,
            "reason": m.reason,
            "expected": m.expected,
            "actual": m.actual,
            "conffile": m.conffile,
            "rule": self.rule,
            "kind": self.kind,
            "severity": self.severity,
            "counts": self.counts,
        }


@dataclass(frozen=True)
class VendorCheck:
    """``check --verify-packages``: the package manager whose digests were used, and every
    package-owned file that differs from them (``agent.packages.verify_package_files``)."""

    manager: str
    files: tuple[VendorFile, ...]

    @property
    def counted(self) -> int:
        return sum(f.counts for f in self.files)


# where a package file may differ: the policy's kinds, and outside its roots
_VENDOR_ALLOWED: Final = ("mutable", "excluded", "unmeasured")


def verify_vendor(
    root: Path, policy: Policy, packages: PackageSet, *, first_boot: bool, workers: int
) -> VendorCheck:
    """Hold the package-owned files under ``root`` against their vendor's digests."""
    judged = []
    for mismatch in verify_package_files(root, workers=workers):
        decision = policy.decide(mismatch.path)
        kind = "excluded" if decision.excluded else decision.kind
        if not policy.covers(mismatch.path):
            kind = "unmeasured"
        held = (
            kind not in _VENDOR_ALLOWED
            and "content" in decision.attributes
            and not (first_boot and kind == "first_boot")
        )
        counts = held and not mismatch.conffile
        judged.append(
            VendorFile(
                mismatch, decision.rule, kind, decision.severity if counts else "info", counts
            )
        )
    log.info("vendor_check_finished", manager=packages.manager, differ=len(judged))
    return VendorCheck(packages.manager, tuple(judged))


def run_check(
    root: Path,
    baseline_path: Path,
    *,
    public_key: Ed25519PublicKey | None,
    policy_path: Path | None = None,
    full: bool = False,
    first_boot: bool = False,
    workers: int = 0,
    own_files: Iterable[Path] = (),
    verify_packages: bool = False,
) -> CheckResult:
    """Verify the baseline (``public_key`` makes a bad or missing signature ``UntrustedError``)
    and measure ``root`` against it, files and packages. ``own_files`` (the manifest, the
    agent's state) are not measured when they lie inside the root. ``verify_packages`` also
    holds every package-owned file against its vendor's digest (``VendorCheck``)."""
    root = root_dir(root)
    ignore = own_paths(root, baseline_path, *own_files)
    if full:
        head = read_head(baseline_path, public_key=public_key)
        reference = None
    else:
        # The walk's workers compare every path with the baseline (fast, now that verifying
        # it is one hash): they are given it when they start.
        reference = load_baseline(baseline_path, public_key=public_key)
        head = Head(reference.statement, reference.policy)
    if public_key is None:
        log.warning("baseline_unverified", baseline=str(baseline_path), hint="pass --pubkey")
    policy = load_policy(policy_path) if policy_path else head.policy
    started = time.monotonic()
    with Walk(
        root, policy, workers=workers, fast=not full, ignore=ignore, reference=reference
    ) as walk:
        walk.start()  # the workers walk while this process reads the packages (and baseline)
        baseline = reference or load_baseline(baseline_path, public_key=public_key)
        current_packages = read_packages(root)
        drifted: dict[str, Entry | None] = {}
        findings: list[Finding | PackageFinding] = list(
            compare_tree(
                baseline,
                walk.compared(baseline) if full else walk.changes(),
                policy,
                first_boot=first_boot,
                root=root,
                skipped=walk.skipped,
                drifted=drifted,
            )
        )
    findings += compare_packages(baseline.packages, current_packages, policy)
    vendor = (
        verify_vendor(root, policy, current_packages, first_boot=first_boot, workers=workers)
        if verify_packages
        else None
    )
    result = CheckResult(
        baseline=baseline,
        policy=policy,
        findings=findings,
        paths=walk.count,
        measured=walk.measured,
        skipped=tuple(walk.skipped),
        seconds=time.monotonic() - started,
        verified=public_key is not None,
        packages=current_packages,
        own=ignore,
        drifted=drifted,
        vendor=vendor,
    )
    log.info(
        "check_finished",
        paths=result.paths,
        measured=result.measured,
        findings=len(findings),
        drift=result.drift,
        seconds=result.seconds,
    )
    return result


def check_command(args: argparse.Namespace) -> int:
    public_key = keys.load_public(args.pubkey) if args.pubkey else None
    result = run_check(
        args.root,
        args.baseline,
        public_key=public_key,
        policy_path=args.policy,
        full=args.full,
        first_boot=args.first_boot,
        workers=args.workers,
        verify_packages=args.verify_packages,
    )
    if args.json:
        json.dump(_report(args, result), sys.stdout, ensure_ascii=False, separators=(",", ":"))
        sys.stdout.write("\n")
    else:
        _print_text(result)
    return EXIT_DRIFT if result.failed else EXIT_OK


def _counts(findings: Iterable[Finding | PackageFinding]) -> dict[str, int]:
    out = {"findings": 0, "drift": 0, "critical": 0, "warning": 0, "info": 0}
    for finding in findings:
        out["findings"] += 1
        out["drift"] += finding.drift
        out[finding.severity] += 1
    return out


def _report(args: argparse.Namespace, result: CheckResult) -> dict[str, Any]:
    statement = result.baseline.statement
    findings = result.findings
    return {
        "format": CHECK_FORMAT,
        "v": CHECK_VERSION,
        "baseline": {
            "build_id": statement["build_id"],
            "root": statement["root"],
            "created": statement["created"],
            "entries": statement["entries"],
            "key_id": statement.get("key_id"),
            "verified": result.verified,
        },
        "policy": {"name": result.policy.name, "digest": result.policy.digest},
        "full": bool(args.full),
        "first_boot": bool(args.first_boot),
        "paths": result.paths,
        "measured": result.measured,
        "measured_root": result.measured_root,
        "summary": _counts(findings),
        "drift": result.drift,
        "failed": result.failed,
        "findings": [f.to_wire() for f in findings],
        **_vendor_report(result.vendor),
    }


def _vendor_report(vendor: VendorCheck | None) -> dict[str, Any]:
    if vendor is None:
        return {}
    return {
        "vendor": {
            "manager": vendor.manager,
            "differ": len(vendor.files),
            "counted": vendor.counted,
        },
        "package_files": [f.to_wire() for f in vendor.files],
    }


def _line(finding: Finding | PackageFinding) -> str:
    status = "DRIFT" if finding.drift else "allowed"
    head = f"{status:7} {finding.severity:8} {finding.change:9}"
    if isinstance(finding, PackageFinding):
        versions = f"{finding.before or '-'} -> {finding.after or '-'}"
        return f"{head} package {finding.name}:{finding.arch} {versions}"
    fields = f" [{','.join(finding.fields)}]" if finding.fields else ""
    if finding.renamed_from is not None:
        fields += f" (renamed from {display_path(finding.renamed_from)})"
    elif finding.renamed_to is not None:
        fields += f" (renamed to {display_path(finding.renamed_to)})"
    why = f"rule {finding.rule!r} ({finding.kind}): {finding.reason}"
    return f"{head} {display_path(finding.path)}{fields}  {why}"


def _print_text(result: CheckResult) -> None:
    findings = result.findings
    for finding in findings:
        print(_line(finding))
    vendor = result.vendor
    for file in vendor.files if vendor else ():
        m = file.mismatch
        status = "VENDOR" if file.counts else "allowed"
        what = "conffile" if m.conffile else f"rule {file.rule!r} ({file.kind})"
        print(
            f"{status:7} {file.severity:8} {m.reason:9} {display_path(m.path)}"
            f"  package {m.package}: not the vendor's file ({what})"
        )
    counts = _counts(findings)
    allowed = counts["findings"] - counts["drift"]
    verdict = "DRIFT" if counts["drift"] else "VENDOR" if result.failed else "clean"
    print(
        f"{verdict}: {counts['drift']} drifted, {allowed} allowed changes; "
        f"{result.paths} paths, {result.measured} measured again"
    )
    if vendor is not None:
        print(
            f"packages ({vendor.manager}): {len(vendor.files)} files differ from the vendor's, "
            f"{vendor.counted} where the policy expects the vendor's"
        )
