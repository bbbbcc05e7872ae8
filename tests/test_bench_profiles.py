"""Storage profiles (profiles/*.toml) parse, carry sources, and the O_DIRECT probe measures something."""

from __future__ import annotations

import pytest

from edgemoe_ort.bench.storage import PROFILES_DIR, list_profiles, load_profile, odirect_bandwidth


def test_the_four_profiles_exist():
    assert {"rpi4", "jetson-emmc", "phone-ufs31", "laptop-nvme"} <= set(list_profiles())


@pytest.mark.parametrize("name", list_profiles())
def test_profile_parses_with_sources(name):
    p = load_profile(name)
    assert p["name"] == name
    assert p["read_bw_bytes_per_s"] > 1e6 and p["read_latency_us"] > 0 and p["ram_bytes"] >= 2**30
    assert p["cores"] >= 1
    assert all(isinstance(s, str) and s.startswith("http") for s in p["sources"])


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match="rpi4"):
        load_profile("no-such-device")


def test_bad_profile_rejected(tmp_path):
    (tmp_path / "x.toml").write_text(
        'name = "x"\ndevice = "d"\nread_bw_bytes_per_s = 1\nread_latency_us = 1\n'
        "ram_bytes = 1\ncores = 1\nsources = []\n"
    )
    with pytest.raises(ValueError, match="sources"):
        load_profile("x", tmp_path)
    assert PROFILES_DIR.is_dir()


def test_odirect_probe(tmp_path):
    f = tmp_path / "store.bin"
    f.write_bytes(b"\1" * (4 << 20))
    r = odirect_bandwidth(f, 1 << 20, total_bytes=2 << 20, repeats=1)
    assert r["bytes_per_s"] > 0 and r["block_bytes"] == 1 << 20 and r["latency_us"] > 0
