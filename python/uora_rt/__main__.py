import sys

from uora_rt.cli import main

sys.exit(main())
