"""``driftwarden``: run the collector, bootstrap its tokens, and ask it about the fleet.

Server-side commands (``serve``, ``check-config``, ``token create``, ``enroll-token create``)
work on the configuration and the database directly; the read and action commands talk to the
HTTP API (``--url``/``DRIFTWARDEN_URL``, ``--token``/``DRIFTWARDEN_TOKEN``) and print a table,
or the API's JSON with ``--json``.

Exit status: 0 success, 2 error, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from agent import wire
from collector import config as config_mod
from collector import logs, tables
from collector.client import ApiClient
from collector.errors import EXIT_ERROR, EXIT_OK, CollectorError, ConfigError
from collector.model import HostState, Role
from collector.response import cli as response_cli

Handler = Callable[[argparse.Namespace], int]
DEFAULT_URL = "http://127.0.0.1:8080"


# --- server side -----------------------------------------------------------------------------


def load_config(args: argparse.Namespace) -> config_mod.Config:
    """The configuration file (if any) with the command line's overrides applied."""
    path = args.config or os.environ.get("DRIFTWARDEN_CONFIG")
    config = config_mod.load(Path(path)) if path else config_mod.Config()
    if getattr(args, "db", None):
        config = config.replace(database=config_mod.DatabaseConfig(url=args.db))
    if getattr(args, "listen", None):
        try:
            config_mod.parse_listen(args.listen)
        except ValueError as exc:
            raise ConfigError(f"--listen {args.listen!r}: {exc}") from exc
        config = config.replace(server=dataclasses.replace(config.server, listen=args.listen))
    if getattr(args, "processes", None) is not None:
        if not 0 <= args.processes <= config_mod.MAX_PROCESSES:
            raise ConfigError(
                f"--processes {args.processes} is out of range 0..{config_mod.MAX_PROCESSES}"
            )
        config = config.replace(server=dataclasses.replace(config.server, processes=args.processes))
    return config


def _open_store(args: argparse.Namespace) -> Any:
    from collector.store import open_store

    config = load_config(args)
    return open_store(config.database.url, pool_size=2)


def _serve(args: argparse.Namespace) -> int:
    from collector import serve

    config = load_config(args)
    logs.configure("driftwarden-collector", level=config.log.level, json_lines=config.log.json)
    return serve.run(config)


def _check_config(args: argparse.Namespace) -> int:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from collector.store import BACKENDS, EXAMPLES

    config = load_config(args)
    try:
        scheme = make_url(config.database.url).get_backend_name()
    except ArgumentError as exc:
        raise ConfigError(f"[database] url is not a database URL; valid: {EXAMPLES}") from exc
    if scheme not in BACKENDS:
        raise ConfigError(f"[database] url has unknown scheme {scheme!r}; valid: {EXAMPLES}")
    print(f"ok: {config.source} (database: {scheme}, listen: {config.server.listen})")
    return EXIT_OK


def _token_create(args: argparse.Namespace) -> int:
    from collector import auth

    store = _open_store(args)
    try:
        secret, record = auth.create_api_token(store, Role.parse(args.role), args.name)
    finally:
        store.close()
    if args.json:
        _print_json({**record.to_json(), "token": secret})
    else:
        print(f"created {record.role.label} token {record.token_id}; it is shown only once:")
        print(secret)
    return EXIT_OK


def _enroll_token_create(args: argparse.Namespace) -> int:
    from collector import auth

    store = _open_store(args)
    try:
        secret, record = auth.create_enroll_token(
            store, note=args.note, expires_in_s=args.expires_in, uses=args.uses, pool=args.pool
        )
    finally:
        store.close()
    if args.json:
        _print_json({**record.to_json(), "token": secret})
    else:
        print(f"created enrollment token {record.token_id}; it is shown only once:")
        print(secret)
    return EXIT_OK


# --- API side --------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> ApiClient:
    url = args.url or os.environ.get("DRIFTWARDEN_URL") or DEFAULT_URL
    return ApiClient(url, args.token or os.environ.get("DRIFTWARDEN_TOKEN"))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _read(args: argparse.Namespace, path: str, show: Callable[[Any], str], **params: Any) -> int:
    client = _client(args)
    try:
        data = client.get(path, **params)
    finally:
        client.close()
    if args.json:
        _print_json(data)
    else:
        print(tables.lines(show(data)))
    return EXIT_OK


HOST_COLUMNS = ("host_id", "state", "state_cause", "pool", "image", "last_seen_at")


