"""Re-verification on real trees: the metadata pass, the rolling full re-hash, its I/O budget
(bytes counted per interval), the page cache left as it was found, and the low priority."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.rescan import (
    IOPRIO_CLASS_IDLE,
    IOPRIO_CLASS_SHIFT,
    IoBudget,
    RehashPlace,
    RescanConfig,
    Rescanner,
    hash_budgeted,
    resident,
)
from tests.agent.guardtree import Image, Recorder, image, wait_until

QUIET = RescanConfig(metadata_interval_s=3600, full_rehash_period_s=1e9)


@contextmanager
def rescanning(img: Image, config: RescanConfig = QUIET) -> Iterator[tuple[Rescanner, Recorder]]:
    found = Recorder()
    rescanner = Rescanner(img.judge(), found, config=config)
    rescanner.start()
    try:
        yield rescanner, found
    finally:
        assert rescanner.stop()


def test_metadata_pass_reports_each_change_once(tmp_path: Path) -> None:
    img = image(tmp_path)
    os.chmod(img.root / "etc/app.conf", 0o666)
    (img.root / "usr/bin/dropper").write_bytes(b"\x7fELF")
    (img.root / "usr/share/doc/readme").unlink()
    (img.root / "var/log/syslog").write_bytes(b"rotated\n")  # mutable: not drift
    with rescanning(img) as (rescanner, found):
        rescanner.request("test")
        wait_until(lambda: rescanner.passes == 1, what="the first pass")
        assert {(f["path"], f["change"]) for s, f in found.items if s == "rescan"} == {
            ("/etc/app.conf", "modified"),
            ("/usr/bin/dropper", "added"),
            ("/usr/share/doc/readme", "removed"),
        }
        assert rescanner.health().last_rescan is not None
        rescanner.request("again")
        wait_until(lambda: rescanner.passes == 2, what="the second pass")
        assert len(found.items) == 3  # nothing new: nothing reported again


def test_degraded_watching_passes_every_fallback_interval(tmp_path: Path) -> None:
    img = image(tmp_path)
    config = RescanConfig(
        metadata_interval_s=3600, fallback_interval_s=0.05, full_rehash_period_s=1e9
    )
    with rescanning(img, config) as (rescanner, _found):
        rescanner.degrade("watch_limit")
        wait_until(lambda: rescanner.passes >= 3, what="three fallback passes")
        assert rescanner.health().degraded == "watch_limit"


def test_rolling_rehash_finds_content_changed_with_size_and_mtime_kept(tmp_path: Path) -> None:
    img = image(tmp_path)
    lib = img.root / "usr/lib/libx.so"
    st = lib.stat()
    data = bytearray(lib.read_bytes())
    data[1000] ^= 0xFF
    lib.write_bytes(bytes(data))
    os.utime(lib, ns=(st.st_atime_ns, st.st_mtime_ns))
    config = RescanConfig(metadata_interval_s=3600, full_rehash_period_s=0.01, io_budget_mb_s=50)
    with rescanning(img, config) as (rescanner, found):
        source, f = found.wait_for(lambda s, f: f["path"] == "/usr/lib/libx.so")
        wait_until(lambda: rescanner.health().last_full_rehash is not None, what="one round")
    assert source == "rescan" and "content" in f["fields"] and "mtime" not in f["fields"]
    assert rescanner.passes == 0  # found by the re-hash, not by a metadata pass


def test_rolling_rehash_reports_a_file_that_became_a_symlink(tmp_path: Path) -> None:
    """The re-hash cannot read it (ELOOP) and measures it the usual way: what that finds is
    sent, and the re-hash goes on (it once failed on the list this returns)."""
    img = image(tmp_path)
    tool = img.root / "usr/bin/tool"
    tool.unlink()
    tool.symlink_to("/bin/sh")
    config = RescanConfig(metadata_interval_s=3600, full_rehash_period_s=0.01, io_budget_mb_s=50)
    with rescanning(img, config) as (rescanner, found):
        source, f = found.wait_for(lambda s, f: f.get("path") == "/usr/bin/tool")
        wait_until(lambda: rescanner.health().last_full_rehash is not None, what="one round")
        assert rescanner.running
    assert source == "rescan" and "type" in f["fields"] and f["after"]["t"] == "l"
    assert not [f for s, f in found.items if s == "integrity"]
    assert rescanner.passes == 0


def test_rehash_keeps_to_the_io_budget(tmp_path: Path) -> None:
    img = image(tmp_path)
    for index in range(3):
        (img.root / f"usr/lib/big{index}").write_bytes(os.urandom(1_500_000))
    img = image_rebaked(img, tmp_path)
    total = sum(e.size for e in img.baseline if e.type == "file" and e.digest)
    rate_mb_s, chunk = 4.0, 256 << 10
    config = RescanConfig(
        metadata_interval_s=3600,
        full_rehash_period_s=0.001,
        io_budget_mb_s=rate_mb_s,
        chunk_bytes=chunk,
    )
    with rescanning(img, config) as (rescanner, _found):
        wait_until(lambda: rescanner.health().last_full_rehash is not None, 60, "one round")
        reads = list(rescanner.rehash.budget.history)
    # every file was read once (a next round may have begun since)
    assert sum(n for _, n in reads) >= total
    rate = rate_mb_s * 1_000_000
    for window_s in (0.1, 0.25, 0.5, 1.0):
        for start, _ in reads:
            in_window = sum(n for t, n in reads if start <= t < start + window_s)
            assert in_window <= rate * window_s + chunk, (window_s, in_window)


def image_rebaked(img: Image, tmp_path: Path) -> Image:
    from tests.agent.guardtree import bake

    policy, baseline = bake(img.root, tmp_path)
    return Image(img.root, policy, baseline)


def _cached(path: Path) -> list[bool]:
    """Per page: is it in the page cache?"""
    fd = os.open(path, os.O_RDONLY)
    try:
        return resident(fd, 0, path.stat().st_size)
    finally:
        os.close(fd)


def test_rehash_leaves_the_page_cache_as_it_found_it(tmp_path: Path) -> None:
    """What the re-hash read from disk leaves the cache; what was cached stays. The kernel may
    also evict cached pages of its own accord (proactive reclaim such as DAMON's ``pageout``
    scheme, seen on the machines these tests run on), so a round whose warm pages went is
    tried again with new files, up to three times: a re-hash that evicts them fails every
    round."""
    budget = IoBudget(1e9, 1 << 20)
    for attempt in range(3):
        cold, warm = tmp_path / f"cold-{attempt}", tmp_path / f"warm-{attempt}"
        for path in (cold, warm):
            path.write_bytes(os.urandom(4 << 20))
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        warm.read_bytes()
        assert not any(_cached(cold)) and all(_cached(warm))
        for path in (cold, warm):
            assert hash_budgeted(str(path), budget, threading.Event(), 1 << 20) is not None
        assert not any(_cached(cold)), "the re-hash left what it read from disk in the cache"
        if all(_cached(warm)):
            return
    raise AssertionError("the re-hash evicted what others had cached, in each of three rounds")


def _ioprio(tid: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.syscall(252, 1, tid))  # ioprio_get(IOPRIO_WHO_PROCESS, tid) on x86_64


def _nice(tid: int) -> int:
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_runs_at_the_lowest_cpu_and_io_priority(tmp_path: Path) -> None:
    if platform.machine() != "x86_64":
        pytest.skip("ioprio_get is read with the x86_64 syscall number")
    img = image(tmp_path)
    with rescanning(img) as (rescanner, _found):
        tid = rescanner.native_id
        assert tid is not None
        wait_until(lambda: _nice(tid) == 19, what="nice 19")
        wait_until(lambda: _ioprio(tid) == IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT, what="idle I/O")
    assert _nice(threading.get_native_id()) != 19  # only the rescan thread


def test_a_requested_pass_interrupts_a_slow_rehash(tmp_path: Path) -> None:
    img = image(tmp_path)
    huge = 4 << 20
    (img.root / "usr/lib/huge").write_bytes(os.urandom(huge))
    img = image_rebaked(img, tmp_path)
    others = sum(e.size for e in img.baseline if e.digest and e.path != "/usr/lib/huge")
    chunk = 256 << 10
    config = RescanConfig(
        metadata_interval_s=3600,
        full_rehash_period_s=0.001,
        io_budget_mb_s=0.5,  # the big file alone takes 8 s
        chunk_bytes=chunk,
    )
    with rescanning(img, config) as (rescanner, _found):
        budget = rescanner.rehash.budget
        wait_until(lambda: budget.total >= others + chunk, what="the big file to be begun")
        rescanner.request("overflow")
        wait_until(lambda: rescanner.passes == 1, what="the requested pass")
        assert budget.total < others + huge  # the pass did not wait for the big file


def test_a_restart_resumes_the_rehash_round_where_it_stood(tmp_path: Path) -> None:
    img = image(tmp_path)
    for index in range(8):
        (img.root / f"usr/lib/big{index}").write_bytes(os.urandom(150_000))
    img = image_rebaked(img, tmp_path)
    sizes = [
        e.size
        for e in img.baseline
        if e.type == "file" and e.digest is not None and img.policy.wants_content(e.path)
    ]
    place = tmp_path / "state" / "rehash.json"
    place.parent.mkdir()
    config = RescanConfig(
        metadata_interval_s=3600,
        full_rehash_period_s=3,  # paced to about 3 s for the round
        io_budget_mb_s=1.0,
        chunk_bytes=64 << 10,
    )

    def rescanner(baseline: str = "image-1") -> Rescanner:
        return Rescanner(
            img.judge(), Recorder(), config=config, place_file=place, baseline=baseline
        )

    first = rescanner()
    first.start()
    wait_until(lambda: first.rehash._done >= 3, 30, "three files re-hashed")
    assert first.stop()
    saved = json.loads(place.read_text())
    done = saved["done"]
    assert (
        3 <= done < len(sizes) and saved["finished_at"] is None and saved["baseline"] == "image-1"
    )

    second = rescanner()
    assert second.health().last_full_rehash is None and second.rehash.first_round_in_s() == 0
    with capture_logs() as logs:
        second.start()
        wait_until(lambda: second.health().last_full_rehash is not None, 60, "the round")
        assert second.stop()
    (resumed,) = [e for e in logs if e["event"] == "full_rehash_resumed"]
    assert (resumed["done"], resumed["files"]) == (done, len(sizes))
    assert second.rehash.budget.total == sum(sizes[done:])  # only what was left was read
    finished = json.loads(place.read_text())
    assert finished["done"] == len(sizes) and finished["finished_at"] is not None
    assert finished["started_at"] == saved["started_at"]  # the same round, resumed

    RehashPlace("image-1", time.time(), len(sizes), time.time()).save(place)
    third = rescanner()  # after a finished round: the next one when it is due, not at once
    assert third.health().last_full_rehash is not None
    assert 2 < third.rehash.first_round_in_s() <= 3
    other = rescanner("image-2")  # another image: a round of its own, at once
    assert other.health().last_full_rehash is None and other.rehash.first_round_in_s() == 0
