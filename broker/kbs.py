"""The Trustee KBS protocol 0.4.0 routes: /auth, /attest, /resource (KBS-FACTS sections 2-5).

Tenant selection (docs/protocol.md): the resource path's repository is the
tenant. /auth and /attest carry no tenant for an unmodified guest, so /attest
verifies the evidence (chain, signature, nonce/key binding, init-data) and
appraises it against the hinted tenant (`extra-params.tenant` at /auth) or every
tenant's policy; /resource then uses the repository tenant's appraisal under its
CURRENT policy, re-appraising when the policy changed since.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from email.utils import formatdate
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy.exc import IntegrityError

from verifier.errors import FirmgateError
from verifier.evidence import Evidence, firmgate_evidence_json
from verifier.verdict import CheckResult, Outcome, Verdict

from . import audit, metrics, nonces, tenant_select, vault
from .appraisal import Attested
from .db import now_ms
from .errors import ApiError
from .hotsql import committed
from .jwe import encrypt, load_tee_pubkey
from .limits import json_body, json_larger_than, valid_resource, valid_tenant
from .nonces import Db
from .release import decide, public_denial, summarize_failures
from .runtime_data import check_host_data, check_report_data, expected_report_data, initdata_host_data
from .secretbox import SecretDecryptError
from .state import BrokerState, get_db, get_orm, state, sync_firmware
from .tokens import TokenError, ear_claims, tee_pubkey_from_claims

bp = Blueprint("kbs", __name__, url_prefix="/kbs/v0")
log = logging.getLogger(__name__)

PROTOCOL_VERSION = "0.4.0"
SUPPORTED_TEES = nonces.TEES
COOKIE = "kbs-session-id"
SESSION_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_INITDATA_BYTES = 16 * 1024  # it goes into the token too
MAX_JWK_BYTES = 4096  # an RSA-8192 JWK is ~2.8 KB; the key goes into every token
# The largest add-on our guest may send inside additional_evidence (two 4 MiB OVMF builds; larger
# firmware goes through the admin upload), and the cap on additional_evidence that fits it: its
# base64 plus the JSON around it and room for device evidence (docs/protocol.md).
MAX_GUEST_ADDON = 8 * 1024 * 1024
MAX_ADDITIONAL_EVIDENCE = 4 * -(-MAX_GUEST_ADDON // 3) + 64 * 1024  # characters: 11,250,348
FIRMWARE_KEY = "firmgate-firmware"  # our guest's key inside additional_evidence (docs/protocol.md)


def _set_cookie(resp: Response, session_id: str, expires_ms: int) -> None:
    # Trustee's exact form: no Path/Secure/HttpOnly (KBS-FACTS section 5).
    resp.headers.add("Set-Cookie", f"{COOKIE}={session_id}; Expires={formatdate(expires_ms / 1000, usegmt=True)}")


def _deny(db: Db, variant: str, reason: str, *, event: str, tenant: str | None = None,
          session_id: str | None = None, resource: str | None = None, verdict: Verdict | None = None,
          verdict_text: str | None = None, measurement: str | None = None) -> ApiError:
    """Audit a denial (committing whatever the caller wrote with it) and return the error to raise."""
    audit.record(db, event=event, outcome="denied", reason=reason, tenant=tenant, session_id=session_id,
                 resource=resource, verdict=verdict, verdict_text=verdict_text, measurement=measurement)
    metrics.denied(event, variant, tenant)
    return ApiError(variant, reason)


@bp.post("/auth")
def auth() -> Response:
    body = json_body()
    if body.get("version") != PROTOCOL_VERSION:
        raise _deny(get_db(), "AttestationError", f"KBS Client Protocol Version Mismatch: this broker speaks "
                    f"{PROTOCOL_VERSION}, the client sent {str(body.get('version'))[:32]!r}", event="auth")
    tee = body.get("tee")
    if tee not in SUPPORTED_TEES:
        raise _deny(get_db(), "AttestationError", f"tee {str(tee)[:32]!r} is not supported (supported: "
                    f"{', '.join(SUPPORTED_TEES)})", event="auth")
    extra = body.get("extra-params")
    hint = extra.get("tenant") if isinstance(extra, dict) else None
    if hint is not None and not valid_tenant(hint):
        raise ApiError("AttestationError", "extra-params.tenant is not a valid tenant name")
    # Nothing is stored: the nonce carries the challenge, authenticated to the cookie (broker/nonces.py).
    new = nonces.new_session(state().nonce_key, str(tee), int(current_app.config["SESSION_TTL"]), hint)
    metrics.count_event("auth", "ok")
    resp = jsonify({"nonce": new.nonce, "extra-params": ""})
    _set_cookie(resp, new.id, new.expires_at)
    return resp


def _cookie_session_id() -> str | None:
    sid = request.cookies.get(COOKIE)
    return sid if sid and SESSION_ID_RE.fullmatch(sid) else None


def _parse_attestation(body: dict[str, Any]) -> tuple[Any, dict[str, Any], str, dict[str, Any], Any]:
    """(init-data, runtime-data, additional_evidence, tee-pubkey, primary_evidence) or ApiError.
    The structure and size of every member only: nothing here costs more than a length."""
    rd, te = body.get("runtime-data"), body.get("tee-evidence")
    if not isinstance(rd, dict) or not isinstance(rd.get("nonce"), str) or not isinstance(rd.get("tee-pubkey"), dict):
        raise ApiError("SerdeError", "runtime-data must be {\"nonce\": string, \"tee-pubkey\": JWK}")
    if len(rd["nonce"]) > nonces.MAX_NONCE_CHARS:  # ours: 44 characters, up to 128 with a tenant hint
        raise ApiError("SerdeError", f"runtime-data.nonce is longer than {nonces.MAX_NONCE_CHARS} characters")
    if not isinstance(te, dict) or not isinstance(te.get("primary_evidence"), dict):
        raise ApiError("SerdeError", "tee-evidence must be {\"primary_evidence\": object, \"additional_evidence\"}")
    additional = te.get("additional_evidence", "")
    if not isinstance(additional, str):
        raise ApiError("SerdeError", "tee-evidence.additional_evidence must be a string")
    if len(additional) > MAX_ADDITIONAL_EVIDENCE:
        raise ApiError("SerdeError", f"tee-evidence.additional_evidence is longer than {MAX_ADDITIONAL_EVIDENCE} "
                       f"characters (an add-on of at most {MAX_GUEST_ADDON // (1024 * 1024)} MiB)")
    if body.get("init-data") is not None and json_larger_than(body["init-data"], MAX_INITDATA_BYTES):
        raise ApiError("SerdeError", f"init-data is larger than {MAX_INITDATA_BYTES} bytes")
    if json_larger_than(rd["tee-pubkey"], MAX_JWK_BYTES):
        raise ApiError("SerdeError", f"tee-pubkey is larger than {MAX_JWK_BYTES} bytes")
    return body.get("init-data"), rd, additional, rd["tee-pubkey"], te["primary_evidence"]


def _guest_firmware(st: BrokerState, additional: str, session_id: str) -> None:
    """Firmware our guest client sent inside additional_evidence (bound by REPORT_DATA)."""
    if not additional:
        return
    try:
        extra = json.loads(additional)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep for the JSON decoder
        return  # device evidence in some other shape: not ours to judge here
    if not isinstance(extra, dict) or FIRMWARE_KEY not in extra:
        return
    item = extra[FIRMWARE_KEY]
    blob_b64 = item.get("addon") if isinstance(item, dict) else None
    if not isinstance(blob_b64, str):
        raise ApiError("AttestationError", f"additional_evidence.{FIRMWARE_KEY} must be {{\"addon\": base64}}")
    # Optional: a publisher's endorsement of the add-on's firmware, when the add-on does not carry it.
    end_b64 = item.get("endorsement")
    if end_b64 is not None and not isinstance(end_b64, str):
        raise ApiError("AttestationError", f"additional_evidence.{FIRMWARE_KEY}.endorsement must be base64")
    try:
        blob = base64.b64decode(blob_b64, validate=True)
        endorsement = base64.b64decode(end_b64, validate=True) if end_b64 else None
    except (binascii.Error, ValueError):
        raise ApiError("AttestationError", f"additional_evidence.{FIRMWARE_KEY} is not base64") from None
    if st.appraiser is None:
        return
    from .firmware_store import store_firmware
    if endorsement is not None:
        if endorsement[:1] != b"\xd2":
            raise ApiError("AttestationError", f"additional_evidence.{FIRMWARE_KEY}.endorsement is no COSE_Sign1")
        store_firmware(st, get_orm(), endorsement, source=f"guest:{session_id}")
    store_firmware(st, get_orm(), blob, source=f"guest:{session_id}")


def _public_firmware_refusal(exc: FirmgateError) -> str:
    """What the guest (and the tenant it names) reads when its firmware or endorsement is refused:
    refusals that name a policy's publisher rule, or say whether any tenant trusts a signer, become
    words that depend only on what the guest sent (docs/security.md RT-3)."""
    from verifier.appraise.store import FirmwareNotAdmitted
    from verifier.endorse.admit import EndorsementRefused
    if isinstance(exc, FirmwareNotAdmitted):
        return exc.public
    if isinstance(exc, EndorsementRefused):
        return (f"the endorsement in additional_evidence.{FIRMWARE_KEY} is not admitted by any policy "
                "(the reason is in the operator's audit log)")
    return exc.diagnostics()


def _appraisal(st: BrokerState, attested: Attested, session_id: str, tenant: str, policy_id: str,
               expected: bytes, host: bytes | None) -> tuple[Verdict, str, dict[str, Any]]:
    """Appraise for `tenant`: the verdict, its JSON, and its row for the session's verdict cache."""
    assert st.appraiser is not None
    verdict = st.appraiser.appraise(attested, tenant, expected, host)
    text = audit.verdict_json(verdict)
    return verdict, text, {"session_id": session_id, "tenant": tenant, "policy_id": policy_id,
                           "accepted": verdict.accepted, "verdict_json": text, "created_at": now_ms()}


