"""Helpers for tests that run real QEMU VMs (host-install)."""
