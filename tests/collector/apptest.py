"""Helpers for tests of the HTTP API: a test configuration and the error envelope's shape."""

from __future__ import annotations

from typing import Any

from collector.config import Config, ImageConfig, ServerConfig


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