def _stored_evidence(handle: Any, primary: Any) -> str:
    """The evidence kept for re-appraisal under a later policy: the report and certificates as
    firmgate JSON (~6 KB; Trustee's integer arrays are ~25 KB per session), or the JSON as sent
    when it holds what that form cannot (CRLs) or comes from another appraiser."""
    if isinstance(handle, Evidence) and not handle.crls:
        return orjson.dumps(firmgate_evidence_json(handle.report.raw, certs=handle.certs)).decode()
    return orjson.dumps(primary).decode()


def _trust_vector(verdict: Verdict | None) -> dict[str, int]:
    """The token's AR4SI vector: the appraisal's own for an accepted verdict. A denied one gets the
    generic vector below: any genuine VM may name any tenant, and the appraisal's vector would tell
    it which of that tenant's rules its launch met (its firmware is the tenant's, its binding is
    not...). The owner's audit log keeps the verdict with every check."""
    if verdict is not None and verdict.accepted and isinstance(verdict.facts.get("trust_vector"), dict):
        return {str(k): int(v) for k, v in verdict.facts["trust_vector"].items()}
    # AR4SI: 2 = affirming claims; hardware 2 = genuine; 97/33 = contraindicated/unrecognised.
    ok = verdict is not None and verdict.accepted
    return {"instance-identity": 2 if ok else 97, "configuration": 2 if ok else 97,
            "executables": 2 if ok else 33, "file-system": 0, "hardware": 2, "runtime-opaque": 2 if ok else 0,
            "storage-opaque": 0, "sourced-data": 0}


