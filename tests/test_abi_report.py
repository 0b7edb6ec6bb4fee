"""Report parsing (verifier.abi): real reports from ../shared and hand-made layout errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from verifier.abi.fields import GuestPolicy, KeyInfo, PlatformInfo, Product, SigningKey, TcbVersion, product_from_cpuid
from verifier.abi.report import LAYOUT, REPORT_SIZE, AttestationReport, encode_fields
from verifier.errors import MalformedReport, UnsupportedReportVersion

REAL = {
    "virtee-milan-v2": ("report.bin", 2, None, SigningKey.VCEK),
    "gosevguest-milan-v2-debug": ("report.bin", 2, None, SigningKey.VCEK),
    "trustee-milan-v2": ("report.bin", 2, None, SigningKey.VCEK),
    "trustee-aws-vlek-milan-v3": ("report.bin", 3, Product.MILAN, SigningKey.VLEK),
    "tav-genoa-v3": ("report.bin", 3, Product.GENOA, SigningKey.VCEK),
    "veraison-tsm-genoa-v3": ("outblob.bin", 3, Product.GENOA, SigningKey.VCEK),
}


@pytest.mark.parametrize("case", sorted(REAL))
def test_real_reports_parse(snp_vectors: Path, case: str) -> None:
    name, version, product, signer = REAL[case]
    raw = (snp_vectors / case / name).read_bytes()
    r = AttestationReport.from_bytes(raw)
    assert r.raw == raw and r.signed_bytes == raw[:0x2A0]
    assert r.version == version
    assert r.cpuid_product == product
    assert r.key_info.signing_key is signer
    assert (r.cpuid_fam_id is None) == (version == 2)
    assert r.launch_mit_vector is None and r.current_mit_vector is None
    assert r.signature_algo == 1
    assert r.signature_r > 0 and r.signature_s > 0
    assert len(r.report_data) == 64 and len(r.measurement) == 48 and len(r.chip_id) == 64


def test_debug_bit_and_vmpl(snp_vectors: Path) -> None:
    dbg = AttestationReport.from_bytes((snp_vectors / "gosevguest-milan-v2-debug/report.bin").read_bytes())
    assert dbg.policy.debug is True
    vlek = AttestationReport.from_bytes((snp_vectors / "trustee-aws-vlek-milan-v3/report.bin").read_bytes())
    assert vlek.policy.debug is False and vlek.vmpl == 1
    tcb = vlek.tcb("current", "Milan")
    assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode, tcb.fmc) == (4, 0, 24, 220, None)


def _minimal(version: int = 3, **over: int | bytes) -> bytearray:
    fields: dict[str, int | bytes] = {"version": version, "signature_algo": 1, "policy": 0x30000}
    fields.update(over)
    return encode_fields(fields)


def test_minimal_roundtrip_and_v5_fields() -> None:
    r = AttestationReport.from_bytes(bytes(_minimal(5, launch_mit_vector=3, current_mit_vector=7)))
    assert (r.launch_mit_vector, r.current_mit_vector) == (3, 7)


@pytest.mark.parametrize("size", [0, 1, REPORT_SIZE - 1, REPORT_SIZE + 1, 4096])
def test_wrong_size(size: int) -> None:
    with pytest.raises(MalformedReport, match="exactly 1184 bytes"):
        AttestationReport.from_bytes(bytes(size))


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
def test_unknown_version(version: int) -> None:
    with pytest.raises(UnsupportedReportVersion):
        AttestationReport.from_bytes(bytes(_minimal(version)))


@pytest.mark.parametrize("offset", [0x04C, 0x18B, 0x19F, 0x1EB, 0x1EF, 0x208, 0x29F, 0x2D0, 0x318, 0x32F, 0x330, 0x49F])
def test_reserved_bytes_must_be_zero(offset: int) -> None:
    buf = _minimal(5)
    buf[offset] = 1
    with pytest.raises(MalformedReport, match="not zero|must be zero"):
        AttestationReport.from_bytes(bytes(buf))


def test_v2_cpuid_and_v3_mit_are_reserved() -> None:
    with pytest.raises(MalformedReport, match="CPUID"):
        AttestationReport.from_bytes(bytes(_minimal(2, cpuid_fam_id=0x19)))
    with pytest.raises(MalformedReport, match="mitigation"):
        AttestationReport.from_bytes(bytes(_minimal(3, launch_mit_vector=1)))


@pytest.mark.parametrize("over,match", [
    ({"signature_algo": 2}, "SIGNATURE_ALGO"),
    ({"key_info": 7 << 2}, "unsigned"),
    ({"key_info": 3 << 2}, "SIGNING_KEY is 3"),
    ({"policy": 0x10000}, "bit 17"),
])
def test_layout_rules(over: dict[str, int], match: str) -> None:
    with pytest.raises(MalformedReport, match=match):
        AttestationReport.from_bytes(bytes(_minimal(3, **over)))


def test_tcb_layouts() -> None:
    milan = TcbVersion.encode("Milan", bootloader=3, tee=0, snp=8, microcode=115)
    assert milan == 0x7308000000000003
    turin = TcbVersion.encode(Product.TURIN, bootloader=1, tee=2, snp=3, microcode=4, fmc=5)
    t = TcbVersion.from_u64(turin, "Turin")
    assert (t.fmc, t.bootloader, t.tee, t.snp, t.microcode) == (5, 1, 2, 3, 4)
    with pytest.raises(MalformedReport, match="reserved bytes 2..5"):
        TcbVersion.from_u64(turin, "Genoa")  # Turin's snp byte lands in Genoa's reserved range
    a = TcbVersion.from_u64(milan, "Milan")
    b = TcbVersion(bootloader=3, tee=1, snp=8, microcode=114)
    assert not a.le(b) and not b.le(a) and a.le(a)


@pytest.mark.parametrize("over,word,bits", [
    ({"key_info": 1 << 5 | 1 << 31}, "key_info", [5, 31]),
    ({"policy": 0x30000 | 1 << 26 | 1 << 63}, "policy", [26, 63]),
    ({"platform_info": 1 << 8 | 1 << 63}, "platform_info", [8, 63]),
])
def test_unknown_flag_bits_parse_and_are_kept(over: dict[str, int], word: str, bits: list[int]) -> None:
    # AMD keeps adding flag bits: a set bit with no name yet is data for the checks, never a parse error.
    r = AttestationReport.from_bytes(bytes(_minimal(3, **over)))
    assert list(getattr(r, word).unknown_bits) == bits
    assert r.to_dict()[word]["unknown_bits"] == bits


def test_turin_platform_info_bit6_is_named() -> None:
    # Current Turin firmware sets bit 6 (PLATFORM_INFO 0x65 was refused before): named, not unknown.
    pi = PlatformInfo.from_u64(0x65)
    assert pi.iommu_write_safe and pi.smt_en and pi.ecc_en and pi.alias_check_complete and pi.unknown_bits == ()
    assert pi.to_dict()["iommu_write_safe"] is True and pi.to_dict()["unknown_bits"] == []


def test_mitigation_vectors_decoded_in_v5() -> None:
    r = AttestationReport.from_bytes(bytes(_minimal(5, launch_mit_vector=0b101, current_mit_vector=1 << 63)))
    d = r.to_dict()
    assert d["launch_mit_vector"] == {"raw": "0x0000000000000005", "bits": [0, 2]}
    assert d["current_mit_vector"]["bits"] == [63]
    assert AttestationReport.from_bytes(bytes(_minimal(3))).to_dict()["launch_mit_vector"] is None


def test_bit_decoders() -> None:
    p = GuestPolicy.from_u64(0x30000 | 1 << 19 | 1 << 18 | 0x0102)
    assert p.debug and p.migrate_ma and p.smt and (p.abi_major, p.abi_minor) == (1, 2) and not p.single_socket
    pi = PlatformInfo.from_u64(0b1010_0101)
    assert pi.smt_en and pi.ecc_en and pi.alias_check_complete and pi.tio_en and not pi.tsme_en
    k = KeyInfo.from_u32(0b00110)
    assert k.mask_chip_key and not k.author_key_en and k.signing_key is SigningKey.VLEK


@pytest.mark.parametrize("fam,mod,expect", [
    (0x19, 0x01, Product.MILAN), (0x19, 0x11, Product.GENOA), (0x19, 0xA0, Product.GENOA),
    (0x1A, 0x02, Product.TURIN), (0x19, 0x20, None), (0x1A, 0x12, None), (0x17, 0x31, None),
])
def test_product_from_cpuid(fam: int, mod: int, expect: Product | None) -> None:
    assert product_from_cpuid(fam, mod) == expect


def test_product_names() -> None:
    assert Product.parse("Milan-B0") is Product.MILAN and Product.parse("genoa") is Product.GENOA
    assert Product.MILAN == "Milan"
    with pytest.raises(MalformedReport):
        Product.parse("Rome")


def test_layout_table_covers_signed_part_without_overlap() -> None:
    spans = sorted((off, off + size) for off, size, _ in LAYOUT.values())
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0
