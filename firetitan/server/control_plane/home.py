"""Re-exports `firetitan.home` (the state directory's layout), which client and server share."""

from firetitan.home import (  # noqa: F401
    HOME_ENV,
    HomeLayout,
    control_plane_lock_held,
    flock_exclusive,
    load_or_create_api_key,
    read_api_key,
    read_discovery,
    remove_discovery,
    resolve_home,
    running_control_plane,
    write_discovery,
)
