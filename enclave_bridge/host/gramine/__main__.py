import sys

from enclave_bridge.gramine import main

sys.exit(main())
