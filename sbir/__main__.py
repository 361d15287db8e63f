import sys

from sbir.cli import main

sys.exit(main())
