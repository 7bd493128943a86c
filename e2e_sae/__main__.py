import sys

from e2e_sae.cli import main

sys.exit(main())
