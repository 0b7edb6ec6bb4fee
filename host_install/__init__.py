"""host-install: install guest-supplied firmware into a VM ROM and relaunch it, never bricking it."""
