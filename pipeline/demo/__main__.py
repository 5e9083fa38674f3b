"""``python -m pipeline.demo``: the CPU demo (see :mod:`pipeline.demo.run`)."""

import sys

from pipeline.demo.run import main

sys.exit(main())
