"""The guest client against the real broker over HTTP on loopback (SQLite), with evidence from the
simulated SNP host's configfs-tsm tree for host-install VM directories: releases and every refusal."""
from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from guest import (BrokerDenied, BrokerUnreachable, KbsSession, TeeKey, attest, auth, fetch_resource,
                          report_data_for)
from guest.evidence import TsmSource, evidence_json
from host_install.install import install
from host_install.vm import VmDir
from sim.demo import LoopbackBroker, _cli, derive
from sim.host import SimSnpHost
from sim.owner import BOOT_CHAIN_REASON, Owner
from sim.platform import SimPlatform
from verifier.firmware.addon import build_addon
from verifier.measure.launch import Shape

FW = "edk2-2022.11-OVMF.fd"     # 2 MiB, SEV metadata: the quickest real image to measure
SECRET = b"acme disk key"


def _policy(tenant: str, allowed: list[tuple[str, str, int, str]], secrets: str) -> str:
    """The bound form: each firmware enforces its boot chain, and the tenant's author key is trusted
    (the VMs launch with the owner's ID blocks, through host-install and the simulated PSP)."""
    fw = "".join(f'[[firmware.allowed]]\nid = "{i}"\nsha384 = "{d}"\nsvn = {s}\nbytes = "{b}"\n'
                 f'enforces_boot_chain = "{BOOT_CHAIN_REASON}"\n\n' for i, d, s, b in allowed)
    return f'''version = 1
[firmware]
{fw}
[[shapes]]
vmm = "qemu"
vcpus = [1]
vcpu_types = ["EPYC-v4"]

[platform]
products = ["Milan"]
signers = ["VCEK"]
vmpls = [0]
allow_simulated_platform = true

[guest]
unsafe_allow_debug = false

{Owner("guest-" + tenant).id_block_toml()}
{secrets}
'''


class World:
    def __init__(self, root: Path, image: bytes) -> None:
        self.platform = SimPlatform("Milan", "VCEK")
        self.images = {"v1": image, "up": derive(image, b"uploaded-variant"), "bad": derive(image, b"never-listed!!!!")}
        self.digests = {k: hashlib.sha384(v).hexdigest() for k, v in self.images.items()}
        self.addons = {k: build_addon([(f"fw-{k}", v)]) for k, v in self.images.items()}
        pol = root / "policies"
        (pol / "fw").mkdir(parents=True)
        (pol / "fw" / "v1.efi").write_bytes(self.addons["v1"])
        (pol / "acme.toml").write_text(_policy("acme", [("fw-v1", self.digests["v1"], 1, "fw/v1.efi"),
                                                        ("fw-up", self.digests["up"], 2, "uploaded")],
                                               '[[secrets]]\npath = "acme/key/disk"\n\n'
                                               '[[secrets]]\npath = "acme/key/uponly"\nfirmware = ["fw-up"]\n'))
        # Another tenant that allows only the "up" firmware: acme's v1 guest must not get its secret.
        (pol / "other.toml").write_text(_policy("other", [("fw-up", self.digests["up"], 2, "uploaded")],
                                                '[[secrets]]\npath = "other/key/x"\n'))
        (root / "ark.pem").write_bytes(self.platform.root_pem())
        mkey = root / "master.key"
        mkey.write_text(os.urandom(32).hex())
        db = f"sqlite:///{root / 'broker.db'}"
        for argv in (["tenant", "add", "acme"], ["tenant", "add", "other"],
                     ["secret", "put", "acme/key/disk", "--value", SECRET.decode()],
                     ["secret", "put", "acme/key/uponly", "--value", "up only"],
                     ["secret", "put", "other/key/x", "--value", "other's"]):
            code, out = _cli([*argv, "--db", db, "--master-key-file", str(mkey)])
            assert code == 0, out
        self.broker = LoopbackBroker({"POLICIES_DIR": str(pol), "DATABASE_URL": db,
                                      "TRUST_ROOT_PEM": str(root / "ark.pem"), "MASTER_KEY_FILE": str(mkey)})
        self.hosts: dict[str, SimSnpHost] = {}
        # acme's owner signed ID blocks for its images in the VMs' shape; host-install hands them over.
        signed = Owner("guest-acme").sign_set("acme", {f"fw-{k}": v for k, v in self.images.items()},
                                              [Shape(1, "EPYC-v4")])
        for k in self.images:
            (root / f"vm-{k}").mkdir()
            (root / f"vm-{k}" / "owner.idblocks.json").write_text(signed.to_json())
            vm = VmDir.create(root / f"vm-{k}", snp=True, launch_mode="plain", memory_mib=128,
                              id_blocks="owner.idblocks.json", require_id_block=True)
            install(vm, self.addons[k], launch=False)
            self.hosts[k] = SimSnpHost(vm, self.platform)
        unsigned = VmDir.create(root / "vm-unsigned", snp=True, launch_mode="plain", memory_mib=128)
        install(unsigned, self.addons["v1"], launch=False)
        self.unsigned_vm = unsigned
        self.root = root

    def source(self, which: str = "v1") -> TsmSource:
        return TsmSource(self.hosts[which].tsm())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, firmware_dir: Path) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("guest"), (firmware_dir / FW).read_bytes())
    with w.broker:
        yield w


