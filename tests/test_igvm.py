"""IGVM: the strict reader, the SNP launch digest under both zero-page rules,
and the oracle (OVMF wrapped as IGVM == sev-snp-measure's OVMF digest).

Known answers are chained with sev-snp-measure's GCTX (its PAGE_INFO code, not
ours) in the order QEMU's IGVM loader hands pages to KVM (backends/igvm.c);
docs/firmware.md "IGVM" derives each one.
"""
from __future__ import annotations

import struct
import zlib

import pytest
from sevsnpmeasure import guest as ssm_guest
from sevsnpmeasure.gctx import GCTX
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vmsa import VMSA

from tests.igvm_files import CODE_GPA, bsp_vmsa, code_page, minimal_snp_igvm, snp_writer
from verifier.errors import FirmwareError
from verifier.firmware import igvm as ig
from verifier.firmware.igvm_build import IgvmWriter
from verifier.firmware.image import require_snp_firmware
from verifier.measure.igvm import measure_igvm
from verifier.measure.launch import (
    _VMM_TYPES,
    KernelHashes,
    Shape,
    _Hashes,
    _InMemoryOVMF,
    measurement_table,
    shapes_product,
)
from verifier.measure.ovmf_igvm import igvm_from_ovmf

IMAGES = ["edk2-2022.11-OVMF.fd", "edk2-2025.02-OVMF.fd", "edk2-2026.08-OVMF.amdsev.fd"]
ZERO = bytes(4096)


def _refix_crc(data: bytes) -> bytes:
    """Recompute the fixed header's CRC-32 so a mutation reaches the header parser."""
    _, _, vh_off, vh_size, _, _ = ig.FIXED_HEADER.unpack_from(data, 0)
    fixed = bytearray(data[:24])
    fixed[20:24] = bytes(4)
    crc = zlib.crc32(data[vh_off:vh_off + vh_size], zlib.crc32(bytes(fixed)))
    return data[:20] + struct.pack("<I", crc) + data[24:]


# -- known answers ---------------------------------------------------------------------------------
def test_known_answer_zero_page_rules():
    f = minimal_snp_igvm()
    g = GCTX()
    g.update_normal_pages(CODE_GPA, code_page())
    g.update_normal_pages(CODE_GPA + 0x1000, ZERO)     # qemu: NORMAL page of zeros
    g.update_vmsa_page(bsp_vmsa())
    assert measure_igvm(f).digest == g.ld()
    g = GCTX()
    g.update_normal_pages(CODE_GPA, code_page())
    g.update_zero_pages(CODE_GPA + 0x1000, 4096)       # native-zero: SNP ZERO page
    g.update_vmsa_page(bsp_vmsa())
    m = measure_igvm(f, "native-zero")
    assert m.digest == g.ld() and m.rule == "native-zero"
    assert measure_igvm(f).digest != m.digest


def test_known_answer_parameter_insert_jumps_the_pending_region():
    """igvm.c batches PAGE_DATA and flushes a region only at the next PAGE_DATA that breaks it,
    while PARAMETER_INSERT goes to KVM at once: the insert is measured before the pages above it."""
    w = snp_writer().parameter_area(7, 0x2000).parameter(ig.VHT_VP_COUNT_PARAMETER, 7, 0)
    w.page(CODE_GPA, code_page(1)).page(CODE_GPA + 0x1000, code_page(2))
    w.parameter_insert(0x10000, 7)
    w.page(CODE_GPA + 0x2000, code_page(3))
    w.required_memory(0x100000, 0x4000)
    w.vp_context(bsp_vmsa(), 0)
    g = GCTX()
    g.update_unmeasured_pages(0x10000, 0x2000)          # the whole area, before the pending region
    g.update_normal_pages(CODE_GPA, code_page(1) + code_page(2))
    g.update_normal_pages(CODE_GPA + 0x2000, code_page(3))
    g.update_vmsa_page(bsp_vmsa())                      # REQUIRED_MEMORY measures nothing
    m = measure_igvm(w.to_bytes())
    assert m.digest == g.ld()
    assert m.page_counts == {"unmeasured": 2, "normal": 3, "vmsa": 1}


