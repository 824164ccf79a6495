"""The response's commands: ``hold``, ``release``, ``holds``, ``replacements``, ``pools``,
``decisions`` and ``breakglass``. They talk to the HTTP API like the other read and action
commands (``--url``, ``--token``, ``--json``)."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from collector import tables
from collector.client import ApiClient
from collector.errors import EXIT_OK, ApiClientError, CollectorError
from collector.response import ssh
from collector.response.records import ReplacementState

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Api:
    """What the collector's CLI lends these commands: its client, reader and printer."""

    client: Callable[[argparse.Namespace], ApiClient]
    read: Callable[..., int]
    print_json: Callable[[Any], None]


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    parent: argparse.ArgumentParser,
    api: Api,
) -> None:
    for verb, text in (
        ("hold", "hold a host, a pool (--pool) or an image (--image): alerted, not replaced"),
        ("release", "release a hold, resume a storm-paused pool, or retry a failed replacement"),
    ):
        p = sub.add_parser(verb, parents=[parent], help=text)
        p.add_argument("host_id", nargs="?", metavar="HOST")
        p.add_argument("--pool", help="the pool instead of a host")
        p.add_argument("--image", metavar="BUILD_ID", help="the image instead of a host")
        p.add_argument("--reason", required=True)
        p.set_defaults(handler=lambda args, api=api: _hold(args, api))

    p = sub.add_parser("holds", parents=[parent], help="open holds, paused pools, quarantines")
    p.add_argument("--released", action="store_true", help="also list released holds")
    p.set_defaults(handler=lambda args: _holds(args, api))

    p = sub.add_parser("replacements", parents=[parent], help="replacements and what blocks them")
    p.add_argument("--state", choices=[s.value for s in ReplacementState])
    p.add_argument("--pool")
    p.set_defaults(handler=lambda args: _replacements(args, api))

    p = sub.add_parser("pools", parents=[parent], help="pools: budget, in flight, holds")
    p.set_defaults(handler=lambda args: _pools(args, api))

    p = sub.add_parser("decisions", parents=[parent], help="the safety rails' audit trail")
    p.add_argument("--host", dest="host_id")
    p.add_argument("--pool")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=lambda args: _decisions(args, api))

    p = sub.add_parser(
        "breakglass",
        parents=[parent],
        help="announce and open an SSH session to a host (its replacement waits for the end)",
        description="Announce the session to the collector (who, why, ticket), open it through "
        "SSH, and tell the collector when it ends. The login is attributed, and the host is "
        "replaced after the session plus the grace period. Exit status: the remote command's.",
    )
    p.add_argument("host_id", metavar="HOST")
    p.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    p.add_argument("--ticket", help="incident or change ticket")
    p.add_argument("--user", help="login name on the host (default: yours)")
    p.add_argument("--address", help="where to connect (default: the host's hostname)")
    p.add_argument("--port", type=int, default=22)
    p.add_argument("--identity", type=Path, help="private key file (default: agent, ~/.ssh)")
    p.add_argument("--known-hosts", type=Path, help="known_hosts file besides ~/.ssh/known_hosts")
    p.usage = "%(prog)s HOST --reason TEXT [--ticket ID] [options] [-- COMMAND ...]"
    _pass_through(p)
    p.set_defaults(handler=lambda args: _breakglass(args, api))


def _pass_through(parser: argparse.ArgumentParser) -> None:
    """Everything after ``--`` is the remote command (``remote_command``), left unparsed."""
    parse = parser.parse_known_args

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        given = list(sys.argv[1:] if args is None else args)
        remote: list[str] = []
        if "--" in given:
            cut = given.index("--")
            given, remote = given[:cut], given[cut + 1 :]
        parsed, extras = parse(given, namespace)
        parsed.remote_command = remote
        return parsed, extras

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign,assignment]


