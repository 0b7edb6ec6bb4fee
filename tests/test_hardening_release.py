"""Property: a secret leaves the broker only when EVERY rule of the tenant's policy holds.

Random simulated reports x random policies go through the real broker (Flask
app, real verifier, real policy store, real OVMF builds for the reference
measurements) as a KBS guest would: /auth, /attest, /resource. Whether the
secret came back is compared with `reference_release`, a second implementation
of the rules written here from DESIGN.md and the policy format, sharing no code
with verifier/appraise or broker/release. Every example must agree both ways:
no wrong release (a secret the rules deny) and no wrong denial.

FIRMGATE_RELEASE_EXAMPLES raises the example count (docs/security.md quotes a
long run); `make test` runs a short one.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_broker_support import guest_decrypt, guest_report_data, new_tee_key

from tests.conftest import FIRMWARE_DIR

TENANT = "t"
OP = "prop-operator"
FIRMWARE = {"fw-a": "edk2-2025.02-OVMF.fd", "fw-b": "edk2-2022.11-OVMF.fd"}
VCPUS = (1, 2)
SIM_TCB = {"bootloader": 9, "tee": 0, "snp": 23, "microcode": 72}  # sim.platform.Tcb defaults
LOW_LAUNCH_SNP = 20
HOST_DATA_A = hashlib.sha256(b"host-data-a").digest()
EXAMPLES = int(os.environ.get("FIRMGATE_RELEASE_EXAMPLES", "40"))
TALLY = {"examples": 0, "released": 0, "denied": 0, "wrong_release": 0, "wrong_denial": 0}


# -- what an example is -----------------------------------------------------------------------
@dataclass(frozen=True)
class Rep:
    fw: str
    vcpus: int
    debug: bool
    migrate_ma: bool
    smt: bool
    single_socket: bool
    abi: tuple[int, int]
    guest_svn: int
    vmpl: int
    provisional: bool
    low_launch: bool
    host_data: bytes


@dataclass(frozen=True)
class Pol:
    allowed: dict[str, int]                 # firmware id -> svn
    revoked: tuple[str, ...]
    min_svn: int | None
    shape_vcpus: tuple[int, ...]
    products: tuple[str, ...] | None
    signers: tuple[str, ...] | None
    vmpls: tuple[int, ...] | None
    allow_provisional: bool
    allow_simulated: bool
    min_tcb: dict[str, int]                 # Milan floor, components present only
    min_launch_snp: int | None
    host_data: str | None                   # None | "initdata" | hex
    unsafe_allow_debug: bool
    allow_migrate_ma: bool
    allow_smt: bool
    require_single_socket: bool
    min_abi: tuple[int, int] | None
    min_guest_svn: int | None
    secret_firmware: tuple[str, ...] | None
    secret_min_svn: int | None


def _opt(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), s)


reports = st.builds(
    Rep, fw=st.sampled_from(sorted(FIRMWARE)), vcpus=st.sampled_from(VCPUS), debug=st.booleans(),
    migrate_ma=st.booleans(), smt=st.booleans(), single_socket=st.booleans(),
    abi=st.sampled_from([(1, 51), (1, 55), (0, 31)]), guest_svn=st.integers(0, 3), vmpl=st.integers(0, 3),
    provisional=st.booleans(), low_launch=st.booleans(),
    host_data=st.sampled_from([bytes(32), HOST_DATA_A, hashlib.sha256(b"other").digest()]))


@st.composite
def policies(draw: st.DrawFn) -> Pol:
    ids = draw(st.lists(st.sampled_from(sorted(FIRMWARE)), min_size=1, max_size=2, unique=True))
    allowed = {i: draw(st.integers(1, 3)) for i in sorted(ids)}
    products = draw(_opt(st.sampled_from([("Milan",), ("Genoa",), ("Milan", "Genoa")])))
    floor_ok = products is None or "Milan" in products  # a Milan floor needs Milan allowed
    min_tcb: dict[str, int] = {}
    if floor_ok:
        for comp, v in SIM_TCB.items():
            f = draw(_opt(st.sampled_from([v - 1, v, v + 1]) if v > 0 else st.just(0)))
            if f is not None:
                min_tcb[comp] = f
    return Pol(
        allowed=allowed, revoked=tuple(draw(st.lists(st.sampled_from(ids), unique=True))),
        min_svn=draw(_opt(st.integers(1, 3))),
        shape_vcpus=tuple(draw(st.lists(st.sampled_from(VCPUS), min_size=1, unique=True))),
        products=products, signers=draw(_opt(st.sampled_from([("VCEK",), ("VLEK",), ("VCEK", "VLEK")]))),
        vmpls=draw(_opt(st.lists(st.integers(0, 3), min_size=1, unique=True).map(tuple))),
        allow_provisional=draw(st.booleans()), allow_simulated=draw(st.sampled_from([True, True, True, False])),
        min_tcb=min_tcb,
        min_launch_snp=draw(_opt(st.sampled_from([LOW_LAUNCH_SNP, LOW_LAUNCH_SNP + 1]))) if floor_ok else None,
        host_data=draw(st.sampled_from([None, "initdata", HOST_DATA_A.hex()])),
        unsafe_allow_debug=draw(st.booleans()), allow_migrate_ma=draw(st.booleans()), allow_smt=draw(st.booleans()),
        require_single_socket=draw(st.booleans()), min_abi=draw(_opt(st.sampled_from([(1, 51), (1, 52)]))),
        min_guest_svn=draw(_opt(st.integers(0, 3))),
        secret_firmware=draw(_opt(st.lists(st.sampled_from(ids), min_size=1, unique=True).map(tuple))),
        secret_min_svn=draw(_opt(st.integers(1, 3))))


KNOBS = ("simulated", "products", "signers", "min_tcb", "min_launch", "provisional", "debug", "migrate_ma", "smt",
         "single_socket", "min_abi", "min_guest_svn", "vmpls", "allowed", "revoked", "min_svn", "host_data",
         "secret_firmware", "secret_min_svn")


@st.composite
def cases(draw: st.DrawFn) -> tuple[Rep, Pol, bool]:
    """(report, policy, listed): a random policy, then all knobs but a few (0-3, drawn) set to some value
    the report satisfies, so releases and one-rule-off denials are both common. Nothing here decides the
    expected outcome: reference_release judges the final pair on its own."""
    from dataclasses import replace
    rep, pol = draw(reports), draw(policies())
    wild = draw(st.frozensets(st.sampled_from(KNOBS), max_size=3))
    fix: dict[str, Any] = {}
    launch_snp = LOW_LAUNCH_SNP if rep.low_launch else SIM_TCB["snp"]

    def ok(knob: str, *choices: Any) -> None:
        if knob not in wild:
            fix.update(draw(st.sampled_from(choices)))
    svn = draw(st.integers(1, 3))
    ok("allowed", {"allowed": {**pol.allowed, rep.fw: svn}, "shape_vcpus": tuple(sorted({*pol.shape_vcpus, rep.vcpus}))})
    fw_svn = fix.get("allowed", pol.allowed).get(rep.fw, 0)
    ids = sorted(fix.get("allowed", pol.allowed))
    ok("simulated", {"allow_simulated": True})
    ok("products", {"products": None}, {"products": ("Milan",)}, {"products": ("Milan", "Genoa")})
    ok("signers", {"signers": None}, {"signers": ("VCEK",)}, {"signers": ("VCEK", "VLEK")})
    ok("min_tcb", {"min_tcb": {}}, {"min_tcb": {k: v - (v > 0) for k, v in SIM_TCB.items()}},
       {"min_tcb": dict(SIM_TCB)})
    ok("min_launch", {"min_launch_snp": None}, {"min_launch_snp": launch_snp})
    ok("provisional", {"allow_provisional": True} if rep.provisional else {"allow_provisional": pol.allow_provisional})
    ok("debug", {"unsafe_allow_debug": True} if rep.debug else {"unsafe_allow_debug": pol.unsafe_allow_debug})
    ok("migrate_ma", {"allow_migrate_ma": True} if rep.migrate_ma else {"allow_migrate_ma": pol.allow_migrate_ma})
    ok("smt", {"allow_smt": True} if rep.smt else {"allow_smt": pol.allow_smt})
    ok("single_socket", {"require_single_socket": False} if not rep.single_socket
       else {"require_single_socket": pol.require_single_socket})
    ok("min_abi", {"min_abi": None}, {"min_abi": rep.abi})
    ok("min_guest_svn", {"min_guest_svn": None}, {"min_guest_svn": rep.guest_svn})
    ok("vmpls", {"vmpls": None}, {"vmpls": (rep.vmpl,)}, {"vmpls": tuple(sorted({0, rep.vmpl}))})
    ok("revoked", {"revoked": tuple(i for i in pol.revoked if i != rep.fw and i in ids)})
    ok("min_svn", {"min_svn": None}, {"min_svn": fw_svn})
    hd = [{"host_data": None}, {"host_data": rep.host_data.hex()}]
    ok("host_data", *(hd + [{"host_data": "initdata"}] if rep.host_data == bytes(32) else hd))
    ok("secret_firmware", {"secret_firmware": None}, {"secret_firmware": (rep.fw,)})
    ok("secret_min_svn", {"secret_min_svn": None}, {"secret_min_svn": fw_svn})
    pol = replace(pol, **fix)
    # Keep the policy well-formed: revoked/secret ids must name allowed firmware, floors need Milan allowed.
    pol = replace(pol, revoked=tuple(i for i in pol.revoked if i in pol.allowed),
                  secret_firmware=(tuple(i for i in pol.secret_firmware if i in pol.allowed) or None)
                  if pol.secret_firmware is not None else None)
    if pol.products is not None and "Milan" not in pol.products:
        pol = replace(pol, min_tcb={}, min_launch_snp=None)
    listed = draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else True
    return rep, pol, listed


# -- the reference: the rules, restated -------------------------------------------------------
def reference_release(rep: Rep, pol: Pol, listed: bool) -> bool:
    """True iff every rule holds (the evidence itself is genuine, simulated, VCEK-signed, Milan, bound)."""
    rules = [
        pol.allow_simulated,                                          # the chain ends in the sim root
        pol.products is None or "Milan" in pol.products,
        pol.signers is None or "VCEK" in pol.signers,
        all(SIM_TCB[k] >= v for k, v in pol.min_tcb.items()),         # REPORTED_TCB floor
        pol.min_launch_snp is None or (LOW_LAUNCH_SNP if rep.low_launch else SIM_TCB["snp"]) >= pol.min_launch_snp,
        not rep.provisional or pol.allow_provisional,
        not rep.debug or pol.unsafe_allow_debug,
        not rep.migrate_ma or pol.allow_migrate_ma,
        not rep.smt or pol.allow_smt,
        not pol.require_single_socket or rep.single_socket,
        pol.min_abi is None or rep.abi >= pol.min_abi,
        pol.min_guest_svn is None or rep.guest_svn >= pol.min_guest_svn,
        pol.vmpls is None or rep.vmpl in pol.vmpls,
        rep.fw in pol.allowed and rep.vcpus in pol.shape_vcpus,        # the measurement is in the table
        rep.fw not in pol.revoked,
        pol.min_svn is None or pol.allowed.get(rep.fw, 0) >= pol.min_svn,
        (pol.host_data is None or (pol.host_data == "initdata" and rep.host_data == bytes(32))
         or (pol.host_data not in (None, "initdata") and rep.host_data.hex() == pol.host_data)),
        listed,                                                       # the secret is in the policy
        pol.secret_firmware is None or rep.fw in pol.secret_firmware,
        pol.secret_min_svn is None or pol.allowed.get(rep.fw, 0) >= pol.secret_min_svn,
    ]
    return all(rules)


def policy_toml(pol: Pol) -> str:
    def arr(xs: Any) -> str:
        return "[" + ", ".join(json.dumps(x) for x in xs) + "]"
    out = ["version = 1", "[firmware]", f"revoked = {arr(pol.revoked)}"]
    if pol.min_svn is not None:
        out.append(f"min_svn = {pol.min_svn}")
    for fid, svn in pol.allowed.items():
        digest = hashlib.sha384((FIRMWARE_DIR / FIRMWARE[fid]).read_bytes()).hexdigest()
        out += ["[[firmware.allowed]]", f'id = "{fid}"', f'sha384 = "{digest}"', f"svn = {svn}",
                f'bytes = "{FIRMWARE[fid]}"']
    out += ["[[shapes]]", 'vmm = "qemu"', f"vcpus = {arr(pol.shape_vcpus)}", 'vcpu_types = ["EPYC-v4"]',
            "[platform]", f"allow_provisional_firmware = {str(pol.allow_provisional).lower()}",
            f"allow_simulated_platform = {str(pol.allow_simulated).lower()}"]
    for key, val in (("products", pol.products), ("signers", pol.signers), ("vmpls", pol.vmpls)):
        if val is not None:
            out.append(f"{key} = {arr(val)}")
    if pol.host_data is not None:
        out.append(f'host_data = "{pol.host_data}"')
    if pol.min_tcb:
        out.append("[platform.min_tcb.Milan]")
        out += [f"{k} = {v}" for k, v in pol.min_tcb.items()]
    if pol.min_launch_snp is not None:
        out += ["[platform.min_launch_tcb.Milan]", f"snp = {pol.min_launch_snp}"]
    out += ["[guest]", f"unsafe_allow_debug = {str(pol.unsafe_allow_debug).lower()}",
            f"allow_migrate_ma = {str(pol.allow_migrate_ma).lower()}", f"allow_smt = {str(pol.allow_smt).lower()}",
            f"require_single_socket = {str(pol.require_single_socket).lower()}"]
    if pol.min_abi is not None:
        out.append(f'min_abi = "{pol.min_abi[0]}.{pol.min_abi[1]}"')
    if pol.min_guest_svn is not None:
        out.append(f"min_guest_svn = {pol.min_guest_svn}")
    # Binding to the owner is beside the point of this property (test_owner_binding covers it).
    out += ["[[secrets]]", f'path = "{TENANT}/key/listed"', "unsafe_unbound = true"]
    if pol.secret_firmware is not None:
        out.append(f"firmware = {arr(pol.secret_firmware)}")
    if pol.secret_min_svn is not None:
        out.append(f"min_svn = {pol.secret_min_svn}")
    return "\n".join(out) + "\n"


# -- the world: sim platform, reference measurements --------------------------------------------
class World:
    def __init__(self, root: Path) -> None:
        from sim.platform import SimPlatform, Tcb
        from verifier.appraise.store import PolicyStore
        self.Tcb = Tcb
        self.sim = SimPlatform("Milan")
        self.root = root
        self.root_pem = root / "sim-root.pem"
        self.root_pem.write_bytes(self.sim.root_pem())
        self.cache = root / "measure-cache"
        full = Pol(allowed={k: 1 for k in FIRMWARE}, revoked=(), min_svn=None, shape_vcpus=VCPUS, products=None,
                   signers=None, vmpls=None, allow_provisional=True, allow_simulated=True, min_tcb={},
                   min_launch_snp=None, host_data=None, unsafe_allow_debug=True, allow_migrate_ma=True,
                   allow_smt=True, require_single_socket=False, min_abi=None, min_guest_svn=None,
                   secret_firmware=None, secret_min_svn=None)
        d = self.policy_dir(root / "full", full)
        table = PolicyStore(d, cache_dir=self.cache).get(TENANT).table
        self.measurement = {(m.firmware.id, m.shape.vcpus): meas for meas, m in table.entries()}
        assert len(self.measurement) == len(FIRMWARE) * len(VCPUS), self.measurement.keys()

    def policy_dir(self, d: Path, pol: Pol) -> Path:
        d.mkdir(parents=True)
        for name in FIRMWARE.values():
            shutil.copyfile(FIRMWARE_DIR / name, (d / name))  # must live in the policy tree
        (d / f"{TENANT}.toml").write_text(policy_toml(pol))
        return d

    def report(self, rep: Rep, report_data: bytes) -> bytes:
        policy = (1 << 17) | rep.smt << 16 | rep.migrate_ma << 18 | rep.debug << 19 | rep.single_socket << 20
        policy |= rep.abi[0] << 8 | rep.abi[1]
        fields: dict[str, Any] = {"report_data": report_data, "measurement": self.measurement[(rep.fw, rep.vcpus)],
                                  "policy": policy, "guest_svn": rep.guest_svn, "vmpl": rep.vmpl,
                                  "host_data": rep.host_data}
        if rep.provisional:
            fields["committed_minor"] = 54  # an older committed SNP firmware than the one running
        if rep.low_launch:
            fields["launch_tcb"] = self.Tcb(snp=LOW_LAUNCH_SNP)
        return bytes(self.sim.sign_report(**fields))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    for name in FIRMWARE.values():
        if not (FIRMWARE_DIR / name).is_file():
            pytest.fail(f"missing real firmware {FIRMWARE_DIR / name}")
    yield World(tmp_path_factory.mktemp("release-prop"))
    print(f"\nrelease property: {TALLY}")  # with -s: the figures docs/security.md quotes


def broker_releases(world: World, rep: Rep, pol: Pol, path: str) -> bool:
    """Run the KBS protocol against a fresh broker holding `pol`; True iff the secret came back."""
    from broker import create_app
    from broker.appraisal import VerifierAppraiser
    with tempfile.TemporaryDirectory(dir=world.root) as tmp:
        d = world.policy_dir(Path(tmp) / "policies", pol)
        appraiser = VerifierAppraiser(str(d), str(world.root_pem), None, True, str(world.cache))
        app = create_app({"DATABASE_URL": f"sqlite:///{tmp}/b.db", "MASTER_KEY": secrets.token_bytes(32),
                          "OPERATOR_TOKEN": OP, "POLICIES_DIR": str(d), "APPRAISER": appraiser})
        try:
            c = app.test_client()
            tok = c.post("/admin/v0/tenants", json={"name": TENANT},
                         headers={"Authorization": f"Bearer {OP}"}).get_json()["token"]
            value = secrets.token_bytes(24)
            for p in (f"{TENANT}/key/listed", f"{TENANT}/key/unlisted"):
                r = c.put(f"/admin/v0/secrets/{p}", data=value, headers={"Authorization": f"Bearer {tok}"})
                assert r.status_code == 201, r.get_json()
            nonce = c.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp"}).get_json()["nonce"]
            key, jwk = new_tee_key()
            report = world.report(rep, guest_report_data(nonce, jwk))
            body = {"init-data": None, "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
                    "tee-evidence": {"primary_evidence": world.sim.trustee_json(report, include=("ARK", "ASK", "LEAF")),
                                     "additional_evidence": ""}}
            r = c.post("/kbs/v0/attest", data=json.dumps(body), content_type="application/json")
            assert r.status_code == 200, r.get_json()  # genuine, bound evidence always gets a token
            r = c.get(f"/kbs/v0/resource/{path}")
            if r.status_code == 200:
                assert guest_decrypt(r.get_json(), key) == value
                return True
            assert r.status_code == 401, (r.status_code, r.get_json())
            return False
        finally:
            app.extensions["firmgate"].engine.dispose()


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases())
def test_release_iff_every_rule_holds(world: World, case: tuple[Rep, Pol, bool]) -> None:
    rep, pol, listed = case
    path = f"{TENANT}/key/{'listed' if listed else 'unlisted'}"
    want = reference_release(rep, pol, listed)
    got = broker_releases(world, rep, pol, path)
    TALLY["examples"] += 1
    TALLY["released" if got else "denied"] += 1
    TALLY["wrong_release"] += int(got and not want)
    TALLY["wrong_denial"] += int(want and not got)
    assert got == want, f"broker {'released' if got else 'denied'}; the rules say {'release' if want else 'deny'}:\n" \
                        f"{rep}\n{policy_toml(pol)}"


@pytest.mark.slow
def test_property_reaches_release(world: World) -> None:
    """The generators can produce a release at all (else the property would hold vacuously)."""
    rep = Rep(fw="fw-a", vcpus=1, debug=False, migrate_ma=False, smt=False, single_socket=True, abi=(1, 55),
              guest_svn=3, vmpl=0, provisional=False, low_launch=False, host_data=bytes(32))
    pol = Pol(allowed={"fw-a": 2}, revoked=(), min_svn=2, shape_vcpus=(1,), products=("Milan",), signers=("VCEK",),
              vmpls=(0,), allow_provisional=False, allow_simulated=True, min_tcb=dict(SIM_TCB), min_launch_snp=23,
              host_data="initdata", unsafe_allow_debug=False, allow_migrate_ma=False, allow_smt=False,
              require_single_socket=True, min_abi=(1, 52), min_guest_svn=3, secret_firmware=("fw-a",),
              secret_min_svn=2)
    assert reference_release(rep, pol, True)
    assert broker_releases(world, rep, pol, f"{TENANT}/key/listed")
    assert not broker_releases(world, rep, pol, f"{TENANT}/key/unlisted")
