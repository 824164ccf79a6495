"""The boot check as the daemon reports it: the baked manifest, verified, against this machine.

A small adapter over the baseline engine (``agent.manifest``, ``agent.measure``,
``agent.compare``): it loads the manifest (the configured pipeline key makes a missing or bad
signature ``UntrustedError``), measures the root with ``agent.baseline.run_check`` (files and
packages, re-hashing only what changed by its metadata), and shapes the ``boot`` envelope's
body (``docs/protocol.md``). The agent's own files (the manifest, the state directory) are not
measured when they lie inside the root.
``measured_root`` is the image's Merkle root with this machine's drift in it
(``manifest.Baseline.measured_root``): the image's own root when nothing drifted.

The daemon runs the check in a child process of its own interpreter (``run_apart``):
loading the whole manifest and walking the root peaks at well over a hundred megabytes on a
large image, and memory a process has once used stays partly its own (the allocators keep
fragments). The child hands back, pickled on its stdout, what the daemon keeps: the boot
report and the baseline already compacted (``agent.compact``). Its log lines go where the
daemon's go, with the same context.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Final

import structlog

from agent import errors, keys, logs, wire
from agent.baseline import CheckResult, run_check
from agent.config import AgentSection
from agent.errors import advice
from agent.identity import Identity
from agent.policy import Policy

CHILD: Final = "from agent.bootcheck import _child; raise SystemExit(_child())"

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class BootCheck:
    image: dict[str, Any]  # {"build_id", "root", "cloud_image_id"} as in enrollment facts
    body: dict[str, Any] | None  # the "boot" envelope's body; None when nothing was checked
    integrity: list[dict[str, Any]] = field(default_factory=list)  # findings to report
    clean: bool = False
    untrusted: bool = False
    policy: Policy | None = None  # the policy judged by (the baked one unless configured)
    result: CheckResult | None = None  # the check itself: baseline, packages, own files


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


def failed(reason: str, detail: str, ident: Identity, section: AgentSection) -> BootCheck:
    """No boot check: the manifest is untrusted or unreadable, or the check itself failed."""
    return BootCheck(
        image=image_of(section, ident),
        body=None,
        integrity=[integrity(reason, detail)],
        untrusted=reason == "baseline_untrusted",
    )


def _policy_override(section: AgentSection, policy: Policy) -> dict[str, Any] | None:
    """What judged instead of the policy baked into the manifest (``[agent] policy``), or
    None: the boot report says so, since the image's own rules were not the ones applied."""
    if section.policy is None:
        return None
    try:
        digest = "sha256:" + hashlib.sha256(section.policy.read_bytes()).hexdigest()
    except OSError as exc:
        digest = ""
        log.error("policy_override_unreadable", path=str(section.policy), error=advice(exc))
    log.warning("policy_override", path=str(section.policy), policy=policy.name, digest=digest)
    return {"path": str(section.policy), "name": policy.name, "digest": digest}


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
    result = run_check(
        section.root,
        section.baseline,
        public_key=public_key,
        policy_path=section.policy,
        first_boot=first_boot,
        own_files=(section.state_dir,),
    )
    findings = [f.to_wire() for f in result.findings]
    policy = result.policy
    statement = result.baseline.statement
    clean = not result.drift
    stats = {
        "paths": result.paths,
        "measured": result.measured,
        "findings": len(findings),
        "drift": sum(1 for f in findings if f["drift"]),
        "skipped_mounts": len(result.skipped),
        "seconds": round(result.seconds, 3),
        "policy": policy.name,
    }
    override = _policy_override(section, policy)
    body = {
        "first_boot": first_boot,
        "baseline": {
            "build_id": statement["build_id"],
            "root": statement["root"],
            "policy_digest": statement["policy_digest"],
            "key_id": statement.get("key_id") or "",
            "signed": public_key is not None,
            "policy_override": override,
        },
        "measured_root": result.measured_root,
        "clean": clean,
        "findings": findings,
        "stats": stats,
    }
    log.info("boot_check_finished", clean=clean, **stats)
    return BootCheck(image, body, clean=clean, policy=policy, result=result)


# --- in a child process ------------------------------------------------------------------------


def run_apart(section: AgentSection, *, first_boot: bool, identity: Identity) -> BootCheck:
    """``run`` in a child process (see the module's docstring); raises what ``run`` raises
    (an ``AgentError`` of the same class, with its message). A child that fails otherwise
    is a ``boot_check_failed`` check."""
    if section.baseline is None:
        return run(section, first_boot=first_boot, identity=identity)  # nothing to load
    request = {
        "section": section,
        "first_boot": first_boot,
        "identity": identity,
        "logs": logs.settings(),
        "context": structlog.contextvars.get_contextvars(),
    }
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL),
        stdout=subprocess.PIPE,
        check=False,
    )
    try:
        kind, payload = pickle.loads(child.stdout)  # noqa: S301 (our own child, a pipe)
    except Exception:  # killed (a stop while checking), or it crashed before it answered
        status = child.returncode
        ended = (
            f"was killed by {signal.Signals(-status).name}"
            if status < 0
            else f"exited with status {status} without an answer"
        )
        log.error("boot_check_process_failed", status=status)
        return failed("boot_check_failed", f"the boot check's process {ended}", identity, section)
    if kind == "error":
        name, message = payload
        cls = getattr(errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.AgentError)):
            cls = errors.AgentError
        raise cls(message)
    if kind == "failed":
        return failed("boot_check_failed", payload, identity, section)
    check: BootCheck = payload
    return check


def _child() -> int:
    reply_to = os.fdopen(os.dup(1), "wb")  # the reply alone: anything printed goes to stderr
    os.dup2(2, 1)
    request = pickle.load(sys.stdin.buffer)  # noqa: S301 (from the daemon that started us)
    if request["logs"]:
        logs.configure(**request["logs"])
    structlog.contextvars.bind_contextvars(**request["context"])
    reply: tuple[str, Any]
    try:
        check = run(
            request["section"], first_boot=request["first_boot"], identity=request["identity"]
        )
        if check.result is not None:
            kept = replace(check.result, baseline=check.result.baseline.compact())
            check = replace(check, result=kept)
        reply = ("ok", check)
    except errors.AgentError as exc:
        reply = ("error", (type(exc).__name__, str(exc)))
    except Exception as exc:  # reported by the daemon as boot_check_failed
        log.exception("boot_check_failed")
        reply = ("failed", f"{type(exc).__name__}: {exc}")
    with reply_to:
        pickle.dump(reply, reply_to, protocol=pickle.HIGHEST_PROTOCOL)
    return 0
