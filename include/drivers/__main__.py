import sys

from drivers.ops.cli import main

sys.exit(main())
