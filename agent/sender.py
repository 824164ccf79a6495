"""Delivery: enrollment, and a thread that drains the spool to the collector in batches.

The protocol is ``docs/protocol.md``. The sender posts the oldest unacknowledged envelopes
(in seq order, at most ``batch_max_envelopes`` / ``batch_max_bytes`` per request) and drops
from the spool exactly what the collector acknowledged. On a connection error, a timeout or a
5xx it backs off (exponential with full jitter, capped) and retries the same batch; on 404 it
enrolls again. Only the collector's own refusals of an envelope (``malformed``,
``bad_signature``, ``too_large`` in a driftwarden error body) narrow the batch down to the
refused envelope and move that one to the spool's ``rejected/`` area. A 4xx without such a
body (a proxy, a WAF, a gateway in front of the collector) and a chain conflict (``replay``,
``fork``) keep every envelope and back off; so does an enrollment refused as
``key_mismatch``. Every wait is bounded and ends at ``stop()``.
"""

from __future__ import annotations

import json
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

import requests
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ProxyError, ReadTimeoutError
from urllib3.util.retry import Retry

from agent import durable, keys, wire
from agent.config import CollectorSection, Secret
from agent.errors import AgentError, CollectorError, SpoolError, advice
from agent.reporter import Reporter

if TYPE_CHECKING:
    from types import TracebackType

    from urllib3.connectionpool import ConnectionPool
    from urllib3.response import BaseHTTPResponse

ENROLL_FILE: Final = "enrollment.json"
REPORTS_PATH: Final = "/v1/reports"
ENROLL_PATH: Final = "/v1/enroll"
ENVELOPE_REFUSALS: Final = frozenset({"malformed", "bad_signature", "too_large"})
CHAIN_CONFLICTS: Final = frozenset({"replay", "fork"})
INTERMEDIARY_ADVICE: Final = (
    "the answer is not the collector's (no driftwarden error body): check the proxy, WAF or "
    "gateway in front of it; every envelope is kept and retried"
)
KEY_MISMATCH_ADVICE: Final = (
    "the collector knows this host under another key: restore the host key in the state "
    "directory, or have an operator run 'driftwarden rekey HOST --reason ...'; every envelope "
    "is kept and retried"
)
CHAIN_ADVICE: Final = (
    "the collector holds a different history for this host (a restored snapshot or state "
    "directory, or a clone); the host is marked suspect there; every envelope is kept"
)

log = structlog.get_logger(__name__)


class EnrollmentRefused(CollectorError):
    """The collector refused our enrollment (bad or missing token, bad request)."""


class KeyMismatch(EnrollmentRefused):
    """The collector knows this host under another key (409 key_mismatch)."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # decoded JSON, or None


class Backoff:
    """Exponential backoff with full jitter: uniform(0, min(cap, initial * 2**attempt))."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.initial_s * (2.0 ** min(self.attempt, 62)))
        self.attempt += 1
        return self._rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class _OnceMoreIfDropped(Retry):
    """One more attempt, at once, when a request got no answer: the connection could not
    be made, or it ended before the answer, as a kept-alive connection the collector (or
    a proxy) closed while idle does when the close crosses the next report on its way.
    urllib3 retries that for idempotent methods only, and through a proxy counts it as a
    proxy error: this retries any of them once, for POST too. Posting a report twice is
    safe (a re-sent envelope is acknowledged as a duplicate; enrolling again with the same
    key answers 200). Never after a read timeout: the collector may still be working on
    it, and ``read_timeout_s`` bounds the wait. Never on an answer: whatever its status
    or ``Retry-After``, the sender decides."""

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        cause = error.original_error if isinstance(error, ProxyError) else error
        if error is not None and isinstance(cause, ReadTimeoutError):
            raise error.with_traceback(_stacktrace)
        return super().increment(method, url, response, error, _pool, _stacktrace)


