import sys

from scoredistill.cli.main import main

sys.exit(main())