@bp.post("/attest")
def attest() -> Response:
    st, db = state(), get_db()
    sid = _cookie_session_id()
    if sid is None:
        raise _deny(db, "AttestationError", "no kbs-session-id cookie: call /auth first", event="attest")
    request.max_content_length = int(current_app.config["ATTEST_MAX_BYTES"])
    body = json_body()
    init_data, runtime_data, additional, jwk, primary = _parse_attestation(body)
    if now_ms() % 50 == 0:  # now and then, not on every request
        cfg = current_app.config
        nonces.purge_expired(db, int(cfg["AUDIT_RETENTION_DAYS"]), int(cfg["AUTH_AUDIT_RETENTION_HOURS"]))
    # This session's nonce (its tag checks out for the cookie, not expired), spent and committed: the
    # nonce is spent whatever happens next. runtime-data.nonce is then the session nonce.
    consumed = nonces.consume(db, st.nonce_key, sid, runtime_data["nonce"])
    hint = consumed.tenant_hint
    if not consumed.ok:
        raise _deny(db, "AttestationError", consumed.reason, event="attest", session_id=sid)

    def reject(reason: str) -> ApiError:
        # Before the evidence verified, nothing it says is a fact and the tenant hint is only the
        # caller's word: an operator-only row (no tenant, no measurement; short retention and a
        # bounded, escaped reason, see audit.row), never a row in a tenant's log.
        nonces.mark_failed(db, sid)  # committed by _deny, with the denial's audit row
        return _deny(db, "AttestationError", reason, event="attest", session_id=sid)

    # Cheapest first: the key, the init-data (16 KiB at most), the report's own size and shape;
    # only then the REPORT_DATA binding, which hashes megabytes of additional evidence.
    try:
        load_tee_pubkey(jwk)
        host_expected = initdata_host_data(init_data)
    except FirmgateError as exc:
        raise reject(exc.diagnostics()) from None
    if st.appraiser is None:
        raise reject(st.appraiser_error or "appraisal unavailable")
    try:
        parsed = st.appraiser.parse(primary)
    except FirmgateError as exc:
        raise reject(f"evidence rejected: {exc.diagnostics()}") from None
    try:
        # The bindings before the chain: a replayed or foreign report stops here.
        expected = expected_report_data(consumed.nonce, jwk, additional)
        check_report_data(parsed.report_data, expected)
        if host_expected is not None:
            check_host_data(parsed.host_data, host_expected)
    except FirmgateError as exc:
        raise reject(exc.diagnostics()) from None
    try:
        attested = st.appraiser.verify(parsed)
    except FirmgateError as exc:
        raise reject(f"evidence rejected: {exc.diagnostics()}") from None
    measurement = attested.measurement.hex()  # a fact from here on: the signature covers it
    # Others' uploads first (an endorsement kept through another replica may admit the guest's firmware).
    sync_firmware(st, db)
    try:
        _guest_firmware(st, additional, sid)
    except FirmgateError as exc:
        nonces.mark_failed(db, sid)
        # The full reason may name tenants' publisher rules: the operator's rows only (RT-3).
        public, full = _public_firmware_refusal(exc), exc.diagnostics()
        if hint is not None and public != full:
            audit.record(db, event="attest", outcome="denied", reason=full, tenant=None, session_id=sid,
                         measurement=measurement, commit=False)
        denial = _deny(db, "AttestationError", full if hint is None else public, event="attest",
                       session_id=sid, tenant=hint, measurement=measurement)
        denial.detail = public
        raise denial from None

    # Appraise for the hinted tenant, or for the tenants whose reference tables hold this
    # MEASUREMENT (an unmodified guest names none; broker/tenant_select.py).
    if hint and not tenant_select.wait_for_tenant(st, hint):
        raise _undecided(db, sid, f"tenant {hint}'s policy is still loading; retry", measurement)
    verdicts: list[Verdict] = []
    verdict_rows: list[dict[str, Any]] = []
    audit_rows: list[dict[str, Any]] = []
    appraised: set[str] = set()

    def appraise_for(candidates: list[str]) -> None:
        assert st.appraiser is not None
        for tenant in candidates:
            pid = st.appraiser.policy_id(tenant)
            if pid is None or tenant in appraised:
                continue
            appraised.add(tenant)
            verdict, text, vrow = _appraisal(st, attested, sid, tenant, pid, expected, host_expected)
            verdicts.append(verdict)
            verdict_rows.append(vrow)
            if verdict.accepted or tenant == hint:
                # A tenant sees attestations its policy accepted, or that named it; not other VMs' noise.
                metrics.appraised(tenant, verdict)
                audit_rows.append(audit.row(
                    event="attest", outcome="ok" if verdict.accepted else "denied",
                    reason="accepted by policy" if verdict.accepted else summarize_failures(verdict),
                    tenant=tenant, session_id=sid, verdict=verdict, verdict_text=text, measurement=measurement))

    appraise_for(tenant_select.candidates(st, attested, hint))
    if not hint:
        # The owner's policy may be among those not loaded yet: appraise tenants as they load, until
        # one accepts or all are loaded (bounded), rather than deny for a policy not read yet.
        waiting = tenant_select.LoadWait(st)
        while not any(v.accepted for v in verdicts) and waiting.more():
            appraise_for(tenant_select.candidates(st, attested, hint))
        if waiting.timed_out:
            raise _undecided(db, sid, "tenant policies are still loading; retry", measurement)
    accepted = sorted((v for v in verdicts if v.accepted), key=lambda v: len(v.warnings))
    best = accepted[0] if accepted else (verdicts[0] if hint and verdicts else None)
    status = "contraindicated"
    if best is not None and best.accepted:
        status = "warning" if best.warnings else "affirming"

    ttl = int(current_app.config["TOKEN_TTL"])
    claims = ear_claims(session_id=sid, status=status, trust_vector=_trust_vector(best),
                        policy_id="firmgate:per-tenant",
                        # What REPORT_DATA bound, minus additional evidence (it may carry megabytes of firmware).
                        runtime_data={"nonce": consumed.nonce, "tee-pubkey": jwk}, report_data=expected,
                        init_data=init_data, host_data=attested.host_data, snp=attested.snp_claims, ttl_s=ttl)
    token = st.token_key.sign(claims)
    expires_at = max(consumed.expires_at, claims["exp"] * 1000)
    # The session's new state, its verdicts and the audit rows: one transaction (one round trip on PostgreSQL).
    audit_rows.append(audit.row(event="attest", outcome="ok", reason=f"evidence verified; token status {status}",
                                tenant=None, session_id=sid, measurement=measurement))
    stored = _stored_evidence(parsed.handle, primary)
    with committed(db):
        nonces.mark_attested(db, sid, {
            "evidence_json": stored,
            "tee_pubkey_json": orjson.dumps(jwk).decode(),
            "expected_report_data": expected.hex(),
            "expected_host_data": host_expected.hex() if host_expected is not None else None,
            "measurement": measurement, "token_jti": sid, "expires_at": expires_at})
        nonces.add_verdicts(db, verdict_rows)
        audit.write(db, audit_rows, commit=False)
    metrics.attested(status)
    resp = jsonify({"token": token})
    _set_cookie(resp, sid, expires_at)
    return resp


