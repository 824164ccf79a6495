"""What the HTTP routes share: one per application, on ``app.state.services``."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from collector.config import Config
from collector.ingest import Ingestor
from collector.metrics import Metrics
from collector.store import SqlStore


@dataclass(frozen=True)
class Services:
    config: Config
    store: SqlStore
    metrics: Metrics
    ingestor: Ingestor


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found