def host_lines(data: Any) -> list[str]:
    """The host view's lines about its replacement, holds and break-glass sessions."""
    lines: list[str] = []
    replacement = data.get("replacement")
    if replacement:
        state = replacement["state"]
        why = f" by {replacement['blocked_by']}: {replacement['blocked_reason']}"
        lines.append(f"replacement: {state}{why if state == 'blocked' else ''}")
    for hold in data.get("holds", []):
        lines.append(f"held by {hold['actor']} since {hold['created_at']}: {hold['reason']}")
    for session in data.get("breakglass", []):
        lines.append(
            f"break-glass {session['id']}: {session['user']} for {session['operator']} "
            f"({session['reason']}), login {session['login_at'] or '-'}, "
            f"ended {session['ended_at'] or '-'}"
        )
    return ["", *lines] if lines else []


def _target(args: argparse.Namespace) -> tuple[str, str]:
    given = [
        (path, value)
        for path, value in (("hosts", args.host_id), ("pools", args.pool), ("images", args.image))
        if value
    ]
    if len(given) != 1:
        raise CollectorError("name exactly one of HOST, --pool NAME or --image BUILD_ID")
    return given[0]


def _hold(args: argparse.Namespace, api: Api) -> int:
    kind, target = _target(args)
    client = api.client(args)
    try:
        data = client.post(f"/v1/{kind}/{target}/{args.command}", {"reason": args.reason})
    finally:
        client.close()
    if args.json:
        api.print_json(data)
    elif args.command == "hold":
        print(tables.lines(f"held {data['scope']} {data['target']}: {data['reason']}"))
    else:
        released = ", ".join(f"{h['kind']} hold {h['id']}" for h in data["released"])
        retried = " (its replacement will be tried again)" if data["retried"] else ""
        released = f"{released or 'no hold'}{retried}"
        print(tables.lines(f"released {data['scope']} {data['target']}: {released}"))
    return EXIT_OK


def _holds(args: argparse.Namespace, api: Api) -> int:
    def show(data: Any) -> str:
        cols = ("id", "scope", "target", "kind", "actor", "created_at", "reason", "released_at")
        return tables.render(data["holds"], cols)

    return api.read(args, "/v1/holds", show, released=args.released or None)


def _replacements(args: argparse.Namespace, api: Api) -> int:
    def show(data: Any) -> str:
        cols = ("host_id", "pool", "state", "requests", "blocked_by", "blocked_reason")
        return tables.render(data["replacements"], cols)

    return api.read(args, "/v1/replacements", show, state=args.state, pool=args.pool)


def _pools(args: argparse.Namespace, api: Api) -> int:
    def show(data: Any) -> str:
        rows = [
            {**p, "holds": ", ".join(f"{h['kind']}: {h['reason']}" for h in p["holds"])}
            for p in data["pools"]
        ]
        cols = ("name", "action", "dry_run", "budget_limit", "in_flight", "blocked", "holds")
        return tables.render(rows, cols)

    return api.read(args, "/v1/pools", show)


def _decisions(args: argparse.Namespace, api: Api) -> int:
    def show(data: Any) -> str:
        cols = ("at", "host_id", "pool", "decision", "actor", "reason")
        return tables.render(data["decisions"], cols)

    return api.read(
        args, "/v1/decisions", show, host_id=args.host_id, pool=args.pool, limit=args.limit
    )


def _breakglass(args: argparse.Namespace, api: Api) -> int:
    command = list(args.remote_command)
    operator = getpass.getuser()
    client = api.client(args)
    try:
        session = client.post(
            f"/v1/hosts/{args.host_id}/breakglass",
            {
                "reason": args.reason,
                "ticket": args.ticket,
                "user": args.user or operator,
                "operator": operator,
            },
        )
        print(
            f"break-glass session {session['id']} to {args.host_id} announced; the host is "
            f"replaced {session['grace_s']:g}s after it ends",
            file=sys.stderr,
        )
        try:
            target = ssh.Target(
                address=args.address or session["hostname"],
                port=args.port,
                user=session["user"],
                identity=args.identity,
                known_hosts=args.known_hosts,
            )
            connection = ssh.connect(target)
            try:
                return ssh.run(connection, command)
            finally:
                connection.close()
        finally:
            _end(client, session["id"])
    finally:
        client.close()


def _end(client: ApiClient, session_id: int) -> None:
    try:
        client.post(f"/v1/breakglass/{session_id}/end", {})
    except ApiClientError as exc:
        print(
            f"warning: could not tell the collector that session {session_id} ended ({exc}); "
            "it ends when the agent reports the logout",
            file=sys.stderr,
        )
