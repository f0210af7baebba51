"""The ``qpc`` command line (and ``qpc-server``, which is ``qpc run``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from qpc_core import __version__
from qpc_core.errors import ConfigError, PluginError, QpcError
from qpc_core.plan import add_arguments as add_plan_arguments
from qpc_core.storecli import add_arguments as add_store_arguments

MAX_CERT_DAYS = 36500  # 100 years


def _cert_days(raw: str) -> int:
    try:
        days = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of days, got {raw!r}") from None
    if not 1 <= days <= MAX_CERT_DAYS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_CERT_DAYS}, got {days}")
    return days


def _add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="qpc-server.toml (default: ./qpc-server.toml)")
    p.add_argument("--plugins", help="comma-separated plugins to load, in order (no:NAME blocks)")
    p.add_argument("--listen", help="QUIC listen address HOST:PORT (default 0.0.0.0:7000)")
    p.add_argument("--data-dir", type=Path, help="data directory (default ./data)")
    p.add_argument("--metrics-listen", help="admin/metrics HTTP address HOST:PORT")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--audit-log", action="store_true", default=None,
                   help="log one line per RPC on logger qpc.audit (config: audit_log)")
    p.add_argument("--redact-logs", action=argparse.BooleanOptionalAction, default=None,
                   help="audit lines show keyed hashes of identities and IPs (default: on)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "listen": args.listen,
        "data_dir": args.data_dir,
        "metrics_listen": args.metrics_listen,
        "log_level": args.log_level,
        "audit_log": args.audit_log,
        "redact_logs": args.redact_logs,
    }
    if args.plugins is not None:
        out["plugins"] = [p.strip() for p in args.plugins.split(",") if p.strip()]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpc", description="qpc messaging server")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the server")
    _add_server_options(run)
    pl = sub.add_parser("plugins", help="list built-in and installed plugins")
    pl.add_argument("--json", action="store_true")
    cc = sub.add_parser("check-config", help="validate configuration and plugins, then exit")
    _add_server_options(cc)
    gc = sub.add_parser("gen-cert", help="write a development certificate and its CA")
    gc.add_argument("--out", type=Path, default=Path("data"),
                    help="directory to write the files into (default: data)")
    gc.add_argument("--hostname", action="append", default=None)
    gc.add_argument("--days", type=_cert_days, default=365,
                    help=f"validity in days, 1 to {MAX_CERT_DAYS} (default: 365)")
    gc.add_argument("--force", action="store_true",
                    help="replace an existing certificate, key and CA in --out")
    sub.add_parser("version", help="print the version")
    plan = sub.add_parser("plan", help="capacity planning worksheet (scaling guide)")
    add_plan_arguments(plan)
    store = sub.add_parser(
        "store", help="copy the whole store to another backend (e.g. to PostgreSQL), or count it"
    )
    add_store_arguments(store, _add_server_options)
    return parser


def _setup_logging(level: str) -> None:
    from qpc_core.config import apply_log_level

    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aioquic logs every connection's negotiation at INFO: too chatty for operators.
    apply_log_level(level)


def _make_app(args: argparse.Namespace) -> Any:
    from qpc_core.app import App
    from qpc_core.config import DEFAULT_CONFIG_FILE, load_config

    overrides = _overrides(args)
    settings = load_config(args.config, overrides)
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise ConfigError(f"config: data_dir: {settings.data_dir} exists and is not a directory")
    _setup_logging(settings.log_level)
    app = App(settings)
    # SIGHUP reads the same sources again: the file, the environment, these flags.  The
    # file is the one read now (./qpc-server.toml when no --config): if it is gone at the
    # reload, that is an error, not "no file" (which would put every default back).
    source = args.config
    if source is None and Path(DEFAULT_CONFIG_FILE).is_file():
        source = Path(DEFAULT_CONFIG_FILE)
    if source is not None:
        source = Path(source).absolute()  # not resolve(): a symlink is followed at each read
    app.config_source = lambda: load_config(source, overrides)
    return app


def cmd_run(args: argparse.Namespace) -> int:
    app = _make_app(args)
    if app.settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError(
                "config: event_loop: 'uvloop' is not installed (pip install 'qpc-core[fast]')"
            ) from None
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(app.serve_forever())
        return int(app.exit_code)
    asyncio.run(app.serve_forever())
    return int(app.exit_code)


def cmd_check_config(args: argparse.Namespace) -> int:
    app = _make_app(args)
    s = app.settings
    tls_line = "tls: development certificate (generated in the data dir on first start)"
    if s.tls_cert is not None and s.tls_key is not None:
        from qpc_core.transport.certs import resolve_tls

        # The same checks `qpc run` makes (format, key pair, chain order, expiry), so a
        # renewed certificate can be checked before the restart.
        tls = resolve_tls(s.data_dir, s.tls_cert, s.tls_key, production=s.production)
        tls_line = (
            f"tls: {tls.certificate.subject.rfc4514_string()} valid until "
            f"{tls.certificate.not_valid_after_utc:%Y-%m-%d}, key matches, "
            f"{len(tls.chain)} intermediate(s) sent"
        )
    checked = app.hooks.check_config(app)
    print(f"config OK: {len(app.plugins)} plugins, {len(app.methods)} RPC methods")
    print(tls_line)
    for _plugin, line in checked:
        print(line)
    for p in app.plugins:
        print(f"  {p.order:2d} {p.name:<12} {p.distribution} {p.version}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from qpc_core.plugins import describe_installed

    rows = describe_installed()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'order':>5}  {'name':<14} {'distribution':<20} {'version':<8} hooks")
    for r in rows:
        print(f"{r['order']:>5}  {r['name']:<14} {r['distribution']:<20} {r['version']:<8} "
              f"{', '.join(r['hooks'])}")
    return 0


def cmd_gen_cert(args: argparse.Namespace) -> int:
    from qpc_core.transport import certs

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    names = (certs.DEV_CERT_DER, certs.DEV_KEY_DER, certs.DEV_CERT_PEM, certs.DEV_KEY_PEM,
             certs.DEV_CA_PEM, certs.DEV_CA_DER)
    existing = [n for n in names if os.path.lexists(out / n)]
    if existing and not args.force:
        raise ConfigError(
            f"--out: {out} already holds {', '.join(existing)}: refusing to replace a "
            "server key and certificate (clients trusting the current CA would stop "
            "connecting); pass --force to replace them, or choose another --out"
        )
    hosts = tuple(args.hostname or ["localhost"])
    cert, key = certs.generate_self_signed(out, hostnames=hosts, days=args.days)
    print(f"wrote {cert} and {key} (+ .pem copies), issued by the development CA in "
          f"{out / certs.DEV_CA_PEM} (what clients trust)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from qpc_core.plan import run

    return run(args)


def cmd_store(args: argparse.Namespace) -> int:
    from qpc_core.storecli import run

    return run(args)


COMMANDS = {
    "run": cmd_run,
    "check-config": cmd_check_config,
    "plugins": cmd_plugins,
    "gen-cert": cmd_gen_cert,
    "plan": cmd_plan,
    "store": cmd_store,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"qpc {__version__}")
        return 0
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, PluginError) as e:
        print(f"qpc: error: {e}", file=sys.stderr)
        return 1
    except QpcError as e:
        print(f"qpc: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a data directory or file that cannot be created or written
        logging.getLogger("qpc").debug("%s failed", args.command, exc_info=True)
        print(f"qpc: error: {_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover
        return 130


def _os_error(e: OSError) -> str:
    """``path: reason`` rather than ``[Errno 17] File exists: 'path'``."""
    if e.strerror and e.filename is not None:
        where = str(e.filename) if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        return f"{where}: {e.strerror}"
    return str(e) or type(e).__name__


def server_main() -> None:
    """``qpc-server [options]`` is ``qpc run [options]``."""
    sys.exit(main(["run", *sys.argv[1:]]))


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
