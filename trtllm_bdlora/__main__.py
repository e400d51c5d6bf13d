import sys

from trtllm_bdlora.cli import main

sys.exit(main())
