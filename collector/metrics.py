"""Prometheus metrics (``/metrics``): hosts by state, ingest rate, refusals by reason, job
queue depths, and the response's rails (``collector.response.metrics``). Counters live in this
process; gauges are read from the store at each scrape, so every replica reports the same
fleet."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from collector.model import HostState, JobState
from collector.response.metrics import RailGauges
from collector.store import SqlStore, Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StoreGauges(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        hosts = GaugeMetricFamily("driftwarden_hosts", "Hosts by state", labels=["state"])
        counts = self.store.state_counts()
        for state in HostState:
            hosts.add_metric([state.value], counts.get(state.value, 0))
        yield hosts
        queue = GaugeMetricFamily(
            "driftwarden_jobs", "Jobs in the queue by kind and state", labels=["kind", "state"]
        )
        for (kind, job_state), n in sorted(self.store.job_counts().items()):
            if job_state in (JobState.PENDING, JobState.RUNNING, JobState.DEAD):
                queue.add_metric([kind, job_state], n)
        yield queue
        fleet = GaugeMetricFamily(
            "driftwarden_fleet_events_open", "Open fleet-level events", labels=["kind"]
        )
        for event in self.store.fleet_events(open_only=True):
            fleet.add_metric([event.kind], 1)
        yield fleet


class Metrics:
    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self._envelopes = Counter(
            "driftwarden_envelopes",
            "Envelopes received, by kind and status (accepted, duplicate)",
            ["kind", "status"],
            registry=self.registry,
        )
        self._refused = Counter(
            "driftwarden_reports_refused",
            "Requests refused, by reason (the error code)",
            ["reason"],
            registry=self.registry,
        )
        self.ingest_seconds = Histogram(
            "driftwarden_ingest_seconds",
            "Time to verify, commit and acknowledge one batch",
            registry=self.registry,
        )
        self.registry.register(_StoreGauges(store))
        if isinstance(store, SqlStore):
            self.registry.register(RailGauges(store))

    def envelope(self, kind: str, status: str) -> None:
        self._envelopes.labels(kind, status).inc()

    def rejected(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
