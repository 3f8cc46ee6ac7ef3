"""A worker that loads forever: it never writes its ready file (the abort-start regression test)."""

import time

if __name__ == "__main__":
    time.sleep(600)
