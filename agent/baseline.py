"""The ``bake`` and ``check`` commands: measure an image root into a signed manifest, and
measure a root against one (``docs/manifest.md``, ``docs/check-output.md``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import structlog

from agent import keys
from agent.compare import Finding, compare_tree
from agent.errors import EXIT_DRIFT, EXIT_OK, AgentError, PolicyError
from agent.manifest import Baseline, ManifestWriter, load_baseline
from agent.measure import Entry, Walk
from agent.policy import Policy, load_policy
from agent.wire import display_path

CHECK_FORMAT: Final = "driftwarden-check"
CHECK_VERSION: Final = 1

log = structlog.get_logger()


def _root_dir(root: Path) -> Path:
    if not root.is_dir():
        raise AgentError("the root to measure is not a directory", path=root)
    return root


def _inside(root: Path, *files: Path) -> frozenset[str]:
    """The image paths of ``files`` that lie inside ``root`` (the tool's own files)."""
    base = os.path.realpath(root)
    out = set()
    for file in files:
        real = os.path.join(os.path.realpath(file.parent), file.name)
        rel = os.path.relpath(real, base)
        if not rel.startswith(".."):
            out.add("/" + rel)
    return frozenset(out)


def _policy_with_text(path: Path) -> tuple[Policy, str]:
    policy = load_policy(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy: {exc.strerror}", path=path) from exc
    if load_policy(path).digest != policy.digest:
        raise PolicyError("the policy changed while it was read", path=path)
    return policy, text


def bake_command(args: argparse.Namespace) -> int:
    root = _root_dir(args.root)
    policy, text = _policy_with_text(args.policy)
    signer = keys.load_private(args.key) if args.key else None
    out: Path = args.out
    started = time.monotonic()
    log.info("bake_started", root=str(root), policy=policy.name, out=str(out))
    own = {str(out.with_name(f".{out.name}{suffix}")) for suffix in (".tmp", ".entries.tmp")}
    ignore = _inside(root, out, *(Path(p) for p in own))
    walk = Walk(root, policy, workers=args.workers, ignore=ignore)
    with ManifestWriter(
        out, policy=policy, policy_text=text, build_id=args.build_id, signer=signer
    ) as writer:
        for item in walk:
            assert isinstance(item, Entry)  # no reference, so every path is measured
            writer.add(item)
        statement = writer.finish()
    seconds = time.monotonic() - started
    log.info("bake_finished", entries=writer.count, root_digest=statement["root"], seconds=seconds)
    signed = f"signed by {statement['key_id']}" if signer else "UNSIGNED (no --key)"
    print(f"baked {writer.count} entries from {root} into {out}")
    print(f"merkle root {statement['root']}, {signed}")
    return EXIT_OK


def check_command(args: argparse.Namespace) -> int:
    root = _root_dir(args.root)
    public_key = keys.load_public(args.pubkey) if args.pubkey else None
    baseline = load_baseline(args.baseline, public_key=public_key)
    if public_key is None:
        log.warning("baseline_unverified", baseline=str(args.baseline), hint="pass --pubkey")
    policy = load_policy(args.policy) if args.policy else baseline.policy
    started = time.monotonic()
    walk = Walk(
        root,
        policy,
        workers=args.workers,
        unchanged=None if args.full else baseline.unchanged,
        ignore=_inside(root, args.baseline),
    )
    findings = list(
        compare_tree(
            baseline,
            walk,
            policy,
            first_boot=args.first_boot,
            root=root,
            skipped=walk.skipped,
        )
    )
    drift = any(f.drift for f in findings)
    log.info(
        "check_finished",
        paths=walk.count,
        measured=walk.measured,
        findings=len(findings),
        drift=drift,
        seconds=time.monotonic() - started,
    )
    if args.json:
        report = _report(args, baseline, policy, walk, findings, verified=public_key is not None)
        json.dump(report, sys.stdout, ensure_ascii=False, separators=(",", ":"))
        sys.stdout.write("\n")
    else:
        _print_text(findings, walk)
    return EXIT_DRIFT if drift else EXIT_OK


def _counts(findings: Iterable[Finding]) -> dict[str, int]:
    out = {"findings": 0, "drift": 0, "critical": 0, "warning": 0, "info": 0}
    for finding in findings:
        out["findings"] += 1
        out["drift"] += finding.drift
        out[finding.severity] += 1
    return out


def _report(
    args: argparse.Namespace,
    baseline: Baseline,
    policy: Policy,
    walk: Walk,
    findings: list[Finding],
    *,
    verified: bool,
) -> dict[str, Any]:
    statement = baseline.statement
    return {
        "format": CHECK_FORMAT,
        "v": CHECK_VERSION,
        "baseline": {
            "build_id": statement["build_id"],
            "root": statement["root"],
            "created": statement["created"],
            "entries": statement["entries"],
            "key_id": statement.get("key_id"),
            "verified": verified,
        },
        "policy": {"name": policy.name, "digest": policy.digest},
        "full": bool(args.full),
        "first_boot": bool(args.first_boot),
        "paths": walk.count,
        "measured": walk.measured,
        "summary": _counts(findings),
        "drift": any(f.drift for f in findings),
        "findings": [f.to_wire() for f in findings],
    }


def _print_text(findings: list[Finding], walk: Walk) -> None:
    for f in findings:
        status = "DRIFT" if f.drift else "allowed"
        fields = f" [{','.join(f.fields)}]" if f.fields else ""
        print(
            f"{status:7} {f.severity:8} {f.change:8} {display_path(f.path)}{fields}"
            f"  rule {f.rule!r} ({f.kind}): {f.reason}"
        )
    counts = _counts(findings)
    allowed = counts["findings"] - counts["drift"]
    verdict = "DRIFT" if counts["drift"] else "clean"
    print(
        f"{verdict}: {counts['drift']} drifted, {allowed} allowed changes; "
        f"{walk.count} paths, {walk.measured} measured again"
    )
