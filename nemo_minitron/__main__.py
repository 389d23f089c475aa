"""``python -m nemo_minitron``."""

import sys

from nemo_minitron.cli import main

if __name__ == "__main__":
    sys.exit(main())