def _undecided(db: Db, sid: str, reason: str, measurement: str) -> ApiError:
    """/attest could not decide (policies still loading): the session fails (the guest attests again
    after Retry-After), an operator-only audit row says why, and the answer is a 503."""
    nonces.mark_failed(db, sid)  # committed by _deny, with the audit row
    return _unavailable(_deny(db, "Unavailable", reason, event="attest", session_id=sid, measurement=measurement))


def _unavailable(err: ApiError) -> ApiError:
    """Could not decide (policies still loading): 503, so neither the guest nor an operator reads a denial."""
    err.variant, err.status = "Unavailable", 503
    return err


def _bearer() -> str | None:
    h = request.headers.get("Authorization", "")
    return h[7:].strip() if h[:7].lower() == "bearer " else None


def _attested_session(db: Db, st: BrokerState, tenant: str, policy_id: str,
                      path: str) -> tuple[nonces.AttestedSession, dict[str, Any]]:
    """The session this request proves (cookie first, then Bearer token, as Trustee) and its tee-pubkey;
    loaded with its cached verdict for `tenant` under `policy_id`, if any, and the sealed `path`."""
    t = now_ms()
    sid = _cookie_session_id()
    if sid is not None:
        row = nonces.load(db, sid, tenant, policy_id, path)
        if row is not None and row.state == "attested" and row.expires_at > t and row.tee_pubkey_json:
            return row, orjson.loads(row.tee_pubkey_json)
        if _bearer() is None:
            raise ApiError("TokenNotFound", "the session is not attested or has expired; attest again")
    token = _bearer()
    if token is None:
        raise ApiError("TokenNotFound", "no attested session cookie and no Bearer token")
    try:
        claims = st.token_key.verify(token)
    except TokenError as exc:
        raise ApiError("TokenVerifierError", exc.diagnostics()) from None
    jwk = tee_pubkey_from_claims(claims)
    row = nonces.load(db, claims["jti"], tenant, policy_id, path)
    if row is None or row.state != "attested" or jwk is None:
        raise ApiError("TokenVerifierError", "the token's session is unknown or was purged; attest again")
    return row, jwk


