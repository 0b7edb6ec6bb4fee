"""`firmgate demo`: the whole flow on one machine, with real parts wherever this machine has them.

Real: the OVMF image (Debian's, or --firmware), the UKI add-ons, host-install
with its journal and (when qemu-system-x86_64 exists) a real QEMU boot of each
firmware, the policy repo (git) and `firmgate policy check`, the broker over
HTTP on loopback with SQLite, the guest client's KBS exchange and JWE
decryption. Simulated, and said so: the SEV-SNP hardware (sim.host signs
reports with a simulated chain whose root the broker trusts by --trust-root).

The story (docs/demo.md explains each step):
  1 guest's v1 add-on -> host-install    2 attest -> secret released
  3 an unlisted firmware -> denied       4 a replayed nonce -> denied
  5 owner commits v2 + min_svn 2         6 guest asks for v2 -> released
  7 a second tenant's VM, same v2 firmware and shape, asks for the key -> denied by name
    (id_block.trusted_key), and the owner's own signed launch -> released
  8 guest asks for v1 again -> denied (svn below the minimum)
Every launch of the owner's VM carries the owner's ID block (`firmgate idblock sign`, picked by
host-install, checked by the simulated PSP): the policy releases only to the owner's own launch.
Exit 0 only if every step did what it should.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from verifier.errors import FirmgateError, UsageError

TENANT = "demo"
OTHER = "neighbour"         # a second tenant on the same host, running the same firmware
RESOURCE = f"{TENANT}/key/disk"
SECRET = b"demo disk key: 3f1c9a (released only to firmware the owner allows)\n"
FIRMWARE_CANDIDATES = ("/usr/share/ovmf/OVMF.fd", "/usr/share/qemu/OVMF.fd", "/usr/share/edk2/ovmf/OVMF.fd",
                       "/usr/share/OVMF/OVMF.fd", "/usr/share/edk2/x64/OVMF.fd")
PAGE = 4096
QEMU = "qemu-system-x86_64"


@dataclass
class Step:
    n: int
    title: str
    expect: str                    # what must happen: "installed", "released", "denied", "committed"
    outcome: str = "not run"       # what happened
    ok: bool = False
    detail: str = ""
    seconds: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)


class Story:
    def __init__(self, quiet: bool) -> None:
        self.steps: list[Step] = []
        self.quiet = quiet
        self.notes: list[str] = []

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text, flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.say(f"   note: {text}")

    def step(self, title: str, expect: str, fn: Callable[[Step], None]) -> Step:
        st = Step(len(self.steps) + 1, title, expect)
        self.steps.append(st)
        self.say(f"\n[{st.n}] {title}  (expect: {expect})")
        t0 = time.monotonic()
        try:
            fn(st)
        except FirmgateError as exc:
            st.outcome, st.detail = "error", exc.diagnostics()
        except Exception as exc:  # noqa: BLE001 - a broken part must show as a failed step, not a traceback
            st.outcome, st.detail = "error", f"{type(exc).__name__}: {exc}"
        st.seconds = time.monotonic() - t0
        st.ok = st.outcome == st.expect
        self.say(f"    -> {st.outcome.upper()}{': ' + st.detail if st.detail else ''}")
        if not st.ok:
            self.say(f"    !! expected {st.expect}, got {st.outcome}")
        return st


# -- firmware ----------------------------------------------------------------------------
def find_firmware(explicit: str | None) -> Path:
    from verifier.firmware.image import require_snp_firmware
    cands = [explicit] if explicit else list(FIRMWARE_CANDIDATES)
    why: list[str] = []
    for c in cands:
        p = Path(c)
        if not p.is_file():
            why.append(f"{c}: not found")
            continue
        try:
            require_snp_firmware(p.read_bytes())
            return p
        except FirmgateError as exc:
            why.append(f"{c}: {exc.diagnostics()}")
    raise UsageError("no OVMF image with SEV metadata found (" + "; ".join(why) +
                     "); install Debian's `ovmf` package or pass --firmware FILE")


def padding_page(image: bytes) -> int:
    """Offset of the last all-0xFF 4 KiB page in the first half of the image (OVMF's NVRAM / fault-tolerant
    -write spare area: never executed from a -bios ROM, outside the SEV metadata and the reset vector)."""
    half = len(image) // 2
    for off in range(half - PAGE, PAGE - 1, -PAGE):
        if image[off:off + PAGE] == b"\xff" * PAGE:
            return off
    raise UsageError("the firmware has no all-0xFF 4 KiB page in its first half to derive a second image from")


def derive(image: bytes, marker: bytes) -> bytes:
    """A second, valid image: `image` with `marker` written at the end of its last padding page.
    Same code, same SEV metadata, so it boots the same; the page hash differs, so MEASUREMENT differs."""
    off = padding_page(image)
    out = bytearray(image)
    out[off + PAGE - len(marker):off + PAGE] = marker
    return bytes(out)


# -- broker ------------------------------------------------------------------------------
class LoopbackBroker:
    """The real broker app (broker.create_app) on a real HTTP server on 127.0.0.1, in a thread."""

    def __init__(self, config: dict[str, Any]) -> None:
        from werkzeug.serving import make_server

        from broker import create_app
        self.app = create_app(config)
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="demo-broker", daemon=True)

    def __enter__(self) -> LoopbackBroker:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.thread.join(5)


def _cli(argv: list[str]) -> tuple[int, str]:
    """Run a `firmgate` sub-command in-process (as an operator would on the shell); (exit code, output)."""
    from verifier.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return code, out.getvalue().strip()


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="demo owner", GIT_AUTHOR_EMAIL="owner@demo.invalid",
               GIT_COMMITTER_NAME="demo owner", GIT_COMMITTER_EMAIL="owner@demo.invalid")
    try:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"the demo keeps the owner's policy in git, and git failed to run: {exc}") from exc
    if r.returncode != 0:
        raise UsageError(f"git {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout.strip()


# The demo VM boots its firmware and no disk; a real owner writes why ITS build pins what it boots.
DEMO_BOOT_CHAIN = "demo: stands for an owner build that boots only the owner's signed code"


# The owner trusts one firmware publisher: its endorsed builds need no policy commit (docs/endorsements.md).
PUBLISHERS = f'''[[firmware.publishers]]
name = "demo-publisher"
key = "publishers/demo-publisher.pem"   # the publisher's public key, committed by the owner
fwid = "ovmf-demo-*"
min_svn = 3
revocations = "publishers/demo-publisher.revoked"   # the publisher's signed revocation list
enforces_boot_chain = "{DEMO_BOOT_CHAIN}"
'''


def policy_text(v1: tuple[str, str], v2: tuple[str, str] | None, vcpus: int, vcpu_type: str,
                author_key: str = "", *, tenant: str = TENANT, v2_bytes: str = "uploaded",
                publishers: str = "") -> str:
    """The owner's policy: v1 (bytes in the repo); with v2, v2 (bytes from the guest's add-on) + min_svn 2.
    Bound form (docs/policy.md, "Release binding"): the firmware pins its boot chain, and only launches
    signed with the owner's author key (`author_key`: its SHA-384 digest) name this owner."""
    fw = [f'''[[firmware.allowed]]
id = "{v1[0]}"
sha384 = "{v1[1]}"
svn = 1
bytes = "firmware/v1.efi"          # the add-on the owner committed beside this file
enforces_boot_chain = "{DEMO_BOOT_CHAIN}"
''']
    if v2 is not None:
        fw.append(f'''[[firmware.allowed]]
id = "{v2[0]}"
sha384 = "{v2[1]}"
svn = 2
bytes = "{v2_bytes}"                 # "uploaded": the owner lists the digest; the guest brings the bytes
enforces_boot_chain = "{DEMO_BOOT_CHAIN}"
''')
    secret = RESOURCE if tenant == TENANT else f"{tenant}/key/disk"
    return f'''# Tenant "{tenant}" for `firmgate demo`. It trusts a SIMULATED SEV-SNP platform
# (--trust-root, not AMD): the flow is real, the hardware is not.
version = 1
description = "firmgate demo tenant {tenant}"

[firmware]
min_svn = {2 if v2 else 1}

{chr(10).join(fw)}
{publishers}
[[shapes]]
vmm = "qemu"
vcpus = [{vcpus}]
vcpu_types = ["{vcpu_type}"]
guest_features = 0x1

[platform]
products = ["Milan"]
signers = ["VCEK"]
vmpls = [0]
allow_simulated_platform = true

[guest]
unsafe_allow_debug = false

[id_block]                         # the launch names its owner: the owner's author key signed its ID block
trusted_author_keys = ["{author_key}"]

[[secrets]]
path = "{secret}"
'''


