"""Reading envelope bodies: check each kind's documented shape (docs/protocol.md) and say
what it means for the host — observations for the state machine, findings to keep, and host
facts to update. Pure: nothing here touches the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from agent import wire
from collector.model import Finding
from collector.verdicts import Observation, Signal

MAX_EVIDENCE_ITEMS: Final = 20
# The longest string a key may hold: the store's column widths (collector.store.schema), so an
# over-long value is a 400 malformed here, never a database error (a 503 the agent retries
# forever) on PostgreSQL while SQLite takes it.
MAX_CHARS: Final[Mapping[str, int]] = {
    "host_id": 128,
    "boot_id": 128,
    "time": 40,
    "hostname": 255,
    "agent_version": 64,
    "version": 64,
    "pool": 128,
    "build_id": 255,
    "root": 128,
    "cloud_image_id": 255,
    "measured_root": 128,
    "source": 32,
    "type": 32,
}
_PREVIOUS_STOPS: Final = ("clean", "unclean", "first")
# A finding envelope may continue a body that did not fit one envelope (docs/protocol.md).
_CONTINUABLE: Final = ("boot", "finding")
# Integrity reasons that mean the host cannot be measured against its image because the
# image's own manifest is unsigned, altered, missing or corrupt: evidence, so suspect.
SUSPECT_INTEGRITY: Final = frozenset({"baseline_untrusted", "baseline_unreadable"})
# The agent's health (heartbeat): the type of every field the collector knows; a field it does
# not know is kept as sent, and a field may be absent (an older agent).
_HEALTH_FIELDS: Final[Mapping[str, tuple[type, ...]]] = {
    "watch_backend": (str,),
    "overflows": (int,),
    "spool_depth": (int,),
    "rejected": (int,),
    "last_rescan": (str, type(None)),
    "last_full_rehash": (str, type(None)),
    "uptime_s": (int, float),
    "version": (str,),
    "spool_state": (str,),
    "spool_bytes": (int,),
    "spool_in_memory": (int,),
    "heartbeats_compacted": (int,),
    "delivery": (str,),
}


@dataclass(frozen=True)
class BootImage:
    """What a boot report says about the image, to check against the registered one."""

    build_id: str
    baseline_root: str
    measured_root: str


@dataclass(frozen=True)
class Reading:
    observations: list[Observation] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    host_values: dict[str, Any] = field(default_factory=dict)
    boot: BootImage | None = None


def required(obj: Mapping[str, Any], key: str, typ: type, seq: int | None = None) -> Any:
    """``obj[key]`` if it is a ``typ`` (a bool is not an int here); else MalformedError."""
    value = obj.get(key)
    if (isinstance(value, bool) and typ is not bool) or not isinstance(value, typ):
        raise wire.MalformedError(f"{key!r} is missing or not a {typ.__name__}", seq=seq)
    if isinstance(value, str):
        short(key, value, seq)
    return value


def short(key: str, value: str, seq: int | None = None) -> str:
    """``value`` if it fits ``MAX_CHARS[key]``; else MalformedError."""
    limit = MAX_CHARS.get(key)
    if limit is not None and len(value) > limit:
        raise wire.MalformedError(f"{key!r} is longer than {limit} characters", seq=seq)
    return value


def optional(obj: Mapping[str, Any], key: str, typ: type, seq: int | None = None) -> Any:
    return None if obj.get(key) is None else required(obj, key, typ, seq)


def image_values(image: Mapping[str, Any], seq: int | None = None) -> dict[str, Any]:
    """The host columns an ``image`` object (enroll facts, agent_start) sets."""
    return {
        "image_build_id": required(image, "build_id", str, seq),
        "image_root": required(image, "root", str, seq),
        "cloud_image_id": optional(image, "cloud_image_id", str, seq),
    }


def read(env: wire.Envelope, *, now: datetime) -> Reading:
    """Check ``env``'s body for its kind; raise ``wire.MalformedError`` if it is not that."""
    reader = _READERS.get(env.kind)
    if reader is None:
        raise wire.MalformedError(f"kind {env.kind!r} is not a report", seq=env.seq)
    short("boot_id", env.boot_id, env.seq)
    short("time", env.time, env.seq)
    return reader(env, now)


def _agent_start(env: wire.Envelope, now: datetime) -> Reading:
    body, seq = env.body, env.seq
    previous = required(body, "previous_stop", str, seq)
    if previous not in _PREVIOUS_STOPS:
        raise wire.MalformedError(
            f"previous_stop {previous!r} is not one of {_PREVIOUS_STOPS}", seq=seq
        )
    values: dict[str, Any] = {
        "agent_version": required(body, "version", str, seq),
        "boot_id": env.boot_id,
    }
    if body.get("image") is not None:
        values.update(image_values(required(body, "image", dict, seq), seq))
    observations = [Observation(Signal.ALIVE, "report")]
    if previous == "unclean":
        evidence = {"seq": seq, "previous_stop": previous, "pid": body.get("pid")}
        observations.append(Observation(Signal.SUSPECT, "unclean_stop", evidence))
    return Reading(observations, [], values)


