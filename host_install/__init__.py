"""host-install: install guest-supplied firmware into a VM ROM and relaunch it, never bricking it.

Public API (docs/host.md):
    host_install.vm.VmDir.create(path, **config) / VmDir.open(path)
    host_install.install.install(vm_dir, addon_bytes, fwid=None, *, launch=True) -> InstallResult
    host_install.install.plan / rollback / recover / status / current_firmware
    host_install.channel.request_update(socket_path, addon_bytes, fwid=None) -> dict
"""
