import sys

from visrec.cli import main

sys.exit(main())
