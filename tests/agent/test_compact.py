"""The compact baseline the running agent keeps: the same answers as the loaded manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import compact
from agent.compact import BLOCK_LINES, CompactLines
from agent.manifest import load_baseline
from agent.walk import Walk
from tests.agent import imagetree


@pytest.fixture(scope="module")
def lines() -> dict[str, str]:
    """Record lines of more paths than fit in a few blocks, some with awkward names."""
    out = {"/": '{"p":"/","t":"d","m":"755","z":[1,1,1]}'}
    for index in range(BLOCK_LINES * 5 + 3):
        path = f"/usr/lib/f{index:04d}"
        out[path] = f'{{"p":"{path}","t":"f","m":"644","s":{index},"z":[{index},{index},{index}]}}'
    odd = "/etc/caf\u00e9 \\"
    out[odd] = '{"p":"/etc/caf\u00e9 \\\\","t":"f","m":"644","z":[2,2,2]}'
    return out


def test_same_answers_as_a_dict(lines: dict[str, str]) -> None:
    packed = CompactLines(lines.items())
    assert len(packed) == len(lines)
    assert list(packed) == list(lines)  # manifest order
    assert list(packed.values()) == list(lines.values())
    for path, line in lines.items():
        assert packed.get(path) == line and path in packed and packed[path] == line
    assert packed.get("/usr/lib/f9999") is None and "/usr/lib" not in packed
    with pytest.raises(KeyError):
        packed["/nope"]
    assert packed.size_bytes < sum(len(p) + len(v) for p, v in lines.items())


def test_colliding_keys_still_find_each_path(
    lines: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compact, "_key", lambda path: len(path) % 3)
    packed = CompactLines(lines.items())
    for path, line in lines.items():
        assert packed.get(path) == line
    assert packed.get("/usr/lib/fxxxx") is None


def test_a_compacted_baseline_judges_alike(tmp_path: Path) -> None:
    root = imagetree.build(tmp_path / "root")
    policy = imagetree.write_policy(tmp_path)
    manifest = tmp_path / "m.gz"
    imagetree.bake(root, policy, manifest)
    loaded = load_baseline(manifest)
    small = loaded.compact()
    assert len(small) == len(loaded) and list(small.paths()) == list(loaded.paths())
    assert [e.path for e in small] == [e.path for e in loaded]
    for entry in loaded:
        assert small.get(entry.path) == entry
    with Walk(root, loaded.policy, workers=1) as walk:
        for path, line, _is_dir in walk.records():
            assert small.same_line(path, line) == loaded.same_line(path, line)
    assert small.subtree_digest("/") is None and small.packages == loaded.packages