# -- the demo ------------------------------------------------------------------------------
@contextlib.contextmanager
def _workspace(path: str | None) -> Iterator[Path]:
    if path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        if any(p.iterdir()):
            raise UsageError(f"--workdir {p} is not empty")
        yield p.absolute()
    else:
        # Short path: unix sockets under the VM directory must fit sun_path.
        d = tempfile.mkdtemp(prefix="fgdemo-", dir="/tmp" if os.path.isdir("/tmp") else None)
        try:
            yield Path(d)
        finally:
            shutil.rmtree(d, ignore_errors=True)


def run_demo(firmware: str | None = None, workdir: str | None = None, *, quiet: bool = False,
             use_qemu: bool | None = None, real_guest: bool | None = None) -> dict[str, Any]:
    from host_install import qemu
    from host_install.vm import VmDir
    from verifier.firmware.addon import build_addon

    from .host import SimSnpHost
    from .platform import SimPlatform

    t_start = time.monotonic()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log in the story
    story = Story(quiet)
    fw_path = find_firmware(firmware)
    base = fw_path.read_bytes()
    have_qemu = shutil.which(QEMU) is not None if use_qemu is None else use_qemu
    with _workspace(workdir) as ws:
        story.say("firmgate demo: a VM brings its own firmware, attests, and gets its key\n")
        story.say(f"workspace      {ws}")
        story.say(f"firmware v1    {fw_path} ({len(base) // 1024} KiB, sha384 {hashlib.sha384(base).hexdigest()[:16]}…)")
        v1_img = base
        v2_img = derive(base, b"firmgate-demo-v2")
        bad_img = derive(base, b"tampered-by-host")
        fwids = {"v1": "ovmf-demo-v1", "v2": "ovmf-demo-v2", "bad": "ovmf-unlisted"}
        story.say(f"firmware v2    v1 with 16 bytes changed at {padding_page(base) + PAGE - 16:#x} (padding page; "
                  "same code and SEV metadata, different MEASUREMENT)")
        story.say("unlisted       v1 with other 16 bytes there (an image the owner never listed)")
        addons = {k: build_addon([(fwids[k], img)]) for k, img in (("v1", v1_img), ("v2", v2_img), ("bad", bad_img))}
        digests = {k: hashlib.sha384(img).hexdigest() for k, img in (("v1", v1_img), ("v2", v2_img), ("bad", bad_img))}
        for k, blob in addons.items():
            (ws / f"{fwids[k]}.efi").write_bytes(blob)
        publisher = _publisher_builds(ws, base, addons, digests, fwids)
        story.say("publisher      demo-publisher (P-384 key); builds v3 (svn 3, endorsed), v3 signed by another "
                  "key, and a build the publisher revoked")

        # The simulated platform and its root (the broker trusts it only because we say so).
        platform = SimPlatform("Milan", "VCEK")
        root = ws / "sim-ark.pem"
        root.write_bytes(platform.root_pem())
        story.say("platform       SIMULATED SEV-SNP (Milan, VCEK); its root is passed to the broker as --trust-root")

        # The owner's policy repo (git), checked like CI would.
        repo = ws / "policy-repo"
        (repo / "firmware").mkdir(parents=True)
        _git(repo, "init", "-q", "-b", "main")
        (repo / "firmware" / "v1.efi").write_bytes(addons["v1"])
        (repo / "publishers").mkdir()
        (repo / "publishers" / "demo-publisher.pem").write_bytes(publisher["public_pem"])
        (repo / "publishers" / "demo-publisher.revoked").write_bytes(publisher["revocations"])
        vm_vcpus, vcpu_type = 1, "EPYC-v4"
        # Each tenant's owner keeps its ID and author keys (P-384) outside the policy repo.
        owners = {t: _owner_keys(ws / "owner-keys" / t, t) for t in (TENANT, OTHER)}
        pol = repo / f"{TENANT}.toml"
        pol.write_text(policy_text((fwids["v1"], digests["v1"]), None, vm_vcpus, vcpu_type, owners[TENANT][2],
                                   publishers=PUBLISHERS))
        # A second tenant runs the very same firmware builds in the same shape, with its own key.
        (repo / "firmware" / "other-v2.efi").write_bytes(addons["v2"])
        (repo / f"{OTHER}.toml").write_text(policy_text(
            (fwids["v1"], digests["v1"]), (fwids["v2"], digests["v2"]), vm_vcpus, vcpu_type, owners[OTHER][2],
            tenant=OTHER, v2_bytes="firmware/other-v2.efi"))
        code, out = _cli(["policy", "check", str(repo)])
        if code != 0:
            raise UsageError(f"the demo's own policies do not pass `firmgate policy check`: {out}")
        for t in (TENANT, OTHER):   # each owner signs an ID block per (firmware x shape) of its table
            _sign_id_blocks(repo / f"{t}.toml", owners[t])
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", "demo: allow v1; signed ID blocks")
        story.say(f"policy repo    {repo} (git, commit {_git(repo, 'rev-parse', '--short', 'HEAD')}; "
                  "`firmgate policy check` passed)")

        # The broker: its DB, master key, tenant and secret, set up with the operator's commands.
        db = f"sqlite:///{ws / 'broker.db'}"
        mkey = ws / "master.key"
        fd = os.open(mkey, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(os.urandom(32).hex())
        for argv in (["tenant", "add", TENANT], ["secret", "put", RESOURCE, "--value", SECRET.decode()],
                     ["tenant", "add", OTHER], ["secret", "put", f"{OTHER}/key/disk", "--value", "other's key"]):
            code, out = _cli([*argv, "--db", db, "--master-key-file", str(mkey)])
            if code != 0:
                raise UsageError(f"`firmgate {' '.join(argv[:2])}` failed: {out}")

        # The VM directory host-install manages (plain x86 launch of an SNP-shaped image; see docs/demo.md).
        vm_cfg: dict[str, Any] = dict(snp=True, launch_mode="plain", vcpus=vm_vcpus, memory_mib=128, stop_timeout=0.2)
        if have_qemu:
            accel = "kvm" if qemu.probe_kvm(fw_path, ws / "kvm-probe") else "tcg"
            vm_cfg.update(qemu=QEMU, accel=accel, boot_timeout=8.0 if accel == "kvm" else 30.0)
            story.say(f"vm             {ws / 'vm'} (QEMU, accel {accel}: each install really boots the firmware)")
        else:
            story.say(f"vm             {ws / 'vm'} (no {QEMU}: installs run WITHOUT booting; QEMU steps skipped)")
            story.note(f"{QEMU} not found: firmware boots were skipped")
        guest_vm = None
        if have_qemu and real_guest is not False:
            from guest import image as guest_image

            from .guest_vm import RealGuestVm, vm_config
            img = guest_image.load()
            if img is None and real_guest:
                raise UsageError("no guest image: run `make guest-image` first")
            if img is not None:
                vm_cfg.update(vm_config(img, vm_cfg["accel"]))
                story.say(f"guest          REAL: Debian's kernel {img.manifest.get('kernel_version')} + firmgate's "
                          "initramfs in the VM; its add-on is on its ESP and it asks over virtio-serial "
                          "(org.firmgate.update) at every boot")
        if "kernel" not in vm_cfg:
            story.say("guest          host-side client on the update channel (no guest image or no QEMU: "
                      "`make guest-image`)")
        # host-install hands the owner's signed ID block for the firmware in force to the launch
        vm_cfg.update(id_blocks="owner.idblocks.json")
        vm = VmDir.create(ws / "vm", **vm_cfg)
        shutil.copyfile(repo / f"{TENANT}.idblocks.json", vm.rel("owner.idblocks.json"))
        if "kernel" in vm_cfg:
            guest_vm = RealGuestVm(vm, img)  # type: ignore[arg-type]  # img is set when kernel is
        host = SimSnpHost(vm, platform, vcpu_type=vcpu_type)
        # The second tenant's VM on the same host: same v2 firmware, same shape, its owner's ID block.
        other_vm = VmDir.create(ws / "vm-other", snp=True, launch_mode="plain", vcpus=vm_vcpus, memory_mib=128,
                                id_blocks="owner.idblocks.json")
        shutil.copyfile(repo / f"{OTHER}.idblocks.json", other_vm.rel("owner.idblocks.json"))
        from host_install.install import install as _install
        _install(other_vm, addons["v2"], launch=False)
        other_host = SimSnpHost(other_vm, platform, vcpu_type=vcpu_type)

        broker_cfg = {"POLICIES_DIR": str(repo), "DATABASE_URL": db, "TRUST_ROOT_PEM": str(root),
                      "MASTER_KEY_FILE": str(mkey), "MEASURE_CACHE": str(ws / "measure-cache")}
        try:
            with LoopbackBroker(broker_cfg) as broker:
                story.say(f"broker         {broker.url} (the `firmgate serve` broker app, SQLite, trusting the simulated root)")
                with UpdateChannel(vm, launch=have_qemu) as channel:
                    story.say(f"update channel {channel.path} (host-install listen; the guest's requests arrive here)")
                    _story(story, broker.url, vm, host, addons, digests, fwids, repo, pol, have_qemu,
                           vm_vcpus, vcpu_type, owners[TENANT], other_host, ws, guest_vm)
        finally:
            if have_qemu:
                with contextlib.suppress(Exception):
                    qemu.stop(vm, timeout=1.0)
        elapsed = time.monotonic() - t_start
        result = {
            "ok": all(s.ok for s in story.steps) and len(story.steps) == 11,
            "seconds": round(elapsed, 1),
            "firmware": str(fw_path),
            "qemu": have_qemu,
            "real_guest": guest_vm is not None,
            "simulated_platform": True,
            "notes": story.notes,
            "steps": [asdict(s) for s in story.steps],
        }
        _summary(story, result)
        return result


class UpdateChannel:
    """`host-install listen` for the VM, in a thread: the guest's update requests arrive on <vm>/channel.sock."""

    def __init__(self, vm: Any, *, launch: bool) -> None:
        from host_install.channel import Listener
        self.listener = Listener(vm, launch=launch)
        self.path = self.listener.path
        self.thread = threading.Thread(target=self._serve, name="demo-update-channel", daemon=True)

    def _serve(self) -> None:
        self.listener.serve()  # as `host-install listen` does: every connection served; returns once closed

    def __enter__(self) -> UpdateChannel:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.listener.close()
        self.thread.join(5)


def _owner_keys(d: Path, label: str) -> tuple[Path, Path, str]:
    """(ID key PEM, author key PEM, author key digest hex) of a tenant's owner, written 0600."""
    from .owner import Owner
    o = Owner(f"demo-{label}")
    d.mkdir(parents=True)
    paths = []
    for which in ("id", "author"):
        path = d / f"{which}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(o.pem(which))
        paths.append(path)
    return paths[0], paths[1], o.author_digest.hex()


def _sign_id_blocks(policy: Path, keys: tuple[Path, Path, str], *firmware: Path) -> Path:
    """`firmgate idblock sign`, as the owner runs it: one signed ID block per (firmware x shape)."""
    argv = ["idblock", "sign", "--policy", str(policy), "--id-key", str(keys[0]), "--author-key", str(keys[1]),
            "--guest-svn", "1"]
    for f in firmware:
        argv += ["--firmware", str(f)]
    code, out = _cli(argv)
    if code != 0:
        raise UsageError(f"`firmgate idblock sign` failed for {policy.name}: {out}")
    return policy.with_name(policy.stem + ".idblocks.json")


def _owner_audit_reason(ws: Path, operator: bool = False) -> str:
    """The reason of the latest denial in the owner's audit log (the operator's database); `operator`:
    of the latest refused /attest in the operator's rows (a refused firmware's reason names publisher
    rules, so only the operator's log has it, docs/security.md RT-3)."""
    from sqlalchemy import select

    from broker.db import AuditRecord, make_engine
    engine = make_engine(f"sqlite:///{ws / 'broker.db'}")
    who = AuditRecord.tenant.is_(None) if operator else AuditRecord.tenant == TENANT
    event = "attest" if operator else "deny"
    try:
        with engine.connect() as conn:
            q = (select(AuditRecord.reason).where(who, AuditRecord.event == event, AuditRecord.outcome == "denied")
                 .order_by(AuditRecord.id.desc()).limit(1))
            return str(conn.execute(q).scalar() or "")
    finally:
        engine.dispose()


def _story(story: Story, url: str, vm: Any, host: Any, addons: dict[str, bytes], digests: dict[str, str],
           fwids: dict[str, str], repo: Path, pol: Path, have_qemu: bool, vcpus: int, vcpu_type: str,
           owner: tuple[Path, Path, str], other_host: Any, ws: Path, guest_vm: Any = None) -> None:
    from guest import BrokerDenied, KbsSession, TeeKey, attest, fetch_resource
    from guest.evidence import TsmSource
    from guest.update import request_update
    from host_install.install import install
    last: dict[str, Any] = {}

    def do_install(which: str, *, by: str) -> Callable[[Step], None]:
        """by="guest": the guest sends the add-on over the update channel (firmgate guest request-update);
        by="host": the host operator runs host-install directly (a host can install anything)."""
        def run(st: Step) -> None:
            if by == "guest" and guest_vm is not None:
                # the guest's disk carries this add-on; the guest in the VM asks by itself at boot
                out = guest_vm.ask(addons[which], digests[which], host_firmware=addons["bad"])
                if out.status not in ("installed", "unchanged"):
                    st.outcome, st.detail = "refused", f"the guest's request: {out.status}"
                    return
                r = out.result
                st.facts.update(real_guest=True, guest_request=out.status, reboot_seconds=out.reboot_seconds)
            elif by == "guest":
                answer = request_update(str(vm.channel_path), addons[which], timeout=300)
                if not answer.get("ok"):
                    st.outcome, st.detail = "refused", f"host-install: {answer.get('error')}"
                    return
                r = answer.get("result") or {}
            else:
                r = install(vm, addons[which], launch=have_qemu).to_dict()
            launch = host.launch()
            st.facts.update(by=by, fwid=r.get("fwid"), in_force=r.get("in_force"), launched=r.get("launched"),
                            accel=r.get("accel"), boot_seconds=r.get("boot_seconds"),
                            measurement=launch.measurement.hex())
            if r.get("in_force") != digests[which] or launch.firmware_digest != digests[which]:
                st.outcome, st.detail = "wrong firmware", f"in force {r.get('in_force')}, wanted {digests[which]}"
                return
            booted = (f"booted under QEMU ({r.get('accel')}, {r.get('boot_seconds') or 0:.1f}s)"
                      if r.get("launched") else
                      "already in force, not relaunched" if have_qemu else "not booted (no QEMU)")
            if st.facts.get("real_guest"):
                booted += ("; asked by the real guest over virtio-serial, which then printed the new firmware's "
                           "SMBIOS line and did not ask again")
            st.outcome = "installed"
            st.detail = (f"{r.get('fwid')} in force, {booted}; simulated host measures MEASUREMENT "
                         f"{launch.measurement.hex()[:24]}…")
        return run

    def do_attest(which: str, *, send_addon: bool = False, on: Any = None) -> Callable[[Step], None]:
        def run(st: Step) -> None:
            key = TeeKey.generate("p256")
            s = KbsSession(url)
            try:
                att = attest(s, TsmSource((on or host).tsm()), key, addon=addons[which] if send_addon else None)
                last["attestation"], last["session"] = att, s
                st.facts.update(token_status=att.status, nonce=att.nonce)
                secret = fetch_resource(s, RESOURCE, key)
            except BrokerDenied as exc:
                # The guest reads only "not allowed for this resource"; the owner's audit log says why.
                # A refused firmware: the guest reads what it sent; the operator's log says why.
                refused = exc.variant == "AttestationError" and "operator's audit log" in exc.detail
                why = _owner_audit_reason(ws, operator=refused) if exc.variant == "PolicyDeny" or refused else ""
                st.outcome, st.detail = "denied", f"{exc.status} {exc.variant}: {exc.detail}"
                if why:
                    st.detail += f"; the {'operator' if refused else 'owner'}'s audit log: {why}"
                st.facts.update(variant=exc.variant, reason=why or exc.detail)
                return
            if secret != SECRET:
                st.outcome, st.detail = "wrong secret", f"{len(secret)} bytes that are not the stored value"
                return
            st.outcome = "released"
            st.facts.update(sent_addon=send_addon)
            st.detail = (f"token {st.facts['token_status']}; {RESOURCE} decrypted with this run's P-256 key "
                         f"({len(secret)} bytes)" + ("; the add-on rode in additional_evidence, bound by "
                                                     "REPORT_DATA" if send_addon else ""))
        return run

    def replay(st: Step) -> None:
        att, old = last.get("attestation"), last.get("session")
        if att is None or old is None:
            st.outcome, st.detail = "skipped", "no earlier attestation to replay"
            return
        from guest.client import auth
        denials = []
        # (a) the same evidence again on its own session: that nonce was consumed by the first /attest.
        # (b) the same evidence on a new session: it answers the old nonce, not the new one.
        fresh = KbsSession(url)
        st.facts.update(old_nonce=att.nonce, new_nonce=auth(fresh))
        for label, s in (("same session", old), ("new session", fresh)):
            try:
                s.request("attest", "POST", "/attest", att.request)
            except BrokerDenied as exc:
                denials.append(f"{label}: {exc.status} {exc.variant}: {exc.detail}")
                continue
            st.outcome, st.detail = "accepted", f"{label}: the broker took evidence made for a used nonce"
            return
        st.outcome, st.detail = "denied", "; ".join(denials)
        st.facts.update(reasons=denials)

    def owner_commits_v2(st: Step) -> None:
        pol.write_text(policy_text((fwids["v1"], digests["v1"]), (fwids["v2"], digests["v2"]), vcpus, vcpu_type,
                                   owner[2], publishers=PUBLISHERS))
        code, out = _cli(["policy", "check", str(pol)])
        if code != 0:
            st.outcome, st.detail = "policy check failed", out
            return
        # The owner signs ID blocks for the new table (v2's bytes: the add-on it ships) and hands them
        # to the host with the add-on.
        signed = _sign_id_blocks(pol, owner, ws / f"{fwids['v2']}.efi")
        shutil.copyfile(signed, vm.rel("owner.idblocks.json"))
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", "demo: allow v2 (svn 2), min_svn 2; signed ID blocks")
        commit = _git(repo, "rev-parse", "--short", "HEAD")
        time.sleep(1.1)  # the broker's policy store re-reads changed files at most once a second
        st.outcome = "committed"
        st.detail = (f"commit {commit}: v2 listed by digest (svn 2, bytes to come from the guest), "
                     "firmware.min_svn = 2; `firmgate policy check` passed; the owner signed ID blocks for v2 "
                     "(`firmgate idblock sign`) and handed them to the host")
        st.facts.update(commit=commit)

    def install_then_attest(name: str, by: str, send_addon: bool = False) -> Callable[[Step], None]:
        def run(st: Step) -> None:
            do_install(name, by=by)(st)
            if st.outcome == "installed":
                do_attest(name, send_addon=send_addon)(st)
        return run

    story.step("guest asks host-install for its v1 add-on", "installed", do_install("v1", by="guest"))
    story.step("guest attests via configfs-tsm and asks for its disk key", "released",
               do_attest("v1"))
    story.step("host swaps in an unlisted firmware; guest attests", "denied", install_then_attest("bad", by="host"))
    story.step("replay the step-2 attestation (same and new session)", "denied", replay)
    def look_alike(st: Step) -> None:
        do_attest("v2", on=other_host)(st)
        reason = str(st.facts.get("reason", ""))
        if st.outcome != "denied" or "id_block.trusted_key" not in reason:
            st.outcome = "released" if st.outcome == "released" else f"{st.outcome} (not by name)"
            return
        other_detail = st.detail
        own = Step(0, "", "released")
        do_attest("v2")(own)
        st.facts.update(owner_outcome=own.outcome, owner_detail=own.detail)
        if own.outcome != "released":
            st.outcome, st.detail = "owner denied", own.detail
            return
        st.detail = f"{other_detail}; the owner's own signed launch of the same firmware: released"

    story.step("owner commits v2 and min_svn 2 to the policy repo", "committed", owner_commits_v2)
    story.step("guest asks for v2, attests sending the v2 add-on", "released",
               install_then_attest("v2", by="guest", send_addon=True))
    story.step("another tenant's VM (same v2, same shape) asks for this key", "denied", look_alike)
    story.step("guest asks for v1 again (a downgrade), attests", "denied",
               install_then_attest("v1", by="guest"))

    # A fix rolls out with no commit to the owner's policy: the publisher's endorsement admits it.
    def update_and_attest(which: str) -> Callable[[Step], None]:
        def run(st: Step) -> None:
            do_install(which, by="guest")(st)
            if st.outcome == "installed":
                do_attest(which, send_addon=True)(st)
        return run

    def untrusted_fix(st: Step) -> None:
        # The publisher announces v3. The owner's launches must still name their owner: its automation
        # signs an ID block for v3's launch digest (no policy change) and hands it to the host, as for
        # any build. Then a copy of the same bytes arrives endorsed by another key.
        signed = _sign_id_blocks(pol, owner, ws / f"{fwids['v2']}.efi", ws / "v3.efi")
        shutil.copyfile(signed, vm.rel("owner.idblocks.json"))
        update_and_attest("v3-rogue")(st)

    def endorsed_fix(st: Step) -> None:
        head = _git(repo, "rev-parse", "--short", "HEAD")
        update_and_attest("v3")(st)
        # The policy file and the publisher's files are untouched (the ID block set beside them is not policy).
        unchanged = (_git(repo, "rev-parse", "--short", "HEAD") == head
                     and not _git(repo, "status", "--porcelain", "--", pol.name, "publishers"))
        st.facts.update(policy_commit=head, policy_unchanged=unchanged)
        if st.outcome == "released":
            st.detail += (f"; admitted on endorsement demo-v3 by demo-publisher, the policy repo still at {head}"
                          if unchanged else "; BUT the policy repo changed")

    story.step("the publisher's v3 build, signed by an untrusted key: guest updates, attests", "denied",
               untrusted_fix)
    story.step("publisher issues v3 (svn 3) with its endorsement: guest updates, attests", "released", endorsed_fix)
    story.step("a build its publisher revoked: guest updates, attests", "denied", update_and_attest("revoked"))


def _publisher_builds(ws: Path, base: bytes, addons: dict[str, bytes], digests: dict[str, str],
                      fwids: dict[str, str]) -> dict[str, bytes]:
    """The publisher's side: v3 endorsed (svn 3) in its add-on's .corim section; the same build endorsed
    by an untrusted key; a build endorsed and then revoked. Adds the add-ons; returns the key and list."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from verifier.endorse.corim import (
        Endorsement,
        Provenance,
        Revocations,
        sign_endorsement,
        sign_revocations,
    )
    from verifier.firmware.addon import build_addon

    key, rogue = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    now = int(time.time())
    prov = Provenance("https://example.com/demo-publisher/edk2.git", "0123456789abcdef", "make -C OvmfPkg")
    builds = {"v3": (derive(base, b"firmgate-demo-v3"), "ovmf-demo-v3", key, "demo-v3"),
              "v3-rogue": (derive(base, b"firmgate-demo-v3"), "ovmf-demo-v3", rogue, "demo-v3-rogue"),
              "revoked": (derive(base, b"firmgate-demo-rv"), "ovmf-demo-rv", key, "demo-revoked")}
    for name, (img, fwid, signer, eid) in builds.items():
        digest = hashlib.sha384(img).hexdigest()
        e = Endorsement(eid, fwid, digest, 3, "demo-publisher", now - 60, now + 30 * 86400, prov)
        end = sign_endorsement(e, signer)
        addons[name] = build_addon([(fwid, img)], extra_sections=[(".corim", end)])
        digests[name], fwids[name] = digest, fwid
        (ws / f"{name}.efi").write_bytes(addons[name])
        (ws / f"{name}.corim").write_bytes(end)
    revocations = sign_revocations(Revocations("demo-publisher", now, frozenset({"demo-revoked"}), frozenset()), key)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"public_pem": public_pem, "revocations": revocations}


def _summary(story: Story, result: dict[str, Any]) -> None:
    story.say("\nsummary")
    story.say(f"  {'#':<2} {'step':<56} {'expected':<10} {'outcome':<10} {'time':>6}  ok")
    for s in story.steps:
        story.say(f"  {s.n:<2} {s.title[:56]:<56} {s.expect:<10} {s.outcome[:10]:<10} {s.seconds:5.1f}s  "
                  f"{'yes' if s.ok else 'NO'}")
    verdict = "every step did what it should" if result["ok"] else "SOME STEPS DID NOT DO WHAT THEY SHOULD"
    story.say(f"\n{verdict} ({result['seconds']}s; platform SIMULATED; QEMU {'used' if result['qemu'] else 'skipped'})")


def cmd_demo(args: argparse.Namespace) -> int:
    from verifier.cli import print_json
    result = run_demo(args.firmware, args.workdir, quiet=args.json,
                      use_qemu=False if args.no_qemu else None,
                      real_guest=False if args.no_real_guest else None)
    if args.json:
        print_json(result)
    return 0 if result["ok"] else 1


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("demo", help="the whole flow end to end on this machine (simulated SEV-SNP hardware)")
    p.add_argument("--firmware", metavar="F", help="OVMF image with SEV metadata (default: Debian's OVMF.fd)")
    p.add_argument("--workdir", metavar="D", help="keep the workspace here (an empty directory); default: a temp dir")
    p.add_argument("--json", action="store_true", help="print each step's outcome as JSON instead of the story")
    p.add_argument("--no-qemu", action="store_true", help="do not boot the firmware under QEMU even if present")
    p.add_argument("--no-real-guest", action="store_true", help="send the guest's update requests from the demo "
                   "process even when the guest image (`make guest-image`) is built")
    p.set_defaults(func=cmd_demo)