class CollectorClient:
    """JSON over HTTP(S) to one collector with ``requests``: one session, one connection
    kept alive, connect and read timeouts on every request.

    TLS is verified against ``[collector] ca_bundle`` when it is set, else against the
    system's CAs (where OpenSSL finds them; ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` override
    it). ``https_proxy`` / ``http_proxy`` / ``no_proxy`` from the environment are honoured
    as requests honours them (a CONNECT tunnel through the proxy for https). Redirects are
    not followed: a 3xx is an answer like any other. A connection that could not be made
    or that the collector closed without answering is tried once more at once
    (``_OnceMoreIfDropped``)."""

    def __init__(self, config: CollectorSection) -> None:
        self.url = config.url.rstrip("/")
        self._timeout_s = (config.connect_timeout_s, config.read_timeout_s)
        # passed with each request: a session-wide verify loses to $REQUESTS_CA_BUNDLE
        self._verify = str(config.ca_bundle) if config.ca_bundle else _system_cas()
        retry = _OnceMoreIfDropped(total=1, allowed_methods=None, respect_retry_after_header=False)
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=retry)
        self._session = requests.Session()
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers.update(
            {"Content-Type": "application/json", "Accept": "application/json"}
        )
        self._lock = threading.Lock()

    def post(self, path: str, obj: Mapping[str, Any]) -> Reply:
        data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        with self._lock:
            try:
                response = self._session.post(
                    self.url + path,
                    data=data,
                    timeout=self._timeout_s,
                    verify=self._verify,
                    allow_redirects=False,
                )
                raw = response.content
            except (requests.RequestException, OSError) as exc:
                raise CollectorError(f"{type(exc).__name__}: {exc}", path=self.url + path) from exc
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        return Reply(response.status_code, body)

    def close(self) -> None:
        with self._lock:
            self._session.close()


def _system_cas() -> str | bool:
    """The system's CAs as ``ssl.create_default_context()`` finds them: OpenSSL's default CA
    file, else its CA directory (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` first). True (requests'
    own bundle) only on a system that has neither."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.capath or True


class Enrollment:
    """This host's enrollment with the collector, remembered in ``enrollment.json``."""

    def __init__(
        self,
        state_dir: Path,
        client: CollectorClient,
        key: Ed25519PrivateKey,
        *,
        host_id: str,
        token: Secret | Callable[[], Secret],
        facts: Callable[[], Mapping[str, Any]],
        token_file: Path | None = None,
    ) -> None:
        """``token``: the token, or where to get it when it is needed (only to enroll).
        ``token_file``: the file it came from, named in the log once it is spent."""
        self._path = state_dir / ENROLL_FILE
        self._client = client
        self._key = key
        self._raw = keys.public_raw(key.public_key())
        self._host_id = host_id
        self._token = token
        self._token_file = token_file
        self._facts = facts
        self.key_id = wire.key_id(self._raw)

    def _ours(self) -> dict[str, str]:
        return {"url": self._client.url, "host_id": self._host_id, "key_id": self.key_id}

    @property
    def enrolled(self) -> bool:
        try:
            saved = durable.read_json(self._path)
        except (OSError, ValueError):
            return False
        return isinstance(saved, dict) and all(saved.get(k) == v for k, v in self._ours().items())

    def _secret(self) -> Secret:
        if isinstance(self._token, Secret):
            return self._token
        try:
            return self._token()
        except AgentError as exc:  # the token file is gone (removed after the last enrollment)
            raise EnrollmentRefused(f"no enrollment token: {exc}") from exc

    def enroll(self) -> dict[str, Any]:
        token = self._secret()
        if not token:
            raise EnrollmentRefused(
                "not enrolled and no enrollment token: set [collector] enroll_token_file or "
                "DRIFTWARDEN_ENROLL_TOKEN"
            )
        request = wire.make_enrollment(
            self._key,
            token=token.reveal(),
            host_id=self._host_id,
            public_key_raw=self._raw,
            facts=self._facts(),
        )
        reply = self._client.post(ENROLL_PATH, request)
        if reply.status >= 500 or reply.status in (408, 429):
            raise CollectorError(f"enrollment failed with HTTP {reply.status}")
        if reply.status == 409 and _code(reply) == "key_mismatch":
            raise KeyMismatch(f"enrollment refused: HTTP 409: {_error(reply)}")
        if reply.status not in (200, 201) or not isinstance(reply.body, dict):
            raise EnrollmentRefused(f"enrollment refused: HTTP {reply.status}: {_error(reply)}")
        tip = {
            "last_seq": reply.body.get("last_seq", 0),
            "last_digest": reply.body.get("last_digest"),
        }
        try:
            durable.write_json(self._path, {**self._ours(), **tip, "enrolled_at": wire.utc_now()})
        except OSError as exc:
            raise SpoolError(
                f"cannot record the enrollment: {advice(exc)}", path=self._path
            ) from exc
        log.info("enrolled", url=wire.redact_urls(self._client.url), key_id=self.key_id, **tip)
        if self._token_file is not None:
            log.info(
                "enroll_token_file_spent",
                path=str(self._token_file),
                advice="no longer read: it may be removed",
            )
        return tip

    def forget(self) -> None:
        try:
            durable.remove(self._path)
        except OSError as exc:
            log.warning("enrollment_forget_failed", error=advice(exc))


