"""Compare strategies side by side on the same users and seeds: see fedpeft/study/compare.py."""

import sys

from fedpeft.study.compare import main

if __name__ == "__main__":
    sys.exit(main())