def test_known_answer_vmsas_last_in_vp_index_order_and_other_platforms_ignored():
    ap = bytes(VMSA(SevMode.SEV_SNP, 0xFFFFF000, 0x800F12, 0x1, _VMM_TYPES["qemu"]).ap_save_area)
    w = IgvmWriter().platform(mask=0x1).platform(mask=0x2, platform_type=ig.PLATFORM_TDX)
    w.guest_policy(0x30000, mask=0x1).guest_policy(0, mask=0x2)
    w.vp_context(ap, 1).vp_context(bsp_vmsa(), 0)          # VMSAs first in the file, vp 1 before vp 0
    w.page(CODE_GPA, code_page(), mask=0x2)                 # TDX only: not loaded for SNP
    w.page(CODE_GPA, code_page(5), mask=0x3)
    w.page(0x5000, None, data_type=ig.PAGE_SECRETS).page(0x6000, None, data_type=ig.PAGE_CPUID_DATA)
    w.page(0x7000, code_page(), flags=ig.FLAG_UNMEASURED)
    g = GCTX()
    g.update_normal_pages(CODE_GPA, code_page(5))
    g.update_secrets_page(0x5000)
    g.update_cpuid_page(0x6000)
    g.update_unmeasured_pages(0x7000, 4096)
    g.update_vmsa_page(bsp_vmsa())
    g.update_vmsa_page(ap)
    m = measure_igvm(w.to_bytes())
    assert m.digest == g.ld() and m.vcpus == 2


def test_two_mib_page_is_512_measured_pages():
    big = bytes(range(256)) * (ig.PAGE_2M // 256)
    f = snp_writer().page(0x200000, big, flags=ig.FLAG_2MB).vp_context(bsp_vmsa()).to_bytes()
    g = GCTX()
    g.update_normal_pages(0x200000, big)
    g.update_vmsa_page(bsp_vmsa())
    assert measure_igvm(f).digest == g.ld()


def test_id_block_ld_is_compared():
    f = minimal_snp_igvm()
    digest = measure_igvm(f).digest
    w = snp_writer().page(CODE_GPA, code_page()).page(CODE_GPA + 0x1000, None).id_block(digest)
    good = measure_igvm(w.vp_context(bsp_vmsa()).to_bytes())
    assert good.digest == digest and good.id_block_matches is True
    w = snp_writer().page(CODE_GPA, code_page()).page(CODE_GPA + 0x1000, None).id_block(bytes(48))
    assert measure_igvm(w.vp_context(bsp_vmsa()).to_bytes()).id_block_matches is False


# -- the oracle: OVMF wrapped as IGVM ---------------------------------------------------------------
def _qemu_rule_reference(fw: bytes, shape: Shape) -> bytes:
    """sev-snp-measure's own chain for this OVMF, with every ZERO page replaced by a NORMAL page of
    zeros: what the qemu rule must give for the wrapped file (how and why it differs: docs)."""
    class QemuZero(GCTX):  # type: ignore[misc]
        def update_zero_pages(self, gpa: int, length: int) -> None:
            self.update_normal_pages(gpa, bytes(length))
    g = QemuZero()
    ovmf = _InMemoryOVMF(fw)
    g.update_normal_pages(ovmf.gpa(), fw)
    hashes = _Hashes(shape.kernel_hashes) if shape.kernel_hashes else None
    ssm_guest.snp_update_metadata_pages(g, ovmf, hashes, _VMM_TYPES[shape.vmm])
    vmsa = VMSA(SevMode.SEV_SNP, ovmf.sev_es_reset_eip(), shape.vcpu_sig, shape.guest_features,
                _VMM_TYPES[shape.vmm])
    for page in vmsa.pages(shape.vcpus):
        g.update_vmsa_page(bytes(page))
    return bytes(g.ld())


def _check_oracle(fw: bytes, shape: Shape) -> None:
    f = igvm_from_ovmf(fw, shape)
    expected = measurement_table(fw, [shape])[shape]   # == the sev-snp-measure CLI (test_measure_crosscheck)
    native = measure_igvm(f, "native-zero")
    assert native.digest == expected, shape.key()
    qemu = measure_igvm(f, "qemu").digest
    assert qemu == _qemu_rule_reference(fw, shape), shape.key()
    # the rules differ exactly when a page without data is measured (not for gce's unmeasured SEC_MEM alone)
    assert (qemu != expected) == ("zero" in native.page_counts), shape.key()


@pytest.mark.parametrize("name", IMAGES)
def test_oracle_quick(firmware_dir, name):
    fw = (firmware_dir / name).read_bytes()
    for shape in (Shape(1, "EPYC-v4"), Shape(4, "EPYC-Milan", vmm="ec2"), Shape(2, "EPYC-Genoa", vmm="gce")):
        _check_oracle(fw, shape)


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGES)
def test_oracle_every_crosscheck_shape(firmware_dir, name):
    """Every shape of tests/test_measure_crosscheck.py (1,2,4,8 x 3 types x qemu, ec2), plus gce."""
    fw = (firmware_dir / name).read_bytes()
    for shape in shapes_product([1, 2, 4, 8], ["EPYC-v4", "EPYC-Milan", "EPYC-Genoa"], ["qemu", "ec2", "gce"]):
        _check_oracle(fw, shape)


