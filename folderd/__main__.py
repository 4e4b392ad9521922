import sys

from folderd.cli import main

sys.exit(main())