def _host_row(h: dict[str, Any]) -> dict[str, Any]:
    return {**h, "image": (h.get("image") or {}).get("build_id")}


def _hosts(args: argparse.Namespace) -> int:
    def show(data: Any) -> str:
        return tables.render([_host_row(h) for h in data["hosts"]], HOST_COLUMNS)

    return _read(args, "/v1/hosts", show, state=args.state)


def _host(args: argparse.Namespace) -> int:
    def show(data: Any) -> str:
        summary = {k: v for k, v in _host_row(data).items() if not isinstance(v, dict | list)}
        parts = [tables.pairs(summary)]
        if data["health"]:
            parts += ["", "agent health (last heartbeat):", tables.pairs(data["health"])]
        if data["findings"]:
            rows = [{**f, "what": _finding_what(f)} for f in data["findings"]]
            cols = ("seq", "source", "type", "severity", "drift", "what")
            parts += ["", "findings:", tables.render(rows, cols)]
        trail = [{**t, "from": t["from"], "to": t["to"]} for t in data["transitions"]]
        parts += ["", "transitions:", tables.render(trail, ("at", "from", "to", "cause", "actor"))]
        parts += response_cli.host_lines(data)
        return "\n".join(parts)

    return _read(args, f"/v1/hosts/{args.host_id}", show)


def _finding_what(finding: dict[str, Any]) -> str | None:
    """A finding in a few words: its path, a login's user and peer, an integrity reason."""
    detail = finding.get("detail") or {}
    if finding.get("type") == "login":
        peer = f"{detail.get('source_ip')}:{detail.get('source_port')}"
        return f"{detail.get('event')} {detail.get('user')} {detail.get('method')} from {peer}"
    if finding.get("type") == "integrity":
        return str(detail.get("reason"))
    path: str | None = finding.get("path")
    return path


def _events(args: argparse.Namespace) -> int:
    def show(data: Any) -> str:
        rows = [
            {
                **e,
                "what": e.get("kind")
                or f"{e.get('from') or '-'} -> {e.get('to')} ({e.get('cause')})",
            }
            for e in data["events"]
        ]
        return tables.render(rows, ("at", "type", "seq", "what"))

    return _read(args, f"/v1/hosts/{args.host_id}/events", show, limit=args.limit)


def _fleet(args: argparse.Namespace) -> int:
    def show(data: Any) -> str:
        states = {s: n for s, n in data["states"].items() if n}
        parts = [f"hosts: {data['hosts']}", tables.pairs(states)]
        for event in data["fleet_events"]:
            parts.append(f"FLEET EVENT {event['kind']} since {event['opened_at']}")
        if data["images"]:
            parts += ["", tables.render(data["images"], ("build_id", "hosts", "registered"))]
        return "\n".join(parts)

    return _read(args, "/v1/fleet", show)


def _images(args: argparse.Namespace) -> int:
    if args.images_command == "register":
        return _images_register(args)

    def show(data: Any) -> str:
        return tables.render(data["images"], ("build_id", "root", "key_id", "registered_at"))

    return _read(args, "/v1/images", show)


def _images_register(args: argparse.Namespace) -> int:
    from collector.keys import load_public_key

    try:
        statement = wire.read_statement(args.manifest)
        for path in args.pubkey or ():
            wire.verify_statement(statement, load_public_key(path))
    except wire.WireError as exc:
        raise CollectorError(str(exc), path=args.manifest) from exc
    client = _client(args)
    try:
        data = client.post("/v1/images", {"statement": statement})
    finally:
        client.close()
    if args.json:
        _print_json(data)
    else:
        print(tables.lines(f"registered image {data['build_id']} root {data['root']}"))
    return EXIT_OK


def _cohort(args: argparse.Namespace) -> int:
    def show(data: Any) -> str:
        head = f"image {data['build_id']}: {data['hosts']} hosts, {len(data['odd'])} odd"
        rows = [{**o, "paths": ", ".join(o["paths"])} for o in data["odd"]]
        return head + "\n" + tables.render(rows, ("host_id", "state", "root_differs", "paths"))

    return _read(args, f"/v1/images/{args.build_id}/cohort", show)


def _action(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        data = client.post(f"/v1/hosts/{args.host_id}/{args.action}", {"reason": args.reason})
    finally:
        client.close()
    if args.json:
        _print_json(data)
    else:
        print(tables.lines(f"{args.host_id}: {data.get('state')}"))
    return EXIT_OK


# --- parser ----------------------------------------------------------------------------------


def _db_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="collector TOML configuration")
    p.add_argument("--db", help="database URL (overrides [database] url)")


