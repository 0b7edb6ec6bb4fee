"""Property tests: mutated add-ons give an Addon or a FirmwareError, never another exception,
and nothing returned lies outside the file."""
from __future__ import annotations

import struct

import pefile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verifier.errors import FirmwareError
from verifier.firmware.addon import build_addon, read_addon

BASE = build_addon([("edk2-a", b"\x90" * 3000 + b"tail"), ("edk2-b", b"second image")])
INTERESTING = [0, 1, 15, 16, 17, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFF0, len(BASE), 0xFEEDDEAD, 0x200, 0x1000]
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(data: bytes) -> None:
    try:
        addon = read_addon(data)
    except FirmwareError as exc:
        assert exc.diagnostics()  # a reason a person can read
        assert exc.exit_code == 2
        return
    assert addon.entries
    for entry in addon.entries:
        assert entry.payload and entry.payload in data
        assert entry.fwid and "\0" not in entry.fwid
    for fwid in addon.fwids:
        assert addon.select(fwid).fwid == fwid


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_flips(flips):
    data = bytearray(BASE)
    for at, value in flips:
        data[at] = value
    _check(bytes(data))


@SETTINGS
@given(st.integers(0, len(BASE) - 4), st.sampled_from(INTERESTING))
def test_u32_overwrites_anywhere(at, value):
    data = bytearray(BASE)
    struct.pack_into("<I", data, at, value)
    _check(bytes(data))


# Header fields and the .efifw headers are where lengths live: hit them harder.
_pe = pefile.PE(data=BASE, fast_load=True)
HOT = sorted({*range(0, 0x200, 2), *(s.PointerToRawData + o for s in _pe.sections[2:] for o in range(0, 24, 4))})
_pe.close()


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(HOT), st.sampled_from(INTERESTING)), min_size=1, max_size=4))
def test_u32_overwrites_in_headers(writes):
    data = bytearray(BASE)
    for at, value in writes:
        if at + 4 <= len(data):
            struct.pack_into("<I", data, at, value)
    _check(bytes(data))


@SETTINGS
@given(st.integers(0, len(BASE)), st.binary(max_size=64))
def test_truncate_and_append(cut, tail):
    _check(BASE[:cut] + tail)


@SETTINGS
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data):
    _check(data)
    _check(b"MZ" + data)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),
                          st.binary(min_size=1, max_size=3000)), min_size=1, max_size=3,
                unique_by=lambda e: e[0]))
def test_build_read_round_trip(entries):
    addon = build_addon(entries)
    pe = pefile.PE(data=addon, fast_load=True)
    assert pe.verify_checksum()
    got = read_addon(addon)
    assert [(e.fwid, e.payload) for e in got.entries] == entries
