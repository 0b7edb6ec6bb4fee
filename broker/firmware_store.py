"""Firmware bytes the broker keeps for appraisal (uploaded by a tenant, or sent by our guest)."""
from __future__ import annotations

import hashlib

from sqlalchemy.orm import Session as OrmSession

from .db import FirmwareBlob, now_ms
from .state import BrokerState


def store_firmware(st: BrokerState, orm: OrmSession, blob: bytes, source: str) -> list[str]:
    """Hand `blob` (a UKI add-on or a firmware image) to the appraiser, which refuses it unless
    some policy allows its firmware digest; then keep it in the database for every replica."""
    if st.appraiser is None:
        raise RuntimeError(st.appraiser_error or "appraisal unavailable")
    digests = st.appraiser.add_firmware(blob)
    key = hashlib.sha384(blob).hexdigest()
    if orm.get(FirmwareBlob, key) is None:
        orm.add(FirmwareBlob(sha384=key, size=len(blob), data=blob, source=source[:80], created_at=now_ms()))
        orm.commit()
    st.firmware_seen.add(key)
    return digests
