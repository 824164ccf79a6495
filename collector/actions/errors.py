"""The exceptions of replacement actions.

An action never raises for a replacement that did not happen: it returns an ``ActionOutcome``
with ``status="failed"`` and says whether trying again can help. Exceptions are for
configuration, found before anything starts::

    ActionError                anything this package raises
    ├── ActionConfigError      an [[action]] table that cannot be used; names the key and value
    └── MalformedRequestError  a stored replacement request without the documented shape
"""

from __future__ import annotations


class ActionError(Exception):
    pass


class ActionConfigError(ActionError):
    pass


class MalformedRequestError(ActionError):
    pass
