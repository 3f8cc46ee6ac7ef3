"""`firetitan models alias NAME TARGET` / `firetitan models list`: edit and show the model-alias table.

It lives outside `firetitan/models/` because importing anything in that package runs its
`__init__` (torch, transformers): the plugin must stay light to import, so the alias module is
imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json

from firetitan.cli import register_command, state_dir


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", default=None, help="state directory (default $FIRETITAN_HOME or the user cache)")
    sub = parser.add_subparsers(dest="models_command", required=True)
    alias = sub.add_parser("alias", help="map a hosted model or training-shape name to a local model")
    alias.add_argument("name", help="accounts/<a>/models/<id> or accounts/<a>/trainingShapes/<id>")
    alias.add_argument("target", nargs="?", default=None,
                       help="a built-in model (firetitan/tiny-qwen3) or a local Hugging Face directory; "
                            "for a shape name, the model whose local shape it uses")
    alias.add_argument("--remove", action="store_true", help="drop the alias of NAME")
    listing = sub.add_parser("list", help="built-in models and every alias")
    listing.add_argument("--json", action="store_true", help="print one JSON object")


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from firetitan.errors import FiretitanError
    from firetitan.models.aliases import alias_kind, list_aliases, remove_alias, set_alias
    from firetitan.models.registry import BUILTIN_MODELS

    home = Path(args.home).expanduser() if args.home else state_dir()
    try:
        if args.models_command == "alias":
            if args.remove:
                found = remove_alias(home, args.name)
                print(f"removed {args.name}" if found else f"no alias for {args.name}")
                return 0 if found else 1
            if args.target is None:
                print("error: TARGET is required (or --remove)")
                return 2
            kind = alias_kind(args.name)
            stored = set_alias(home, args.name, args.target)
            what = "model" if kind == "model" else "training shape (uses the local shape of)"
            print(f"{args.name} -> {stored}  [{what}]")
            return 0
        aliases = list_aliases(home)
        if args.json:
            print(json.dumps({"builtin": sorted(BUILTIN_MODELS), "aliases": aliases}))
            return 0
        print("built-in models:")
        for name, model in BUILTIN_MODELS.items():
            print(f"  {name}  {model.description}")
        print(f"aliases ({home / 'model_aliases.json'}):" if aliases else "aliases: none")
        for name, target in aliases.items():
            print(f"  {name} -> {target}")
        return 0
    except FiretitanError as exc:
        print(f"error: {exc.message}")
        return 2


register_command("models", "built-in models and the alias table for hosted names (alias, list)", _add_args, _run)