def _verdict_for(st: BrokerState, db: Db, row: nonces.AttestedSession, tenant: str,
                 policy_id: str) -> tuple[Verdict, str] | None:
    """The session's verdict for `tenant` under `policy_id` (the policy in force now) and its JSON."""
    if row.verdict_json is not None:
        return verdict_from_dict(orjson.loads(row.verdict_json)), row.verdict_json
    # Not appraised for this tenant, or its policy changed since: appraise now, under the current policy.
    assert st.appraiser is not None
    evidence = nonces.evidence_json(db, row.id)
    if not evidence:
        return None
    attested = st.appraiser.verify(st.appraiser.parse(orjson.loads(evidence)))
    expected = bytes.fromhex(row.expected_report_data or "")
    host = bytes.fromhex(row.expected_host_data) if row.expected_host_data else None
    verdict, text, vrow = _appraisal(st, attested, row.id, tenant, policy_id, expected, host)
    try:
        nonces.add_verdicts(db, [vrow])
        db.commit()
    except IntegrityError:  # a concurrent request cached the same verdict first: same result
        db.rollback()
    return verdict, text


_OUTCOMES = {o.value: o for o in Outcome}  # a dict lookup: Outcome(value) costs several times more


def verdict_from_dict(d: dict[str, Any]) -> Verdict:
    # Runs on every /resource (the cached verdict has ~50 checks): positional, no generator.
    checks = tuple([CheckResult(c["name"], _OUTCOMES[c["outcome"]], c["message"], c.get("expected"),
                                c.get("actual")) for c in d.get("checks", [])])
    return Verdict(checks=checks, evidence_sha384=d.get("evidence_sha384", ""),
                   policy_id=d.get("policy_id", ""), facts=d.get("facts") or {})


