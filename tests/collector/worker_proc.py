"""A job worker process for the replica test: claims ``probe`` jobs from the database and
appends each job id it runs to a file. ``block`` jobs hang in the worker named ``blocker``
(so it can be killed while holding a lease)."""

from __future__ import annotations

import os
import sys
import threading
from datetime import datetime
from pathlib import Path

from collector.config import JobConfig
from collector.jobs import Registry, Worker
from collector.model import Job
from collector.store import open_store


def main(url: str, name: str, out: Path) -> None:
    store = open_store(url, pool_size=2, migrate=False)
    hang = threading.Event()

    def probe(job: Job) -> datetime | None:
        if job.payload.get("block") and name == "blocker":
            hang.wait()
        with out.open("a") as fh:
            fh.write(f"{job.job_id}\n")
            fh.flush()
            os.fsync(fh.fileno())
        return None

    registry = Registry()
    registry.register("probe", probe)
    config = JobConfig(lease_s=1.0, poll_interval_s=0.05)
    Worker(store, registry, config, name=name, batch=10).run(threading.Event())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
