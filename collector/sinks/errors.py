"""The exceptions of alert delivery.

``DeliveryError`` says whether trying again can help (``retryable``) and, when the receiver
said so, how long to wait first (``retry_after_s``); the outbox worker decides what to do with
it. Messages never carry a secret (a routing key, a Slack webhook URL, an HMAC key)::

    SinkError                  anything this package raises
    ├── SinkConfigError        a [[sink]] table that cannot be used; names the key and value
    ├── MalformedAlertError    a stored alert that does not have the documented shape
    ├── SignatureError         a webhook body whose signature or timestamp does not verify
    └── DeliveryError          the receiver did not take the alert (retryable or not)
        └── DeliveryInterrupted  a shutdown interrupted the waiting between attempts
"""

from __future__ import annotations


class SinkError(Exception):
    pass


class SinkConfigError(SinkError):
    pass


class MalformedAlertError(SinkError):
    pass


class SignatureError(SinkError):
    pass


class DeliveryError(SinkError):
    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        retry_after_s: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.status = status


class DeliveryInterrupted(DeliveryError):
    def __init__(self, message: str = "delivery interrupted by shutdown") -> None:
        super().__init__(message, retryable=True)
