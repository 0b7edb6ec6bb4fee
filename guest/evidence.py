"""Where the guest's report comes from, and the evidence JSON it sends.

Sources: configfs-tsm (preferred; Linux 6.7+) or the /dev/sev-guest ioctl.
Shapes: Trustee's SnpEvidence (default: the same JSON a real CoCo guest sends,
so the broker's path for unmodified guests is exercised) or firmgate's own
`{"report", "cert_table"}` (base64; keeps the table exactly as the host gave it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from verifier.abi.certtable import parse_cert_table
from verifier.errors import FirmgateError

from . import sevguest, tsm
from .errors import EvidenceUnavailable

REPORT_SIZE = 1184
REPORT_DATA_OFFSET, REPORT_DATA_SIZE = 0x50, 64   # SNP ABI spec 56860, Table 23


class ReportSource(Protocol):
    name: str

    def get(self, report_data: bytes) -> tuple[bytes, bytes]:
        """(raw report, GUID certificate table or b"") for these 64 bytes of REPORT_DATA."""


@dataclass
class TsmSource:
    backend: tsm.TsmBackend
    name: str = "configfs-tsm"

    def get(self, report_data: bytes) -> tuple[bytes, bytes]:
        r = tsm.get_report(report_data, self.backend)
        if r.provider and r.provider != "sev_guest":
            raise EvidenceUnavailable(f"configfs-tsm provider is {r.provider!r}, not sev_guest (SEV-SNP)")
        return r.outblob, r.auxblob


@dataclass
class SevGuestSource:
    device: str = sevguest.DEVICE
    name: str = "/dev/sev-guest"

    def get(self, report_data: bytes) -> tuple[bytes, bytes]:
        return sevguest.get_ext_report(report_data, device=self.device)


def default_source(tsm_root: str | None = None) -> ReportSource:
    """configfs-tsm when its tree exists (or `tsm_root` is given), else /dev/sev-guest."""
    fs = tsm.FsTsmBackend(tsm_root or tsm.DEFAULT_ROOT)
    if tsm_root is not None or fs.available():
        return TsmSource(fs)
    if sevguest.available():
        return SevGuestSource()
    raise EvidenceUnavailable(f"no SEV-SNP evidence device: neither {tsm.DEFAULT_ROOT} nor {sevguest.DEVICE} "
                              "is usable (is this an SNP guest? is configfs mounted? are you root?)")


def check_report(report: bytes, report_data: bytes) -> None:
    """The report is a report and carries our REPORT_DATA (a racing writer or a confused host otherwise)."""
    if len(report) != REPORT_SIZE:
        raise EvidenceUnavailable(f"the report is {len(report)} bytes, not {REPORT_SIZE}")
    got = report[REPORT_DATA_OFFSET:REPORT_DATA_OFFSET + REPORT_DATA_SIZE]
    if got != report_data:
        raise EvidenceUnavailable("the report does not carry the REPORT_DATA we asked for "
                                  f"(got {got[:16].hex()}…, asked {report_data[:16].hex()}…)")


def _der(data: bytes) -> bytes:
    if data.lstrip()[:5] == b"-----":
        return x509.load_pem_x509_certificate(data.strip(b"\0")).public_bytes(Encoding.DER)
    return data


def cert_chain(table: bytes) -> list[tuple[str, bytes]] | None:
    """The certificate table as SnpEvidence cert_chain pairs (DER), None when the host gave none."""
    if not table or not any(table[:24]):
        return None
    try:
        entries = parse_cert_table(table)
        out = [(e.kind, _der(e.data)) for e in entries if e.kind in ("ARK", "ASK", "VCEK", "VLEK")]
    except (FirmgateError, ValueError) as exc:
        raise EvidenceUnavailable(f"the host's certificate table does not parse: {exc}") from exc
    order = {"ARK": 0, "ASK": 1, "VCEK": 2, "VLEK": 3}  # sev's CertType order
    return sorted(out, key=lambda kv: order[kv[0]]) or None


def evidence_json(report: bytes, table: bytes, shape: str = "snp") -> dict[str, Any]:
    if shape == "snp":
        from verifier.evidence import snp_evidence_json
        return snp_evidence_json(report, cert_chain(table))
    if shape == "firmgate":
        from verifier.evidence import firmgate_evidence_json
        return firmgate_evidence_json(report, table)
    raise ValueError(f"evidence shape {shape!r} is not snp or firmgate")
