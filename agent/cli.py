"""``driftwarden-agent``: bake, check and explain an image; run the host daemon.

Exit status (every command): 0 clean / success, 1 drift found, 2 error, 3 untrusted baseline
(missing or bad signature, tampered manifest), 78 bad configuration or policy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from agent import logs
from agent.errors import EXIT_ERROR, EXIT_OK, AgentError

Handler = Callable[[argparse.Namespace], int]


def _keygen(args: argparse.Namespace) -> int:
    from agent import keys

    keys.generate(args.out, overwrite=args.force)
    print(f"wrote {args.out} (private, mode 0600) and {keys.public_path(args.out)}")
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    from agent.policy import load_policy

    policy = load_policy(args.policy)
    for index, path in enumerate(args.paths):
        if index:
            print()
        print(policy.explain(path))
    return EXIT_OK


def _bake(args: argparse.Namespace) -> int:
    from agent import bake

    return bake.bake_command(args)


def _check(args: argparse.Namespace) -> int:
    from agent import baseline

    return baseline.check_command(args)


def _run(args: argparse.Namespace) -> int:
    from agent import daemon

    return daemon.run_command(args)


def _check_config(args: argparse.Namespace) -> int:
    from agent import daemon

    return daemon.check_config_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="driftwarden-agent",
        description="Measure a machine against the image it was built from, and guard it.",
        epilog="exit status: 0 clean, 1 drift, 2 error, 3 untrusted baseline, 78 bad config",
    )
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")
    parser.add_argument(
        "--log-json", action="store_true", default=None, help="JSON log lines even on a TTY"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="write an Ed25519 key pair (KEYFILE and KEYFILE.pub)")
    p.add_argument("--out", type=Path, required=True, help="private key file to write (0600)")
    p.add_argument("--force", action="store_true", help="overwrite an existing key")
    p.set_defaults(handler=_keygen)

    p = sub.add_parser("bake", help="measure an image root and write a signed manifest")
    p.add_argument("--root", type=Path, default=Path("/"), help="image root (default /)")
    p.add_argument("--policy", type=Path, required=True, help="policy TOML file")
    p.add_argument("--out", type=Path, required=True, help="manifest file to write")
    p.add_argument("--key", type=Path, help="Ed25519 private key to sign with")
    p.add_argument("--build-id", default="", help="the image build's identifier")
    p.add_argument("--workers", type=int, default=0, help="hashing threads (0: one per core)")
    p.add_argument(
        "--compress-level",
        type=int,
        default=0,
        choices=range(10),
        metavar="0-9",
        help="gzip level of the manifest (default 0: stored, fastest to check)",
    )
    p.set_defaults(handler=_bake)

    p = sub.add_parser("check", help="measure a root against a baked manifest")
    p.add_argument("--root", type=Path, default=Path("/"), help="root to check (default /)")
    p.add_argument("--baseline", type=Path, required=True, help="manifest written by bake")
    p.add_argument("--pubkey", type=Path, help="pipeline public key; signature then required")
    p.add_argument("--policy", type=Path, help="policy to judge by (default: the baked one)")
    p.add_argument("--full", action="store_true", help="re-hash every file")
    p.add_argument("--first-boot", action="store_true", help="apply first-boot allowances")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("--workers", type=int, default=0, help="hashing threads (0: one per core)")
    p.add_argument(
        "--verify-packages",
        action="store_true",
        help="also check package-owned files against the package database's digests (debsums)",
    )
    p.set_defaults(handler=_check)

    p = sub.add_parser("explain", help="say which policy rule decides each PATH, and why")
    p.add_argument("--policy", type=Path, required=True, help="policy TOML file")
    p.add_argument("paths", nargs="+", metavar="PATH", help="paths as seen inside the image")
    p.set_defaults(handler=_explain)

    p = sub.add_parser("run", help="run the host daemon (boot check, then guard and report)")
    p.add_argument("--config", type=Path, help="agent TOML configuration")
    p.add_argument("--root", type=Path, help="root to guard (default /)")
    p.add_argument("--baseline", type=Path, help="baked manifest")
    p.add_argument("--state-dir", type=Path, help="durable state (key, spool, cursors)")
    p.add_argument("--collector", help="collector base URL")
    p.add_argument(
        "--enroll-token-file", type=Path, help="file holding the enrollment token (first start)"
    )
    p.add_argument(
        "--enroll-token",
        help="deprecated (shows in ps): use --enroll-token-file or DRIFTWARDEN_ENROLL_TOKEN",
    )
    p.add_argument("--once", action="store_true", help="run one cycle and exit (for tests)")
    p.set_defaults(handler=_run)

    p = sub.add_parser("check-config", help="validate the configuration and exit")
    p.add_argument("--config", type=Path, required=True, help="agent TOML configuration")
    p.set_defaults(handler=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(
        "driftwarden-agent",
        level=args.log_level,
        json_lines=args.log_json,
        deferred=args.command not in ("run", "check-config"),
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception:
        logs.get_logger().exception("internal_error", command=args.command)
        print("error: internal error (see the log above); please report it", file=sys.stderr)
        return EXIT_ERROR
