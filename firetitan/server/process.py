"""Re-exports `firetitan.process` (spawning and stopping worker processes), which client and server share."""

from firetitan.process import *  # noqa: F403  (every public name, whatever the neutral module adds)
