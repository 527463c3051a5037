import sys

from drivers.cli import main

sys.exit(main())
