"""Who may do what: SRE bearer tokens with roles, and enrollment tokens for agents.

Tokens are 32 random bytes (URL-safe base64) behind a prefix that says what they are
(``dwt_`` for SRE tokens, ``dwe_`` for enrollment); only their SHA-256 is stored, and a token
is shown once, when it is created. Roles are ordered: viewer reads; operator also replaces,
retires, acknowledges and registers images; admin also manages tokens. Nothing but health (and
the agents' own signed routes) is reachable without a token.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Final

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from collector.actions.errors import MalformedRequestError
from collector.actions.request import safe_value
from collector.errors import AuthError, ForbiddenError
from collector.model import ApiToken, EnrollToken, Role
from collector.store import Store

API_PREFIX: Final = "dwt_"
ENROLL_PREFIX: Final = "dwe_"

_bearer = HTTPBearer(auto_error=False, description="an SRE token: driftwarden token create")


def token_hash(token: str) -> str:
    """Tokens are long and random, so a plain SHA-256 is what is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def create_api_token(store: Store, role: Role, name: str) -> tuple[str, ApiToken]:
    """A new SRE token: the secret (show it once) and its stored record."""
    secret = _secret(API_PREFIX)
    return secret, store.add_api_token(name, role.label, token_hash(secret))


def create_enroll_token(
    store: Store,
    *,
    note: str = "",
    expires_in_s: float | None = None,
    uses: int | None = None,
    pool: str | None = None,
) -> tuple[str, EnrollToken]:
    """A new enrollment token, optionally expiring, limited to ``uses`` enrollments and bound
    to ``pool`` (the pool of every host it enrolls, whatever the host claims)."""
    if uses is not None and uses < 1:
        raise ValueError("uses must be at least 1")
    if pool is not None:
        try:
            safe_value("pool", pool)
        except MalformedRequestError as exc:
            raise ValueError(str(exc)) from exc
    expires_at: datetime | None = None
    if expires_in_s is not None:
        expires_at = store.clock() + timedelta(seconds=expires_in_s)
    secret = _secret(ENROLL_PREFIX)
    return secret, store.add_enroll_token(token_hash(secret), note, expires_at, uses, pool)


def authenticate(store: Store, credentials: HTTPAuthorizationCredentials | None) -> ApiToken:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthError("a bearer token is required (Authorization: Bearer TOKEN)")
    token = store.api_token(token_hash(credentials.credentials))
    if token is None:
        raise AuthError("unknown or revoked token")
    return token


def require(role: Role) -> Callable[..., ApiToken]:
    """A FastAPI dependency: the caller's token, which must hold at least ``role``."""

    def dependency(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
    ) -> ApiToken:
        token = authenticate(request.app.state.services.store, credentials)
        if token.role < role:
            raise ForbiddenError(
                f"this needs the {role.label} role; the token is {token.role.label}"
            )
        return token

    return dependency


def actor(token: ApiToken) -> str:
    """How a token's holder is named in the audit trail."""
    return f"token:{token.token_id}:{token.name}" if token.name else f"token:{token.token_id}"


def metrics_guard(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
) -> None:
    """``/metrics`` needs a viewer token unless ``[server] metrics_public`` is set."""
    services = request.app.state.services
    if not services.config.server.metrics_public:
        authenticate(services.store, credentials)
