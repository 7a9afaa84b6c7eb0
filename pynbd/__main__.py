import sys

from pynbd.cli import main

sys.exit(main())
