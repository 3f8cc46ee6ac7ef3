"""`python -m firetitan` runs the CLI."""

from firetitan.cli import main

raise SystemExit(main())
