import sys

from enclave_bridge.host.gramine import main

sys.exit(main())
