"""``python -m analysis.quality score ...``: the scoring CLI of analysis/quality/scoring.py."""

import sys

from analysis.quality.scoring import main

sys.exit(main())
