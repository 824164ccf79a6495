"""Helpers for tests of the HTTP API: a test configuration, the routes and who may call them,
the error envelope's shape, and signed image statements."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire
from collector.config import Config, ImageConfig, ServerConfig
from collector.model import Role

AGENT = "agent"  # authenticated by the enrollment token or the host's signature
PUBLIC = "public"
VIEWER, OPERATOR, ADMIN = Role.VIEWER, Role.OPERATOR, Role.ADMIN
ROUTES: dict[tuple[str, str], Role | str] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/"): PUBLIC,
    ("POST", "/v1/enroll"): AGENT,
    ("POST", "/v1/reports"): AGENT,
    ("GET", "/metrics"): VIEWER,
    ("GET", "/openapi.json"): VIEWER,
    ("GET", "/v1/hosts"): VIEWER,
    ("GET", "/v1/hosts/{host_id}"): VIEWER,
    ("GET", "/v1/hosts/{host_id}/events"): VIEWER,
    ("GET", "/v1/fleet"): VIEWER,
    ("GET", "/v1/images"): VIEWER,
    ("GET", "/v1/images/{build_id}/cohort"): VIEWER,
    ("POST", "/v1/hosts/{host_id}/replace"): OPERATOR,
    ("POST", "/v1/hosts/{host_id}/retire"): OPERATOR,
    ("POST", "/v1/hosts/{host_id}/acknowledge"): OPERATOR,
    ("POST", "/v1/hosts/{host_id}/rekey"): OPERATOR,
    ("POST", "/v1/images"): OPERATOR,
    ("GET", "/v1/tokens"): ADMIN,
    ("POST", "/v1/tokens"): ADMIN,
    ("DELETE", "/v1/tokens/{token_id}"): ADMIN,
    ("GET", "/v1/enroll-tokens"): ADMIN,
    ("POST", "/v1/enroll-tokens"): ADMIN,
    ("DELETE", "/v1/enroll-tokens/{token_id}"): ADMIN,
    ("GET", "/v1/replacements"): VIEWER,
    ("GET", "/v1/holds"): VIEWER,
    ("GET", "/v1/decisions"): VIEWER,
    ("GET", "/v1/pools"): VIEWER,
    ("POST", "/v1/hosts/{host_id}/hold"): OPERATOR,
    ("POST", "/v1/hosts/{host_id}/release"): OPERATOR,
    ("POST", "/v1/pools/{pool}/hold"): OPERATOR,
    ("POST", "/v1/pools/{pool}/release"): OPERATOR,
    ("POST", "/v1/images/{build_id}/hold"): OPERATOR,
    ("POST", "/v1/images/{build_id}/release"): OPERATOR,
    ("POST", "/v1/hosts/{host_id}/breakglass"): OPERATOR,
    ("POST", "/v1/breakglass/{session_id}/end"): OPERATOR,
}


def make_config(**images: Any) -> Config:
    return Config(
        server=ServerConfig(workers=False),
        images=ImageConfig(require_registered=False, **images),
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """The one error envelope: {"error": {"code", "message", "details"}}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    details: dict[str, Any] = body["error"]["details"]
    return details


def statement(key: Ed25519PrivateKey, build_id: str, root: str) -> dict[str, Any]:
    body = {
        "format": wire.MANIFEST_FORMAT,
        "v": wire.MANIFEST_VERSION,
        "build_id": build_id,
        "policy_digest": "sha256:00",
        "hash_alg": "sha256",
        "created": wire.utc_now(),
        "tool_version": "0.1.0",
        "root": root,
        "entries": 3,
        "key_id": "ed25519:pipeline",
    }
    return wire.sign_statement(body, key)