def _boot(env: wire.Envelope, now: datetime) -> Reading:
    body, seq = env.body, env.seq
    baseline = required(body, "baseline", dict, seq)
    measured = required(body, "measured_root", str, seq)
    clean = required(body, "clean", bool, seq)
    found = _findings(env, required(body, "findings", list, seq), "boot", now)
    boot = BootImage(
        build_id=required(baseline, "build_id", str, seq),
        baseline_root=required(baseline, "root", str, seq),
        measured_root=measured,
    )
    observations = [Observation(Signal.ALIVE, "report")]
    drift = [f for f in found if f.drift]
    if drift or not clean:
        observations.append(Observation(Signal.DRIFT, "drift", _evidence(seq, drift)))
    else:
        observations.append(Observation(Signal.BOOT_CLEAN, "boot_clean", {"seq": seq}))
    values = {"measured_root": measured, "boot_id": env.boot_id}
    return Reading(observations, found, values, boot)


def _finding(env: wire.Envelope, now: datetime) -> Reading:
    body, seq = env.body, env.seq
    source = required(body, "source", str, seq)
    continues = optional(body, "continues", str, seq)
    if continues is not None and continues not in _CONTINUABLE:
        raise wire.MalformedError(f"continues {continues!r} is not one of {_CONTINUABLE}", seq=seq)
    # The rest of a boot report's findings are the boot's, whatever source carried them.
    kept_as = "boot" if continues == "boot" else source
    found = _findings(env, required(body, "findings", list, seq), kept_as, now)
    observations = [Observation(Signal.ALIVE, "report")]
    drift = [f for f in found if f.drift]
    if drift:
        observations.append(Observation(Signal.DRIFT, "drift", _evidence(seq, drift)))
    for problem in found:
        reason = problem.detail.get("reason")
        if problem.type == "integrity" and reason in SUSPECT_INTEGRITY:
            evidence = {"seq": seq, "reason": reason, "detail": problem.detail.get("detail")}
            observations.append(Observation(Signal.SUSPECT, reason, evidence))
    for login in found:
        if (
            login.type == "login"
            and login.detail.get("event") == "accepted"
            and login.detail.get("verdict") == "taint"
        ):
            keep = ("user", "method", "source_ip", "source_port", "fingerprint", "key_id", "at")
            evidence = {"seq": seq, **{k: login.detail.get(k) for k in keep}}
            observations.append(Observation(Signal.LOGIN, "login", evidence))
    return Reading(observations, found)


def _heartbeat(env: wire.Envelope, now: datetime) -> Reading:
    health = required(env.body, "health", dict, env.seq)
    for key, types in _HEALTH_FIELDS.items():
        value = health.get(key)
        if key in health and (isinstance(value, bool) or not isinstance(value, types)):
            raise wire.MalformedError(f"health {key!r} has the wrong type", seq=env.seq)
    return Reading([Observation(Signal.ALIVE, "report")], [], {"health": health})


def _agent_stop(env: wire.Envelope, now: datetime) -> Reading:
    required(env.body, "reason", str, env.seq)
    return Reading([Observation(Signal.ALIVE, "report")])


_READERS: Final = {
    "agent_start": _agent_start,
    "boot": _boot,
    "finding": _finding,
    "heartbeat": _heartbeat,
    "agent_stop": _agent_stop,
}


def _findings(env: wire.Envelope, items: list[Any], source: str, now: datetime) -> list[Finding]:
    out: list[Finding] = []
    for item in items:
        if not isinstance(item, dict):
            raise wire.MalformedError("a finding is not an object", seq=env.seq)
        kind = required(item, "type", str, env.seq)
        severity = item.get("severity", "warning")
        if severity not in wire.SEVERITIES:
            raise wire.MalformedError(
                f"severity {severity!r} is not one of {wire.SEVERITIES}", seq=env.seq
            )
        drift = optional(item, "drift", bool, env.seq) or False
        if kind == "integrity":
            required(item, "reason", str, env.seq)
        path = optional(item, "path", str, env.seq)
        if path is None and kind == "package":
            path = optional(item, "package", str, env.seq) or optional(item, "name", str, env.seq)
        out.append(
            Finding(
                host_id=env.host_id,
                seq=env.seq,
                source=source,
                type=kind,
                severity=severity,
                drift=drift,
                path=wire.display_path(wire.decode_path(path)) if path else None,
                at=now,
                detail=item,
            )
        )
    return out


def _evidence(seq: int, drift: list[Finding]) -> dict[str, Any]:
    return {
        "seq": seq,
        "count": len(drift),
        "findings": [
            {"type": f.type, "path": f.path, "severity": f.severity}
            for f in drift[:MAX_EVIDENCE_ITEMS]
        ],
    }