def _attest_fetch(w: World, which: str = "v1", resource: str = "acme/key/disk", **kw: Any) -> bytes:
    key = TeeKey.generate(kw.pop("key_type", "p256"))
    s = KbsSession(w.broker.url)
    attest(s, kw.pop("source", None) or w.source(which), key, **kw)
    return fetch_resource(s, resource, key)


# -- releases ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key_type,shape", [("p256", "snp"), ("p384", "firmgate"), ("p521", "snp"), ("rsa", "snp")])
def test_released_cookie_mode(world: World, key_type: str, shape: str) -> None:
    assert _attest_fetch(world, key_type=key_type, evidence_shape=shape) == SECRET


def test_released_bearer_mode_without_cookie(world: World) -> None:
    key = TeeKey.generate()
    s = KbsSession(world.broker.url)
    att = attest(s, world.source(), key)
    assert att.status in ("affirming", "warning")
    fresh = KbsSession(world.broker.url)          # no cookie: the token alone, as a CoCo pod's CDH asks
    assert fetch_resource(fresh, "acme/key/disk", key, bearer=att.token) == SECRET
    assert fresh.cookie is None


def test_addon_in_additional_evidence_gives_the_broker_the_bytes(world: World) -> None:
    """fw-up is listed as "uploaded": the broker can match it only once it has the bytes, which our
    guest sends inside additional_evidence (bound by REPORT_DATA)."""
    assert _attest_fetch(world, "up", "acme/key/uponly", addon=world.addons["up"]) == b"up only"
    # Now the broker has them: an unmodified guest (no add-on) with that firmware gets through too.
    assert _attest_fetch(world, "up", "acme/key/disk") == SECRET


# -- refusals: every one carries the broker's reason ---------------------------------------------------
def _denied(fn: Any, *args: Any, **kw: Any) -> BrokerDenied:
    with pytest.raises(BrokerDenied) as ei:
        fn(*args, **kw)
    err = ei.value
    assert err.status in (401, 404) and err.detail
    assert err.detail in str(err)   # the one-line message the CLI prints includes the broker's detail
    return err


def test_unlisted_firmware_denied_with_the_measurement(world: World) -> None:
    err = _denied(_attest_fetch, world, "bad")
    assert err.variant == "PolicyDeny" and "not allowed for this resource (your evidence: MEASUREMENT " in err.detail


def test_unlisted_addon_is_refused_at_attest(world: World) -> None:
    err = _denied(_attest_fetch, world, "bad", addon=world.addons["bad"])
    assert err.step == "attest" and "not allowed" in err.detail


def test_secret_limited_to_other_firmware_denied(world: World) -> None:
    err = _denied(_attest_fetch, world, "v1", "acme/key/uponly")
    assert err.variant == "PolicyDeny"


def test_other_tenants_secret_denied(world: World) -> None:
    err = _denied(_attest_fetch, world, "v1", "other/key/x")
    assert err.step == "resource" and err.status == 401


def test_replay_on_the_same_session_and_on_a_new_one(world: World) -> None:
    key = TeeKey.generate()
    s = KbsSession(world.broker.url)
    att = attest(s, world.source(), key)
    err = _denied(s.request, "attest", "POST", "/attest", att.request)
    assert "already used" in err.detail
    fresh = KbsSession(world.broker.url)
    auth(fresh)
    err = _denied(fresh.request, "attest", "POST", "/attest", att.request)
    assert "nonce" in err.detail


