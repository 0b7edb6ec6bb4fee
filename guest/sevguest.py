"""Evidence from the older /dev/sev-guest ioctl SNP_GET_EXT_REPORT (Linux uapi <linux/sev-guest.h>).

uapi layout (x86-64, natural alignment), as in include/uapi/linux/sev-guest.h:

    struct snp_report_req      { __u8 user_data[64]; __u32 vmpl; __u8 rsvd[28]; }          96 bytes
    struct snp_ext_report_req  { struct snp_report_req data; __u64 certs_address;
                                 __u32 certs_len; }                                        112 bytes (padded)
    struct snp_report_resp     { __u8 data[4000]; }
    struct snp_guest_request_ioctl { __u8 msg_version; __u64 req_data; __u64 resp_data;
                                     union { __u64 exitinfo2; struct { __u32 fw_error, vmm_error; }; }; }
                                                                                           32 bytes
    SNP_GET_EXT_REPORT = _IOWR('S', 0x2, struct snp_guest_request_ioctl)

The response buffer holds MSG_REPORT_RSP (SNP ABI spec 56860, Table 25):
u32 status, u32 report_size, 24 reserved bytes, then the report. When the
certificate buffer is too small the ioctl fails, vmm_error is
SNP_GUEST_VMM_ERR_INVALID_LEN (1) and certs_len holds the size needed.

This path cannot run outside an SNP guest; its tests cover the struct packing only.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from .errors import EvidenceUnavailable

DEVICE = "/dev/sev-guest"
REPORT_REQ = struct.Struct("<64sI28s")                 # snp_report_req
EXT_REPORT_REQ = struct.Struct("<96sQI4x")             # snp_ext_report_req (+4 tail padding)
GUEST_REQUEST = struct.Struct("<B7xQQQ")               # snp_guest_request_ioctl
RESP_SIZE = 4000                                        # snp_report_resp.data
MSG_REPORT_RSP = struct.Struct("<II24x")               # status, report_size, reserved
REPORT_SIZE = 1184
PAGE = 4096
MAX_CERTS_LEN = 16 * PAGE                               # the kernel's SEV_FW_BLOB_MAX_SIZE is 16 KiB as well
VMM_ERR_INVALID_LEN = 1

_IOC_WRITE, _IOC_READ = 1, 2


def _iowr(kind: str, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr
    return ((_IOC_READ | _IOC_WRITE) << 30) | (size << 16) | (ord(kind) << 8) | nr


SNP_GET_EXT_REPORT = _iowr("S", 0x2, GUEST_REQUEST.size)


def pack_ext_request(user_data: bytes, vmpl: int, certs_address: int, certs_len: int) -> bytes:
    if len(user_data) != 64:
        raise ValueError("user_data must be 64 bytes")
    if not 0 <= vmpl <= 3:
        raise ValueError("vmpl must be 0..3")
    return EXT_REPORT_REQ.pack(REPORT_REQ.pack(user_data, vmpl, b"\0" * 28), certs_address, certs_len)


def pack_guest_request(req_addr: int, resp_addr: int, msg_version: int = 1) -> bytes:
    return GUEST_REQUEST.pack(msg_version, req_addr, resp_addr, 0)


def parse_response(resp: bytes) -> bytes:
    """The report inside MSG_REPORT_RSP, with its status and size checked."""
    if len(resp) < MSG_REPORT_RSP.size + REPORT_SIZE:
        raise EvidenceUnavailable(f"SNP report response is {len(resp)} bytes; too short")
    status, size = MSG_REPORT_RSP.unpack_from(resp)
    if status != 0:
        raise EvidenceUnavailable(f"SNP firmware returned status {status:#x} for the report request")
    if size != REPORT_SIZE:
        raise EvidenceUnavailable(f"SNP report response says report_size {size}, expected {REPORT_SIZE}")
    return resp[MSG_REPORT_RSP.size:MSG_REPORT_RSP.size + REPORT_SIZE]


def get_ext_report(report_data: bytes, *, vmpl: int = 0, device: str = DEVICE) -> tuple[bytes, bytes]:
    """(report, certificate table) from /dev/sev-guest; the table is b"" when the host has none."""
    try:
        fd = os.open(device, os.O_RDWR)
    except OSError as exc:
        raise EvidenceUnavailable(f"cannot open {device}: {exc.strerror or exc}") from exc
    try:
        certs_len = 4 * PAGE
        for _ in range(2):  # second round with the size the host asked for
            certs = ctypes.create_string_buffer(certs_len)
            resp = ctypes.create_string_buffer(RESP_SIZE)
            req = ctypes.create_string_buffer(pack_ext_request(report_data, vmpl, ctypes.addressof(certs), certs_len))
            ioc = bytearray(pack_guest_request(ctypes.addressof(req), ctypes.addressof(resp)))
            try:
                fcntl.ioctl(fd, SNP_GET_EXT_REPORT, ioc, True)
            except OSError as exc:
                _, _, _, exitinfo2 = GUEST_REQUEST.unpack(bytes(ioc))
                vmm_error = exitinfo2 >> 32
                if vmm_error == VMM_ERR_INVALID_LEN:
                    _, _, needed = EXT_REPORT_REQ.unpack(req.raw)
                    if not 0 < needed <= MAX_CERTS_LEN or needed % PAGE:
                        raise EvidenceUnavailable(f"host asks for a {needed}-byte certificate buffer") from exc
                    certs_len = needed
                    continue
                raise EvidenceUnavailable(f"SNP_GET_EXT_REPORT failed: {exc.strerror or exc} "
                                          f"(fw_error {exitinfo2 & 0xffffffff:#x}, vmm_error {vmm_error:#x})") from exc
            # The table ends with an all-zero entry; an all-zero first entry means the host gave none.
            table = certs.raw if any(certs.raw[:24]) else b""
            return parse_response(resp.raw), table
        raise EvidenceUnavailable("SNP_GET_EXT_REPORT: the host kept changing the certificate size")
    finally:
        os.close(fd)


def available(device: str = DEVICE) -> bool:
    try:
        return os.access(device, os.R_OK | os.W_OK)
    except OSError as exc:  # pragma: no cover - access() does not raise for a missing file
        return exc.errno != errno.ENOENT
