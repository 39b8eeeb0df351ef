"""``python -m nemo_opdlm ...``: the same command line as ``opdlm ...`` (for environments without the
console script, e.g. a checkout on PYTHONPATH inside a container)."""

import sys

from nemo_opdlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