def test_report_data_not_binding_our_key_denied(world: World) -> None:
    """Evidence made for another tee-pubkey (a relay of someone else's report) is refused."""
    s = KbsSession(world.broker.url)
    nonce = auth(s)
    mine, theirs = TeeKey.generate(), TeeKey.generate()
    report, table = world.source().get(report_data_for(nonce, theirs.jwk, ""))
    body = {"init-data": None, "runtime-data": {"nonce": nonce, "tee-pubkey": mine.jwk},
            "tee-evidence": {"primary_evidence": evidence_json(report, table), "additional_evidence": ""}}
    err = _denied(s.request, "attest", "POST", "/attest", body)
    assert "REPORT_DATA" in err.detail


def test_untrusted_platform_denied(world: World) -> None:
    rogue = SimSnpHost(world.hosts["v1"].vm, SimPlatform("Milan", "VCEK", key_label="rogue"))
    err = _denied(_attest_fetch, world, source=TsmSource(rogue.tsm()))
    assert err.step == "attest" and "evidence rejected" in err.detail


def test_debug_guest_denied(world: World) -> None:
    # The PSP refuses a signed launch whose policy is not the block's: a debug launch carries no ID block.
    debug = SimSnpHost(world.unsigned_vm, world.platform, guest_policy=0x30000 | 1 << 19)
    err = _denied(_attest_fetch, world, source=TsmSource(debug.tsm()))
    # the rule that failed is in the owner's audit, not in the answer (it may be another tenant's policy)
    assert err.variant == "PolicyDeny" and err.detail.startswith("not allowed for this resource")


def test_resource_without_attesting_denied(world: World) -> None:
    s = KbsSession(world.broker.url)
    auth(s)
    err = _denied(fetch_resource, s, "acme/key/disk", TeeKey.generate())
    assert err.variant == "TokenNotFound"


def test_forged_bearer_token_denied(world: World) -> None:
    key = TeeKey.generate()
    att = attest(KbsSession(world.broker.url), world.source(), key)
    h, p, sig = att.token.split(".")
    forged = f"{h}.{p}.{sig[:-4]}AAAA"
    err = _denied(fetch_resource, KbsSession(world.broker.url), "acme/key/disk", key, bearer=forged)
    assert err.status == 401


def test_invalid_path_is_404(world: World) -> None:
    s = KbsSession(world.broker.url)
    err = _denied(s.request, "resource", "GET", "/resource/acme/key")
    assert err.status == 404


def test_broker_unreachable() -> None:
    with pytest.raises(BrokerUnreachable, match="unreachable"):
        auth(KbsSession("http://127.0.0.1:9"))


