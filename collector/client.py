"""The SRE CLI's HTTP client: bearer token, JSON in and out, the error envelope turned into a
sentence."""

from __future__ import annotations

from typing import Any

import requests

from collector.errors import ApiClientError


class ApiClient:
    def __init__(self, url: str, token: str | None, *, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self._session = requests.Session()

    def __repr__(self) -> str:
        return f"<ApiClient {self.url}>"

    def close(self) -> None:
        self._session.close()

    def get(self, path: str, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        return self._call("GET", path, params=query)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, json=body)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            response = self._session.request(
                method, self.url + path, headers=headers, timeout=self.timeout_s, **kwargs
            )
        except requests.RequestException as exc:
            raise ApiClientError(f"cannot reach the collector at {self.url}: {exc}") from exc
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 400:
            raise ApiClientError(_describe(response.status_code, data))
        return data


def _describe(status: int, data: Any) -> str:
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return f"the collector answered HTTP {status}"
    hint = " (set --token or DRIFTWARDEN_TOKEN)" if status == 401 else ""
    return f"the collector refused ({status} {error.get('code')}): {error.get('message')}{hint}"
