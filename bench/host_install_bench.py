"""host-install timings: store, journal, checks, and real QEMU boots. Prints a table.

Run: .venv/bin/python bench/host_install_bench.py   (needs ../shared/firmware; QEMU optional)
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from host_install import qemu  # noqa: E402
from host_install.install import install  # noqa: E402
from host_install.journal import Journal  # noqa: E402
from host_install.store import Store, switch_link  # noqa: E402
from host_install.vm import VmDir  # noqa: E402
from verifier.firmware.addon import build_addon  # noqa: E402

FIRMWARE = Path(os.environ.get("FIRMGATE_SHARED", REPO.parent / "shared")) / "firmware"
FW = {"2025.02": "edk2-2025.02-OVMF.fd", "2026.08": "edk2-2026.08-OVMF.amdsev.fd"}


def timed(fn: Callable[[], object], n: int) -> tuple[float, float]:
    runs = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t) * 1000)
    return statistics.median(runs), max(runs)


def main() -> None:
    rows: list[tuple[str, int, float, float]] = []
    images = {k: (FIRMWARE / v).read_bytes() for k, v in FW.items()}
    with tempfile.TemporaryDirectory(prefix="fg-bench-") as d:
        root = Path(d)
        n = 0

        def put() -> None:
            nonlocal n
            n += 1
            Store(root / f"s{n}").put(images["2026.08"])
        rows.append(("store.put 4 MiB (tmp+fsync+rename+dir fsync)", 10, *timed(put, 10)))
        store = Store(root / "s1")
        digest = store.put(images["2026.08"])
        rows.append(("switch_link (symlink+rename+dir fsync)", 50,
                     *timed(lambda: switch_link(root / "firmware", digest), 50)))
        j = Journal(root / "journal.jsonl")
        rows.append(("journal.append (fsync, chained)", 100,
                     *timed(lambda: j.append("stored", "t", digest=digest), 100)))
        addon = build_addon([("edk2-2026.08", images["2026.08"])])
        k = 0

        def no_launch() -> None:
            nonlocal k
            k += 1
            vm = VmDir.create(root / f"vm{k}", snp=True)
            install(vm, addon, launch=False)
        rows.append(("install --no-launch (parse+checks+store+switch)", 5, *timed(no_launch, 5)))
        if shutil.which("qemu-system-x86_64"):
            accel = "kvm" if qemu.probe_kvm(FIRMWARE / FW["2025.02"], root / "probe") else "tcg"
            for name, data in images.items():
                vm = VmDir.create(root / f"boot-{name}", accel=accel, memory_mib=256, snp=True,
                                  launch_mode="plain", stop_timeout=0.5, boot_timeout=120)
                install(vm, build_addon([(name, data)]), launch=False)

                def boot() -> None:
                    qemu.launch(vm)
                    check = qemu.confirm_boot(vm)
                    assert check.ok, check.reason
                    qemu.stop(vm, graceful=False)
                med, mx = timed(boot, 3)
                rows.append((f"launch + confirm boot {name} ({accel}, 256 MiB)", 3, med, mx))
    w = max(len(r[0]) for r in rows)
    print(f"{'operation':<{w}}  {'runs':>4}  {'median ms':>10}  {'max ms':>10}")
    for name, runs, med, mx in rows:
        print(f"{name:<{w}}  {runs:>4}  {med:>10.1f}  {mx:>10.1f}")


if __name__ == "__main__":
    main()