def test_oracle_kernel_hashes(firmware_dir):
    fw = (firmware_dir / "edk2-2026.08-OVMF.amdsev.fd").read_bytes()
    kh = KernelHashes.from_bytes(b"kernel", b"initrd", "console=ttyS0")
    _check_oracle(fw, Shape(2, "EPYC-Milan", kernel_hashes=kh))


def test_measurement_table_fixes_the_shape(firmware_dir):
    fw = (firmware_dir / "edk2-2025.02-OVMF.fd").read_bytes()
    f = igvm_from_ovmf(fw, Shape(2, "EPYC-Milan"))
    table = measurement_table(f, shapes_product([1, 2, 4], ["EPYC-v4", "EPYC-Milan"]))
    assert list(table) == [Shape(2, "EPYC-Milan")]
    assert table[Shape(2, "EPYC-Milan")] == measure_igvm(f).digest
    with pytest.raises(FirmwareError, match="vcpus=2, vmm=qemu.*none of the 2 shapes"):
        measurement_table(f, [Shape(1, "EPYC-Milan"), Shape(2, "EPYC-v4")])


# -- refusals ------------------------------------------------------------------------------------
def _broken(edit) -> bytes:
    return edit(bytearray(minimal_snp_igvm()))


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"XGVM" + b[4:], "magic"),
    (lambda b: b[:4] + struct.pack("<I", 2) + b[8:], "format_version 2 is unstable"),
    (lambda b: b[:16] + struct.pack("<I", len(b) + 1) + b[20:], "total_file_size"),
    (lambda b: b[:20] + b"\0\0\0\0" + b[24:], "checksum"),
    (lambda b: bytes(b[:-1]), "total_file_size"),
    (lambda b: b[:10], "fixed header alone"),
])
def test_fixed_header_refusals(mutate, message):
    with pytest.raises(FirmwareError, match=message):
        ig.parse_igvm(_broken(mutate))


def _with(*build) -> bytes:
    w = snp_writer()
    for step in build:
        step(w)
    return w.to_bytes()


@pytest.mark.parametrize("build, message", [
    ([lambda w: w.raw(0x3FF, b"")], "unknown header type 0x3ff without the ignorable bit"),
    ([lambda w: w.raw(0x306, bytes(8))], "0x306 is reserved"),
    ([lambda w: w.raw(ig.VHT_PAGE_DATA, bytes(20))], "PAGE_DATA .*length 20, the structure is 24"),
    ([lambda w: w.page(0x1000, None), lambda w: w.platform(mask=0x2, platform_type=3)], "out of order"),
    ([lambda w: w.page(0x1001 & ~0, None)], "gpa 0x1001 is not 0x1000-aligned"),
    ([lambda w: w.page(0x1000, None, data_type=9)], "unknown data_type 0x9"),
    ([lambda w: w.page(0x1000, None, flags=0x10)], "reserved bits set"),
    ([lambda w: w.parameter_insert(0x1000, 3)], "parameter_area_index 3 was not declared"),
    ([lambda w: w.parameter_area(1, 0x1000), lambda w: w.parameter(ig.VHT_MEMORY_MAP, 1, 0x1000)],
     "byte_offset 0x1000 is outside"),
    ([lambda w: w.parameter_area(1, 0x1001)], "number_of_bytes 0x1001"),
])
def test_header_refusals(build, message):
    with pytest.raises(FirmwareError, match=message):
        ig.parse_igvm(_with(*build))


def test_ignorable_unknown_header_is_skipped():
    f = ig.parse_igvm(_with(lambda w: w.raw(ig.IGNORABLE | 0x3FF, b"abc"),
                            lambda w: w.page(0x1000, None), lambda w: w.vp_context(bsp_vmsa())))
    assert f.ignored_types == (ig.IGNORABLE | 0x3FF,)
    ig.snp_launch(f)


def test_page_offset_outside_file_is_refused():
    data = bytearray(minimal_snp_igvm())
    f = ig.parse_igvm(bytes(data))
    page = next(d for d in f.directives if isinstance(d, ig.PageData) and d.has_data)
    # PAGE_DATA file_offset field: find the header by its gpa, then patch file_offset past the end
    pos = bytes(data).index(struct.pack("<QI", page.gpa, page.mask))
    struct.pack_into("<I", data, pos + 12, len(data) - 100)
    with pytest.raises(FirmwareError, match="file_offset .* is outside the file data"):
        ig.parse_igvm(_refix_crc(bytes(data)))