# -- the CLI -----------------------------------------------------------------------------------------------
@pytest.fixture()
def sim_source(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """`firmgate guest attest` in-process, reading configfs-tsm from the simulated host (the real
    tree does not exist here); everything after the TsmBackend is the command's own code."""
    import guest
    monkeypatch.setattr(guest, "default_source", lambda root=None: world.source())


def test_cli_attest_writes_0600(world: World, sim_source: None, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "disk.key"
    code, text = _cli(["guest", "attest", "--broker", world.broker.url, "--resource", "acme/key/disk",
                       "-o", str(out)])
    assert code == 0, text
    assert out.read_bytes() == SECRET and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "mode 0600" in text


def test_cli_attest_bearer_to_stdout(world: World, sim_source: None, capfdbinary: pytest.CaptureFixture[bytes]
                                     ) -> None:
    from verifier.cli import main
    assert main(["guest", "attest", "--broker", world.broker.url, "--resource", "acme/key/disk", "--bearer",
                 "--key-type", "rsa"]) == 0
    assert capfdbinary.readouterr().out == SECRET


def test_cli_denial_is_one_line_with_the_reason(world: World, sim_source: None) -> None:
    code, text = _cli(["guest", "attest", "--broker", world.broker.url, "--resource", "other/key/x"])
    assert code == 1
    line = text.strip().splitlines()[-1]
    assert line.startswith("error: broker denied resource (401 ") and "Traceback" not in text


def test_cli_bad_usage(world: World) -> None:
    code, text = _cli(["guest", "attest", "--broker", world.broker.url, "--resource", "acme/../x"])
    assert code == 2 and "REPOSITORY/TYPE/TAG" in text
    code, text = _cli(["guest", "attest", "--broker", "ftp://x", "--resource", "a/b/c"])
    assert code == 2 and "http(s)" in text
    # No configfs-tsm tree where we were told to look: could not decide, exit 3, the reason in one line.
    code, text = _cli(["guest", "attest", "--broker", world.broker.url, "--resource", "acme/key/disk",
                       "--tsm-root", str(world.root / "no-such-tsm")])
    assert code == 3 and "cannot create configfs-tsm entry" in text


def test_cli_broker_unreachable(sim_source: None) -> None:
    code, text = _cli(["guest", "attest", "--broker", "http://127.0.0.1:9", "--resource", "a/b/c"])
    assert code == 3 and text.startswith("error: auth: broker http://127.0.0.1:9 unreachable")


def test_cli_request_update_over_the_channel(world: World, tmp_path: Path, firmware_dir: Path) -> None:
    from host_install.channel import Listener
    from host_install.install import current_firmware
    vm = VmDir.create(tmp_path / "vm", snp=True, launch_mode="plain", memory_mib=128)
    listener = Listener(vm, launch=False)
    t = threading.Thread(target=listener.serve, kwargs={"max_requests": 2}, daemon=True)
    t.start()
    try:
        addon = tmp_path / "v1.efi"
        addon.write_bytes(world.addons["v1"])
        code, text = _cli(["guest", "request-update", "--addon", str(addon), "--socket", str(vm.channel_path)])
        assert code == 0, text
        assert current_firmware(vm).digest == world.digests["v1"]
        junk = tmp_path / "junk.efi"
        junk.write_bytes(b"MZ" + b"\0" * 100)
        code, text = _cli(["guest", "request-update", "--addon", str(junk), "--socket", str(vm.channel_path)])
        assert code == 2 and text.startswith("error: host refused the update")
    finally:
        t.join(10)
        listener.close()
    code, text = _cli(["guest", "request-update", "--addon", str(addon), "--socket", str(tmp_path / "none")])
    assert code == 2 and "no update channel" in text


def test_addon_right_after_the_owner_lists_it(tmp_path: Path, firmware_dir: Path) -> None:
    """Regression: the first add-on sent just after the owner listed its digest was refused until some
    other request made the policy store re-read (fixed in the broker, bc902b2)."""
    import time
    w = World(tmp_path, (firmware_dir / FW).read_bytes())
    with w.broker:
        assert _attest_fetch(w) == SECRET                 # the broker has loaded acme's policy
        pol = tmp_path / "policies" / "acme.toml"
        pol.write_text(_policy("acme", [("fw-v1", w.digests["v1"], 1, "fw/v1.efi"),
                                        ("fw-new", w.digests["bad"], 3, "uploaded")],
                               '[[secrets]]\npath = "acme/key/disk"\n'))
        time.sleep(1.2)                                   # past the store's once-a-second re-read
        assert _attest_fetch(w, "bad", addon=w.addons["bad"]) == SECRET


def test_init_data_bound_through_host_data(world: World, tmp_path: Path) -> None:
    """init-data (TOML) is bound by HOST_DATA = its digest, padded to 32 bytes (KBS-FACTS section 2)."""
    body = 'algorithm = "sha384"\nversion = "0.1.0"\n[data]\n"policy.rego" = "allow"\n'
    host_data = hashlib.sha384(body.encode()).digest()[:32]
    bound = SimSnpHost(world.hosts["v1"].vm, world.platform, host_data=host_data)
    init = {"format": "toml", "body": body}
    assert _attest_fetch(world, source=TsmSource(bound.tsm()), init_data=init) == SECRET
    # The same init-data from a VM launched with other HOST_DATA is refused.
    err = _denied(_attest_fetch, world, init_data=init)
    assert "HOST_DATA" in err.detail


def test_cli_init_data_option(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import guest
    body = 'algorithm = "sha256"\n'
    bound = SimSnpHost(world.hosts["v1"].vm, world.platform, host_data=hashlib.sha256(body.encode()).digest())
    monkeypatch.setattr(guest, "default_source", lambda root=None: TsmSource(bound.tsm()))
    f = tmp_path / "initdata.toml"
    f.write_text(body)
    out = tmp_path / "k"
    code, text = _cli(["guest", "attest", "--broker", world.broker.url, "--resource", "acme/key/disk",
                       "--init-data", str(f), "-o", str(out)])
    assert code == 0, text
    assert out.read_bytes() == SECRET
    code, text = _cli(["guest", "attest", "--broker", world.broker.url, "--resource", "acme/key/disk",
                       "--init-data", str(tmp_path / "absent.toml")])
    assert code == 2 and "cannot read init-data" in text
