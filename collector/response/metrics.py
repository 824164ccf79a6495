"""The response's gauges on ``/metrics``: replacements under way and blocked, holds (the storm
breaker's and quarantines among them), firing incidents, and what the rails decided. Read from
the store at each scrape, so every replica and worker process reports the same fleet."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from collector.response.records import OPEN_REPLACEMENT
from collector.store import SqlStore
from collector.store.schema import decisions, holds, incidents, replacements


class RailGauges(Collector):
    def __init__(self, store: SqlStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        r, h, i, d = replacements.c, holds.c, incidents.c, decisions.c
        with self.store.read() as conn:
            open_replacements = conn.execute(
                select(r.pool, r.state, func.count())
                .where(r.state.in_([s.value for s in OPEN_REPLACEMENT]))
                .group_by(r.pool, r.state)
            ).all()
            open_holds = conn.execute(
                select(h.scope, h.kind, func.count())
                .where(h.released_at.is_(None))
                .group_by(h.scope, h.kind)
            ).all()
            firing = conn.execute(
                select(i.cause, func.count()).where(i.status == "firing").group_by(i.cause)
            ).all()
            decided = conn.execute(select(d.decision, func.count()).group_by(d.decision)).all()
        gauge = GaugeMetricFamily(
            "driftwarden_replacements_open",
            "Replacements not finished, by pool and state (blocked by a rail, acting, verifying)",
            labels=["pool", "state"],
        )
        for pool, state, n in open_replacements:
            gauge.add_metric([pool or "", state], n)
        yield gauge
        gauge = GaugeMetricFamily(
            "driftwarden_holds_open",
            "Holds in force, by scope and kind (operator, storm breaker, image quarantine)",
            labels=["scope", "kind"],
        )
        for scope, kind, n in open_holds:
            gauge.add_metric([scope, kind], n)
        yield gauge
        gauge = GaugeMetricFamily(
            "driftwarden_incidents_firing", "Alerts firing, by cause", labels=["cause"]
        )
        for cause, n in firing:
            gauge.add_metric([cause], n)
        yield gauge
        counter = CounterMetricFamily(
            "driftwarden_rail_decisions",
            "Decisions recorded in the response's audit trail, by decision",
            labels=["decision"],
        )
        for decision, n in decided:
            counter.add_metric([decision], n)
        yield counter