@pytest.mark.parametrize("build, message", [
    (IgvmWriter().platform(mask=0x1, platform_type=ig.PLATFORM_TDX).guest_policy(0, 0x1), "no SEV_SNP platform"),
    (IgvmWriter().platform(mask=0x1).guest_policy(0x30000, 0x1).platform if False else
     IgvmWriter().platform(mask=0x1).platform(mask=0x2, platform_type=ig.PLATFORM_TDX)
     .guest_policy(0x30000, 0x1).page(0x1000, None, mask=0x2), "compatibility mask 0x1 selects no directive"),
    (IgvmWriter().platform(mask=0x1).page(0x1000, None), "0 GUEST_POLICY headers select it"),
    (snp_writer().page(0x1000, None), "no VP_CONTEXT"),
    (snp_writer().vp_context(bsp_vmsa(), 0).vp_context(bsp_vmsa(), 0), "two VP contexts for vp_index 0"),
    (snp_writer().vp_context(bsp_vmsa(), 1), r"expected 0..0"),
    (snp_writer().page(0x1000, None, flags=ig.FLAG_SHARED).vp_context(bsp_vmsa()), "shared page data"),
    (snp_writer().page(0x1000, None, data_type=ig.PAGE_SECRETS, flags=ig.FLAG_UNMEASURED)
     .vp_context(bsp_vmsa()), "SECRETS page must be one measured 4 KiB page"),
])
def test_snp_selection_refusals(build, message):
    with pytest.raises(FirmwareError, match=message):
        ig.snp_launch(ig.parse_igvm(build.to_bytes()))


@pytest.mark.parametrize("build, message", [
    (snp_writer().page(0x1000, None).page(0x1000, code_page()).vp_context(bsp_vmsa()), "load GPA 0x1000 twice"),
    (snp_writer().page(0x1000, None).vp_context(bsp_vmsa(), gpa=0x2000), "KVM always places the VMSA"),
    (snp_writer().page(0x1000, None).vp_context(bytes(4096)), "lacks SNP_ACTIVE"),
    (snp_writer().parameter_area(1, 0x1000).parameter_insert(0x1000, 1).parameter_insert(0x3000, 1)
     .vp_context(bsp_vmsa()), "inserted twice"),
])
def test_measurement_refusals(build, message):
    with pytest.raises(FirmwareError, match=message):
        measure_igvm(build.to_bytes())


def test_vmsa_values_kvm_would_not_keep_are_warned():
    w = snp_writer().page(0x1000, None).vp_context(bsp_vmsa(features=0x21))
    m = measure_igvm(w.to_bytes())
    assert any("SEV_FEATURES 0x21" in x for x in m.warnings)
    assert not measure_igvm(w.to_bytes(), "native-zero").warnings


def test_relocation_for_snp_is_refused():
    reloc = ig._RELOCATABLE_REGION.pack(0x1, 0, 0, 0, 0x1000, 0x100000, 0x1000, 0, 0x1000000)
    f = IgvmWriter().platform(mask=0x1).raw(ig.VHT_RELOCATABLE_REGION, reloc).guest_policy(0x30000, 0x1)
    with pytest.raises(FirmwareError, match="RELOCATABLE_REGION .*host would choose the GPAs"):
        ig.snp_launch(ig.parse_igvm(f.page(0x1000, None).vp_context(bsp_vmsa()).to_bytes()))


def test_require_snp_firmware_reads_igvm():
    assert require_snp_firmware(minimal_snp_igvm()).kind == "igvm"
    with pytest.raises(FirmwareError, match="IGVM fixed header"):
        require_snp_firmware(b"IGVM" + struct.pack("<I", 1) + bytes(4088))


def test_id_block_key_digests_are_what_the_report_carries():
    """ID_KEY_DIGEST / AUTHOR_KEY_DIGEST: SHA-384 of the SNP ABI public-key structure (0x404 bytes:
    u32 curve (2 = P-384), QX and QY as 72-byte little-endian, zeros), as QEMU builds it from IGVM's."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import ec
    keys = []
    for _ in range(2):
        pub = ec.generate_private_key(ec.SECP384R1()).public_key().public_numbers()
        keys.append((2, pub.x.to_bytes(72, "little"), pub.y.to_bytes(72, "little")))
    digest = measure_igvm(minimal_snp_igvm()).digest
    w = snp_writer().page(CODE_GPA, code_page()).page(CODE_GPA + 0x1000, None)
    w.id_block(digest, family_id=b"F" * 16, image_id=b"I" * 16, guest_svn=7, id_key=keys[0], author_key=keys[1])
    m = measure_igvm(w.vp_context(bsp_vmsa()).to_bytes())
    expect = [hashlib.sha384(struct.pack("<I", c) + x + y + bytes(0x404 - 148)).hexdigest() for c, x, y in keys]
    doc = m.to_dict()["id_block"]
    assert m.id_block_matches is True
    assert doc == {"family_id": (b"F" * 16).hex(), "image_id": (b"I" * 16).hex(), "guest_svn": 7,
                   "id_key_digest": expect[0], "author_key_digest": expect[1]}
