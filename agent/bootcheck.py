"""The boot check as the daemon reports it: the baked manifest, verified, against this machine.

A small adapter over the baseline engine (``agent.manifest``, ``agent.compare``): it loads the
manifest (the configured pipeline key makes a missing or bad signature ``UntrustedError``),
measures the root, and shapes the ``boot`` envelope's body (``docs/protocol.md``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent import keys, wire
from agent.config import AgentSection
from agent.errors import AgentError, ManifestError
from agent.identity import Identity

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class BootCheck:
    image: dict[str, Any]  # {"build_id", "root", "cloud_image_id"} as in enrollment facts
    body: dict[str, Any] | None  # the "boot" envelope's body; None when nothing was checked
    integrity: list[dict[str, Any]] = field(default_factory=list)  # findings to report
    clean: bool = False
    untrusted: bool = False


def image_of(section: AgentSection, ident: Identity) -> dict[str, Any]:
    """The image identity from the manifest's statement (its first line only)."""
    build_id = root = ""
    if section.baseline is not None:
        try:
            statement = wire.read_statement(section.baseline)
            build_id, root = statement["build_id"], statement["root"]
        except wire.WireError as exc:
            log.error("baseline_statement_unreadable", path=str(section.baseline), error=str(exc))
    return {"build_id": build_id, "root": root, "cloud_image_id": ident.cloud_image_id}


def integrity(reason: str, detail: str, severity: str = "critical") -> dict[str, Any]:
    return {"type": "integrity", "reason": reason, "severity": severity, "detail": detail}


def untrusted(detail: str, ident: Identity, section: AgentSection) -> BootCheck:
    return BootCheck(
        image=image_of(section, ident),
        body=None,
        integrity=[integrity("baseline_untrusted", detail)],
        untrusted=True,
    )


def run(section: AgentSection, *, first_boot: bool, identity: Identity) -> BootCheck:
    """Verify the manifest and measure the root; raises ``UntrustedError`` on a bad signature."""
    image = image_of(section, identity)
    if section.baseline is None:
        log.warning("boot_check_skipped", reason="no baseline configured")
        detail = "no baseline configured: the boot check was skipped"
        return BootCheck(image, None, [integrity("no_baseline", detail, "warning")])
    public_key = None
    if section.pipeline_public_key is not None:
        public_key = keys.load_public(section.pipeline_public_key)
    else:
        log.warning("baseline_signature_not_checked", advice="set [agent] pipeline_public_key")
    try:
        manifest = importlib.import_module("agent.manifest")
        compare = importlib.import_module("agent.compare")
    except ImportError as exc:
        raise AgentError("the baseline engine is not installed") from exc
    baseline = manifest.load_baseline(section.baseline, public_key=public_key)
    result = compare.check_baseline(
        section.root, baseline, policy_path=section.policy, first_boot=first_boot
    )
    if result is None:
        raise ManifestError("the boot check returned nothing", path=section.baseline)
    statement = baseline.statement
    findings = [f.to_wire() for f in result.findings]
    body = {
        "first_boot": first_boot,
        "baseline": {
            "build_id": statement["build_id"],
            "root": statement["root"],
            "policy_digest": statement["policy_digest"],
            "key_id": statement.get("key_id", ""),
            "signed": public_key is not None,
        },
        "measured_root": result.measured_root,
        "clean": not any(f.get("drift") for f in findings),
        "findings": findings,
        "stats": dict(result.stats),
    }
    return BootCheck(image, body, clean=body["clean"])