def _error(reply: Reply) -> str:
    body = reply.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return f"{err.get('code')}: {err.get('message')}"
    return "no error body"


def _code(reply: Reply) -> str | None:
    """The driftwarden error code of a reply, or None when it carries no error body."""
    body = reply.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        return code if isinstance(code, str) else None
    return None


def _details(reply: Reply) -> dict[str, Any]:
    body = reply.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        details = body["error"].get("details")
        if isinstance(details, dict):
            return details
    return {}


class Sender(threading.Thread):
    """Drains the spool; ``wake()`` when there is something new, ``stop()`` to end."""

    def __init__(
        self,
        reporter: Reporter,
        client: CollectorClient,
        enrollment: Enrollment,
        config: CollectorSection,
        *,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name="driftwarden-sender", daemon=True)
        self._reporter = reporter
        self._spool = reporter.spool
        self._client = client
        self._enrollment = enrollment
        self._max_envelopes = config.batch_max_envelopes
        self._max_bytes = config.batch_max_bytes
        self._limit = self._max_envelopes
        self._backoff = Backoff(config.backoff_initial_s, config.backoff_max_s, rng)
        self._stop_event = threading.Event()
        self._work = threading.Event()
        self._hurry = threading.Event()
        self._progress = threading.Condition()
        self.state = "starting"
        self.last_error = ""
        self.last_success = ""
        reporter.on_report(self.wake)

    # --- control (any thread) --------------------------------------------------------------

    def wake(self) -> None:
        self._work.set()

    def stop(self, timeout_s: float) -> None:
        self._stop_event.set()
        self._work.set()
        self._hurry.set()
        if self.is_alive():
            self.join(timeout_s)
        if self.is_alive():
            log.warning("sender_stop_timeout", timeout_s=timeout_s)

    def flush(self, timeout_s: float) -> bool:
        """Wait until the spool is empty or ``timeout_s`` passed; True when it is empty."""
        deadline = time.monotonic() + timeout_s
        self._hurry.set()
        self.wake()
        with self._progress:
            while not self._spool.empty() and self.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._progress.wait(min(0.5, remaining))
        return self._spool.empty()

    def health(self) -> dict[str, str]:
        return {
            "state": self.state,
            "last_error": self.last_error,
            "last_success": self.last_success,
        }

    # --- the thread ------------------------------------------------------------------------

    def run(self) -> None:
        log.info("sender_started", url=wire.redact_urls(self._client.url))
        while not self._stop_event.is_set():
            self._work.clear()
            try:
                busy = self._step()
            except Exception:  # the sender must outlive any single bad batch
                log.exception("sender_step_failed")
                busy = False
                self._pause("internal_error")
            if not busy:
                self._work.wait(5.0)
        log.info("sender_stopped")

    def _pause(self, state: str, error: str = "") -> None:
        self.state = state
        if error:
            self.last_error = error
        delay = self._backoff.next_delay()
        log.warning("delivery_backoff", state=state, error=error, retry_in_s=round(delay, 3))
        self._hurry.wait(delay)
        self._hurry.clear()

    def _notify(self) -> None:
        with self._progress:
            self._progress.notify_all()

    def _step(self) -> bool:
        """One attempt; True when there may be more to do at once."""
        if not self._enrollment.enrolled:
            try:
                self._enrollment.enroll()
            except KeyMismatch as exc:
                log.error("enroll_key_mismatch", error=str(exc), advice=KEY_MISMATCH_ADVICE)
                self._pause("key_mismatch", str(exc))
                return True
            except EnrollmentRefused as exc:
                log.error("enroll_refused", error=str(exc), advice="check the enrollment token")
                self._pause("enroll_refused", str(exc))
                return True
            except CollectorError as exc:
                self._pause("unreachable", str(exc))
                return True
            self._backoff.reset()
        batch = self._reporter.batch(max_envelopes=self._limit, max_bytes=self._max_bytes)
        if not batch:
            self.state = "idle" if self._spool.empty() else self.state
            self._notify()
            return False
        body = {"host_id": self._reporter.host_id, "envelopes": [s.envelope for s in batch]}
        try:
            reply = self._client.post(REPORTS_PATH, body)
        except CollectorError as exc:
            self._pause("unreachable", str(exc))
            return True
        if reply.status == 200:
            return self._accepted(batch, reply)
        if reply.status == 404:
            log.warning("collector_unknown_host", action="enroll again")
            self._enrollment.forget()
            return True
        if reply.status >= 500 or reply.status in (408, 429):
            self._pause("collector_error", f"HTTP {reply.status}: {_error(reply)}")
            return True
        code = _code(reply)
        if code in ENVELOPE_REFUSALS:
            self._refused([s.seq for s in batch], reply)
        elif code in CHAIN_CONFLICTS:
            log.error(
                "chain_conflict", status=reply.status, error=_error(reply), advice=CHAIN_ADVICE
            )
            self._pause("chain_conflict", f"HTTP {reply.status}: {_error(reply)}")
        else:
            log.error(
                "delivery_refused", status=reply.status, code=code, advice=INTERMEDIARY_ADVICE
            )
            self._pause("refused", f"HTTP {reply.status}: {_error(reply)}")
        return True

    def _accepted(self, batch: list[Any], reply: Reply) -> bool:
        acks = reply.body.get("acks") if isinstance(reply.body, dict) else None
        sent = {s.seq for s in batch}
        acked = {
            a["seq"]
            for a in acks or []
            if isinstance(a, dict) and a.get("status") in ("accepted", "duplicate")
        } & sent
        if not acked:
            self._pause("collector_error", "HTTP 200 without acknowledgements")
            return True
        self._spool.ack(sorted(acked))
        self._backoff.reset()
        self._limit = self._max_envelopes
        self.state = "ok"
        self.last_success = wire.utc_now()
        log.debug("batch_delivered", count=len(acked), last_seq=max(acked))
        self._notify()
        return True

    def _refused(self, seqs: list[int], reply: Reply) -> None:
        """Narrow a refused batch down to the one envelope the collector will not take."""
        details = _details(reply)
        if len(seqs) == 1:
            body = reply.body if isinstance(reply.body, dict) else {}
            error = {"status": reply.status, **(body.get("error") or {})}
            self._spool.reject(seqs[0], error)
            log.error("envelope_rejected", seq=seqs[0], status=reply.status, error=_error(reply))
            self._limit = self._max_envelopes
            self._notify()
            return
        index = details.get("index")
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(seqs):
            self._limit = max(1, index)
        else:
            self._limit = max(1, len(seqs) // 2)
        log.warning("batch_refused", status=reply.status, size=len(seqs), retry_with=self._limit)
