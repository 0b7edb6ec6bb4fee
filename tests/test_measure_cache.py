"""On-disk measurement cache: hits, misses, corruption, version namespaces."""
from __future__ import annotations

import json

import pytest

from verifier.measure import launch
from verifier.measure.cache import MeasurementCache
from verifier.measure.launch import Shape, measurement_table, shapes_product

AMDSEV = "edk2-2026.08-OVMF.amdsev.fd"
FW = "a" * 96
M = bytes(range(48))


@pytest.fixture(scope="module")
def amdsev(firmware_dir):
    return (firmware_dir / AMDSEV).read_bytes()


def _entries(root):
    return sorted(p for p in root.rglob("*.json"))


def test_put_get_round_trip(tmp_path):
    c = MeasurementCache(tmp_path)
    assert c.get(FW, "k") is None
    c.put(FW, "k", M)
    assert c.get(FW, "k") == M
    assert c.get(FW, "other") is None
    assert c.get("b" * 96, "k") is None
    assert not list(tmp_path.rglob(".tmp-*"))  # atomic write leaves no temp file


def test_version_is_part_of_the_key(tmp_path):
    MeasurementCache(tmp_path, tool_version="0.0.13").put(FW, "k", M)
    assert MeasurementCache(tmp_path, tool_version="0.0.13").get(FW, "k") == M
    assert MeasurementCache(tmp_path, tool_version="0.0.14").get(FW, "k") is None


@pytest.mark.parametrize("content", [
    b"", b"{not json", b"\xff\xfe", b"[]", json.dumps({"format": 1}).encode(),
])
def test_corrupt_entries_are_ignored(tmp_path, content):
    c = MeasurementCache(tmp_path)
    c.put(FW, "k", M)
    (path,) = _entries(tmp_path)
    path.write_bytes(content)
    assert c.get(FW, "k") is None


def test_entry_for_another_key_is_ignored(tmp_path):
    c = MeasurementCache(tmp_path)
    c.put(FW, "k", M)
    (path,) = _entries(tmp_path)
    doc = json.loads(path.read_text())
    for field, value in [("key", "shape:other"), ("firmware", "b" * 96), ("measurement", "00" * 47)]:
        path.write_text(json.dumps({**doc, field: value}))
        assert c.get(FW, "k") is None, field


def test_bad_digest_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError):
        MeasurementCache(tmp_path).get("../../etc", "k")


def test_table_uses_cache_and_skips_the_firmware_pass(tmp_path, amdsev, monkeypatch):
    shapes = shapes_product([1, 2, 4], ["EPYC-v4", "EPYC-Milan"], ["qemu", "ec2"])
    cache = MeasurementCache(tmp_path)
    first = measurement_table(amdsev, shapes, cache=cache)
    extra = Shape(8, "EPYC-Genoa")
    extra_want = measurement_table(amdsev, [extra])[extra]  # no cache
    assert len(_entries(tmp_path)) == len(shapes) + 1  # + the firmware seed

    def no_pass(fw):
        raise AssertionError("firmware pages hashed again despite the cache")
    monkeypatch.setattr(launch, "firmware_seed", no_pass)
    assert measurement_table(amdsev, shapes, cache=cache) == first
    # A new shape needs no new firmware pass either: the seed is cached.
    assert measurement_table(amdsev, [extra], cache=cache)[extra] == extra_want


def test_corrupt_cache_entry_is_recomputed_and_rewritten(tmp_path, amdsev):
    shape = Shape(2, "EPYC-v4")
    cache = MeasurementCache(tmp_path)
    good = measurement_table(amdsev, [shape], cache=cache)[shape]
    for p in _entries(tmp_path):
        p.write_text("garbage")
    assert measurement_table(amdsev, [shape], cache=cache)[shape] == good
    assert cache.get(launch.prepare_firmware(amdsev).image.sha384, shape.key()) == good


def test_unwritable_cache_only_costs_time(tmp_path, amdsev):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    shape = Shape(1, "EPYC-v4")
    got = measurement_table(amdsev, [shape], cache=MeasurementCache(blocker))
    assert got[shape].hex().startswith("d74bd3ea")
