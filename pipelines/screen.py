"""``python pipelines/screen.py ...``: the same as ``himatch-med screen ...`` (:mod:`himatch_med.screen`)."""

import sys

from himatch_med.screen import main, parser  # noqa: F401 (the script's names, as before the move)

if __name__ == "__main__":
    sys.exit(main())
