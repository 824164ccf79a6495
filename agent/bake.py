"""The ``bake`` command: measure an image root into a signed manifest (``docs/manifest.md``).

The walk's workers are started as early as can be: this module imports only what the walk
needs, and the rest (the manifest writer, the key, the package readers) once they are walking.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from agent import logs
from agent.errors import EXIT_OK, PolicyError
from agent.imageroot import own_paths, root_dir
from agent.policy import Policy, load_policy
from agent.walk import Walk

log = logs.get_logger()


def _policy_with_text(path: Path) -> tuple[Policy, str]:
    policy = load_policy(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy: {exc.strerror}", path=path) from exc
    if load_policy(path).digest != policy.digest:
        raise PolicyError("the policy changed while it was read", path=path)
    return policy, text


def bake_command(args: argparse.Namespace) -> int:
    root = root_dir(args.root)
    policy, text = _policy_with_text(args.policy)
    out: Path = args.out
    started = time.monotonic()
    own = {str(out.with_name(f".{out.name}{suffix}")) for suffix in (".tmp", ".entries.tmp")}
    ignore = own_paths(root, out, *(Path(p) for p in own))
    with Walk(root, policy, workers=args.workers, ignore=ignore) as walk:
        walk.start()  # the workers walk while this process imports and reads the rest
        log.info("bake_started", root=str(root), policy=policy.name, out=str(out))
        from agent import keys
        from agent.manifest import ManifestWriter
        from agent.packages import read_packages

        signer = keys.load_private(args.key) if args.key else None
        packages = read_packages(root)
        with ManifestWriter(
            out,
            policy=policy,
            policy_text=text,
            build_id=args.build_id,
            signer=signer,
            compress_level=args.compress_level,
        ) as writer:
            for block in walk.blocks():
                writer.add_block(block)
            writer.set_packages(packages)
            statement = writer.finish()
    seconds = time.monotonic() - started
    log.info("bake_finished", entries=writer.count, root_digest=statement["root"], seconds=seconds)
    signed = f"signed by {statement['key_id']}" if signer else "UNSIGNED (no --key)"
    print(
        f"baked {writer.count} entries and {len(packages.packages)} {packages.manager} packages"
        f" from {root} into {out}"
    )
    print(f"merkle root {statement['root']}, {signed}")
    return EXIT_OK
