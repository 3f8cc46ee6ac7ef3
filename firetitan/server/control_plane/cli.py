"""`firetitan serve`: the control plane in the foreground (`firetitan status` is in `firetitan.status_cli`)."""

from __future__ import annotations

import argparse
import asyncio

from firetitan.cli import register_command


def _serve_args(parser: argparse.ArgumentParser) -> None:
    from firetitan.server.control_plane.__main__ import add_server_args

    parser.add_argument("--host", default="127.0.0.1", help="bind address; off loopback an API key is required")
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument("--api-key", default=None, help="required off loopback (or $FIRETITAN_API_KEY)")
    add_server_args(parser)


def _serve(args: argparse.Namespace) -> int:
    from firetitan.errors import ConfigError
    from firetitan.server.control_plane.__main__ import settings_from_args
    from firetitan.server.control_plane.home import resolve_home
    from firetitan.server.control_plane.server import resolve_api_key, run_server

    layout = resolve_home(args.home).ensure()
    try:
        api_key = resolve_api_key(layout, args.host, args.api_key)
        print(f"firetitan control plane for {layout.root} on http://{args.host}:{args.port} "
              f"(API key in {layout.api_key_file if not args.api_key else 'the --api-key flag'})", flush=True)
        asyncio.run(run_server(layout, settings_from_args(args), host=args.host, port=args.port, api_key=api_key))
    except ConfigError as exc:
        print(f"error: {exc.message}")
        return int(getattr(exc, "exit_code", 2))
    return 0


register_command("serve", "run the control plane in the foreground", _serve_args, _serve)
