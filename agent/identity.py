"""Who this host is: host id, boot id, first boot, and the per-host reporting key.

- The host id is cloud-init's ``v1.instance_id`` from ``/run/cloud-init/instance-data.json``
  when present, else ``/etc/machine-id``; both are read under the guarded root.
- The boot id is the running kernel's (``/proc/sys/kernel/random/boot_id``).
- The reporting key is an Ed25519 key made on the host's first start in the state directory
  (mode 0600). It is bound to the host id it was made for: a state directory that arrives with
  another host's id (baked into an image by mistake, or copied) gets a new key, so a key is
  never shared by two hosts.
- First boot: the first boot on which the agent ran for this host id. A restart of the agent
  within that same boot is still the first boot; any later boot is not.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import keys
from agent.durable import write_atomic
from agent.errors import AgentError, ConfigError, advice

INSTANCE_DATA: Final = "run/cloud-init/instance-data.json"
MACHINE_ID: Final = "etc/machine-id"
BOOT_ID: Final = Path("/proc/sys/kernel/random/boot_id")
KEY_FILE: Final = "host-key.pem"
KEY_OWNER_FILE: Final = "host-key.owner"
FIRST_BOOT_FILE: Final = "first-boot"
_ID_RE: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Identity:
    host_id: str
    host_id_source: str  # "cloud-init" | "machine-id"
    boot_id: str
    hostname: str
    cloud_image_id: str | None


def read_identity(root: Path, *, boot_id_path: Path = BOOT_ID) -> Identity:
    host_id, source, image_id = _host_id(root)
    return Identity(
        host_id=host_id,
        host_id_source=source,
        boot_id=read_boot_id(boot_id_path),
        hostname=socket.gethostname(),
        cloud_image_id=image_id,
    )


def _host_id(root: Path) -> tuple[str, str, str | None]:
    path = root / INSTANCE_DATA
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        data = None
    except (OSError, ValueError) as exc:
        log.warning("instance_data_unreadable", path=str(path), error=str(exc))
        data = None
    if isinstance(data, dict):
        v1: dict[str, Any] = data["v1"] if isinstance(data.get("v1"), dict) else {}
        instance_id = v1.get("instance_id") or v1.get("instance-id")
        if isinstance(instance_id, str) and _ID_RE.match(instance_id):
            return instance_id, "cloud-init", _image_id(data, v1)
    path = root / MACHINE_ID
    try:
        machine_id = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            "no host id: neither cloud-init instance data nor a machine id is readable",
            path=path,
        ) from exc
    if not _ID_RE.match(machine_id):
        raise ConfigError(f"machine id {machine_id[:40]!r} is not a valid id", path=path)
    return machine_id, "machine-id", None


def _image_id(data: dict[str, Any], v1: dict[str, Any]) -> str | None:
    """The cloud image the instance was launched from, where cloud-init knows it."""
    meta = data.get("ds", {}).get("meta_data", {}) if isinstance(data.get("ds"), dict) else {}
    for value in (v1.get("image_id"), meta.get("ami_id"), meta.get("ami-id")):
        if isinstance(value, str) and value:
            return value
    return None


def read_boot_id(path: Path = BOOT_ID) -> str:
    try:
        boot_id = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentError(f"cannot read the boot id: {exc}", path=path) from exc
    if not _ID_RE.match(boot_id):
        raise AgentError(f"boot id {boot_id[:40]!r} is not a valid id", path=path)
    return boot_id


def host_key(state_dir: Path, host_id: str) -> Ed25519PrivateKey:
    """Load this host's reporting key, or make it (0600) on the first start."""
    path = state_dir / KEY_FILE
    owner = state_dir / KEY_OWNER_FILE
    recorded = _read_text(owner)
    if path.exists() and recorded == host_id:
        _tighten(path)
        return keys.load_private(path)
    if path.exists():
        log.warning("host_key_replaced", reason="made for another host id", key_host_id=recorded)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = keys.generate(path, overwrite=True)
    _write(owner, host_id)
    log.info("host_key_created", path=str(path), key_id=key_id_of(key))
    return key


def key_id_of(key: Ed25519PrivateKey) -> str:
    from agent.wire import key_id

    return key_id(keys.public_raw(key.public_key()))


def first_boot(state_dir: Path, identity: Identity) -> bool:
    """True on the first boot for this host id (and for restarts within that boot)."""
    recorded = _read_text(state_dir / FIRST_BOOT_FILE)
    if recorded is None:
        return True
    host_id, _, boot_id = recorded.partition(" ")
    return host_id != identity.host_id or boot_id == identity.boot_id


def mark_first_boot(state_dir: Path, identity: Identity) -> None:
    """Record that this host id has had its first boot (kept if already recorded)."""
    recorded = _read_text(state_dir / FIRST_BOOT_FILE)
    if recorded is not None and recorded.partition(" ")[0] == identity.host_id:
        return
    _write(state_dir / FIRST_BOOT_FILE, f"{identity.host_id} {identity.boot_id}")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("state_file_unreadable", path=str(path), error=str(exc))
        return None


def _write(path: Path, text: str) -> None:
    try:
        write_atomic(path, (text + "\n").encode("utf-8"))
    except OSError as exc:
        raise AgentError(f"cannot write state: {advice(exc)}", path=path) from exc


def _tighten(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode != 0o600:
        log.warning("host_key_mode_fixed", path=str(path), mode=oct(mode))
        os.chmod(path, 0o600)
