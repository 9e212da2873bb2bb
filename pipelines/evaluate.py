"""``python pipelines/evaluate.py ...``: the same as ``himatch-med evaluate ...`` (:mod:`himatch_med.evaluate`)."""

import sys

from himatch_med.evaluate import SEVERAL, main, parser  # noqa: F401 (the script's names, as before the move)

if __name__ == "__main__":
    sys.exit(main())
