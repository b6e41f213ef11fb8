import sys

from swinx.cli import main

sys.exit(main())
