import sys

from indextts_api.cli import main

sys.exit(main())
