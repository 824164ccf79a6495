"""SSH login detection: the journal, auth log files and utmp, combined into one stream.

``parse`` reads OpenSSH's and systemd-logind's lines; ``journal``, ``authlog`` and ``utmp``
are the sources; ``watcher.LoginWatcher`` combines them, de-duplicates, and keeps their
positions. The events and their wire shape are described in ``docs/logins.md``.
"""

from __future__ import annotations

from agent.logins.authlog import AuthLogSource
from agent.logins.event import Login
from agent.logins.journal import JournalSource
from agent.logins.utmp import UtmpSource
from agent.logins.watcher import Failures, LoginSource, LoginWatcher, default_sources

__all__ = [
    "AuthLogSource",
    "Failures",
    "JournalSource",
    "Login",
    "LoginSource",
    "LoginWatcher",
    "UtmpSource",
    "default_sources",
]
