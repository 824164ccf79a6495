from __future__ import annotations

from tests.sshd import ssh_user, sshd

__all__ = ["ssh_user", "sshd"]
