"""Re-exports `firetitan.home` (the state directory's layout), which client and server share."""

from firetitan.home import *  # noqa: F403  (every public name, whatever the neutral module adds)