@bp.get("/resource/<repo>/<rtype>/<tag>")
def resource(repo: str, rtype: str, tag: str) -> Response:
    st, db = state(), get_db()
    if not valid_resource(repo, rtype, tag):
        raise ApiError("InvalidRequestPath", "resource path must be <repository>/<type>/<tag>: a tenant name "
                       "(a-z 0-9 _ -) and two parts of [A-Za-z0-9._-], each starting with a letter or digit")
    path = f"{repo}/{rtype}/{tag}"
    tenant = repo
    if st.appraiser is not None and not tenant_select.wait_for_tenant(st, tenant):
        raise _unavailable(_deny(db, "Unavailable", f"tenant {tenant}'s policy is still loading; retry",
                                 event="deny", resource=path, tenant=None))
    policy_id = st.appraiser.policy_id(tenant) if st.appraiser is not None else None
    try:
        row, jwk = _attested_session(db, st, tenant, policy_id or "", path)
    except ApiError as err:
        raise _deny(db, err.variant, err.detail, event="deny", resource=path, tenant=None) from None
    verdict: Verdict | None = None
    text: str | None = None
    path_allowed: tuple[bool, str] | None = None
    if policy_id is not None and st.appraiser is not None:
        try:
            found = _verdict_for(st, db, row, tenant, policy_id)
        except FirmgateError as exc:
            raise _deny(db, "AttestationError", f"evidence no longer verifies: {exc.diagnostics()}",
                        event="deny", tenant=tenant, session_id=row.id, resource=path,
                        measurement=row.measurement) from None
        if found is not None:
            verdict, text = found
            if verdict.accepted:
                path_allowed = st.appraiser.release_allowed(tenant, verdict, path)
    decision = decide(verdict=verdict, path_allowed=path_allowed, tenant_has_policy=policy_id is not None)
    # Audit rows of a tenant-less denial go to the operator only: no tenant learns of other tenants' probes.
    audit_tenant = tenant if policy_id is not None else None
    if not decision.allowed:
        if verdict is not None and audit_tenant is not None:
            metrics.appraised(audit_tenant, verdict)
        denial = _deny(db, decision.variant, decision.reason, event="deny", tenant=audit_tenant,
                       session_id=row.id, resource=path, verdict=verdict, verdict_text=text,
                       measurement=row.measurement)
        denial.detail = public_denial(decision, row.measurement)
        raise denial
    try:
        value = vault.open_secret(st.box, tenant, vault.ResourcePath(repo, rtype, tag), row.secret_nonce,
                                  row.secret_ciphertext)
    except SecretDecryptError:
        # The broker's fault (wrong master key, or a tampered row), not the guest's: a 401 would send
        # it round the attest loop for ever. The operator gets the cause; the guest a generic 500.
        log.error("stored value of %s does not decrypt under the master key (wrong key or tampered row)", path)
        audit.record(db, event="deny", outcome="error", reason="stored value does not decrypt (master key?)",
                     tenant=None, session_id=row.id, resource=path)
        metrics.count_event("deny", "error")
        raise ApiError("HTTPFailed", "internal error; see the broker log", 500) from None
    if value is None:
        # Trustee answers a missing resource with 401 PluginInternalError; the guest was allowed it.
        raise _deny(db, "PluginInternalError", f"resource {path} has no value stored", event="deny",
                    tenant=tenant, session_id=row.id, resource=path, verdict=verdict, verdict_text=text,
                    measurement=row.measurement)
    try:
        body = encrypt(value, jwk)
    except FirmgateError as exc:
        raise _deny(db, "JweError", exc.diagnostics(), event="deny", tenant=tenant, session_id=row.id,
                    resource=path) from None
    with committed(db):  # the row and its commit: one round trip on PostgreSQL
        audit.record(db, event="release", outcome="ok", reason=decision.reason, tenant=tenant,
                     session_id=row.id, resource=path, verdict=verdict, verdict_text=text,
                     measurement=row.measurement, commit=False)
    metrics.released(tenant)
    return jsonify(body)


@bp.get("/jwks")
def jwks() -> Response:
    return jsonify(state().token_key.jwks())
