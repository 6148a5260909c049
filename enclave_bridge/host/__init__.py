"""Party-side code that talks to enclaves from outside: the daemon's enclave client, owner tooling
and the Gramine manifest renderer. Not measured; the enclave never imports it."""
