"""OrderedLines: a manifest's record lines found by path, in manifest order or not."""

from __future__ import annotations

import pickle

import pytest

from agent import lines as lines_module
from agent import record
from agent.lines import OrderedLines, line_path
from agent.measure import Entry, order_key

PATHS = [
    "/",
    "/etc",
    "/etc/a\\nb",  # a backslash and an n: its JSON is "/etc/a\\\\nb"
    "/etc/a\nb",  # a newline: its JSON is "/etc/a\\nb"
    '/etc/quote"d',
    "/etc/x",
    "/usr",
    "/usr/bad\udcffname",  # not UTF-8: written in b64: form
    "/usr/café",
    "/usr-b",
]


def _line(path: str) -> str:
    kind = "dir" if path in ("/", "/etc", "/usr") else "file"
    entry = Entry(path, kind, 0o644, 0, 0, 0, None, None, None, (), 0, 1, 2, len(path), 0)
    return record.to_line(entry)


@pytest.fixture
def ordered() -> tuple[OrderedLines, dict[str, str]]:
    paths = sorted(PATHS, key=order_key)
    by_path = {path: _line(path) for path in paths}
    return OrderedLines(list(by_path.values())), by_path


def test_every_path_is_found_in_manifest_order(
    ordered: tuple[OrderedLines, dict[str, str]],
) -> None:
    found, by_path = ordered
    for path, line in by_path.items():
        assert found.get(path) == line
        assert line_path(line) == path
    assert found.get("/usr/zzz") is None and "/nope" not in found


def test_every_path_is_found_out_of_order_and_after_a_miss(
    ordered: tuple[OrderedLines, dict[str, str]],
) -> None:
    found, by_path = ordered
    for path in reversed(by_path):
        assert found[path] == by_path[path]
        assert found.get(path + "-missing") is None
        assert found.get("/etc/a\\") is None  # the start of an escaped path is no path
    with pytest.raises(KeyError):
        found["/etc/y"]


def test_a_path_that_reads_like_another_paths_escaped_form_is_not_taken_for_it(
    ordered: tuple[OrderedLines, dict[str, str]],
) -> None:
    """The line after "/etc" belongs to "/etc/a\\nb" (a backslash and an n) and starts
    {"p":"/etc/a\\\\nb": asked for the path with a newline next, the one whose JSON reads
    "/etc/a\\nb", the lines give that path's own line, not its neighbour's."""
    found, by_path = ordered
    assert found.get("/etc") == by_path["/etc"]
    newline = found.get("/etc/a\nb")
    assert newline == by_path["/etc/a\nb"] != by_path["/etc/a\\nb"]
    assert found.get("/etc") == by_path["/etc"]
    assert found.get("/etc/a\\nb") == by_path["/etc/a\\nb"]


def test_many_lookups_out_of_order_build_an_index_once(
    ordered: tuple[OrderedLines, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lines_module, "BISECTS", 3)
    found, by_path = ordered
    for _round in range(3):
        for path in reversed(by_path):
            assert found.get(path) == by_path[path]
    assert found._index is not None and len(found._index) == len(by_path)


def test_it_is_a_mapping_in_manifest_order_and_survives_pickling(
    ordered: tuple[OrderedLines, dict[str, str]],
) -> None:
    found, by_path = ordered
    assert len(found) == len(by_path)
    assert list(found) == list(by_path)
    assert list(found.items()) == list(by_path.items())
    assert list(found.values()) == list(by_path.values())
    copy = pickle.loads(pickle.dumps(found))
    assert dict(copy.items()) == by_path