def _api_options(*, nested: bool = False) -> argparse.ArgumentParser:
    """The options of every command that talks to the API. ``nested``: for a command's own
    subcommand (``images register``), whose defaults must not undo what was given before it."""
    api = argparse.ArgumentParser(add_help=False)
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if nested else {}
    api.add_argument(
        "--url", help=f"collector URL (env DRIFTWARDEN_URL; default {DEFAULT_URL})", **unset
    )
    api.add_argument("--token", help="SRE token (env DRIFTWARDEN_TOKEN)", **unset)
    api.add_argument("--json", action="store_true", help="print the API's JSON", **unset)
    return api


def build_parser() -> argparse.ArgumentParser:
    api = _api_options()

    parser = argparse.ArgumentParser(
        prog="driftwarden",
        description="The driftwarden collector and the SRE's view of the fleet.",
        epilog="exit status: 0 success, 2 error, 78 bad configuration",
    )
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the collector (HTTP API, ingest, job workers)")
    _db_options(p)
    p.add_argument("--listen", help="HOST:PORT (overrides [server] listen)")
    p.add_argument(
        "--processes", type=int, help="worker processes, 0 for one per core ([server] processes)"
    )
    p.set_defaults(handler=_serve)

    p = sub.add_parser("check-config", help="validate the configuration and exit")
    _db_options(p)
    p.set_defaults(handler=_check_config)

    p = sub.add_parser("token", help="SRE tokens (on the database directly)")
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tsub.add_parser("create", help="create an SRE token and print it once")
    _db_options(t)
    t.add_argument("--role", required=True, choices=[r.label for r in Role])
    t.add_argument("--name", default="", help="who or what holds it (for the audit trail)")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.set_defaults(handler=_token_create)

    p = sub.add_parser("enroll-token", help="enrollment tokens (on the database directly)")
    esub = p.add_subparsers(dest="enroll_command", required=True, metavar="ACTION")
    e = esub.add_parser("create", help="create an enrollment token and print it once")
    _db_options(e)
    e.add_argument("--note", default="", help="what it is for")
    e.add_argument("--expires-in", type=float, metavar="SECONDS", help="valid for this long")
    e.add_argument("--uses", type=int, help="how many enrollments it allows")
    e.add_argument(
        "--pool", help="the pool of every host it enrolls (a host's own pool fact is ignored)"
    )
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(handler=_enroll_token_create)

    p = sub.add_parser("hosts", parents=[api], help="list hosts")
    p.add_argument("--state", choices=[s.value for s in HostState])
    p.set_defaults(handler=_hosts)

    p = sub.add_parser("host", parents=[api], help="one host: facts, findings, audit trail")
    p.add_argument("host_id", metavar="ID")
    p.set_defaults(handler=_host)

    p = sub.add_parser("events", parents=[api], help="one host's reports and transitions")
    p.add_argument("host_id", metavar="ID")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(handler=_events)

    p = sub.add_parser("fleet", parents=[api], help="fleet summary")
    p.set_defaults(handler=_fleet)

    p = sub.add_parser("images", parents=[api], help="registered images; images register FILE")
    p.set_defaults(handler=_images, images_command=None)
    isub = p.add_subparsers(dest="images_command", metavar="ACTION")
    r = isub.add_parser(
        "register",
        parents=[_api_options(nested=True)],
        help="register a baked manifest's statement",
    )
    r.add_argument("manifest", type=Path, metavar="MANIFEST")
    r.add_argument("--pubkey", type=Path, action="append", help="also verify locally with this key")

    p = sub.add_parser("cohort", parents=[api], help="compare the hosts of one image")
    p.add_argument("build_id", metavar="BUILD_ID")
    p.set_defaults(handler=_cohort)

    for action, text in (
        ("replace", "ask for a host to be replaced"),
        ("retire", "take a host out of the fleet"),
        ("acknowledge", "record that on-call has seen a host's state"),
        ("rekey", "allow a host's next enrollment with a new key"),
    ):
        p = sub.add_parser(action, parents=[api], help=text)
        p.add_argument("host_id", metavar="ID")
        p.add_argument("--reason", required=True)
        p.set_defaults(handler=_action, action=action)
    response_cli.add_commands(sub, api, response_cli.Api(_client, _read, _print_json))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        logs.configure("driftwarden", level=args.log_level)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CollectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception:
        structlog.get_logger().exception("internal_error", command=args.command)
        print("error: internal error (see the log above); please report it", file=sys.stderr)
        return EXIT_ERROR
