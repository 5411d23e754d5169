import sys

from editbench.cli import main

sys.exit(main())
