from pathlib import Path

import pytest
import yaml

from edgekit.devices import DeviceProfile, detect_host, devices_dir, list_devices, load_device, load_profile_file
from edgekit.errors import DeviceError

DEVICE_FILES = sorted(devices_dir().glob("*.yaml"))


def test_there_are_at_least_seven_real_profiles():
    assert len(DEVICE_FILES) >= 7
    classes = {load_profile_file(p).device_class for p in DEVICE_FILES}
    assert {"sbc", "phone", "laptop", "embedded-gpu", "mcu"} <= classes


@pytest.mark.parametrize("path", DEVICE_FILES, ids=lambda p: p.stem)
def test_every_device_file_validates_and_cites_sources(path):
    profile = load_profile_file(path)
    assert profile.name == path.stem
    assert 0 < profile.memory_budget <= profile.ram
    assert profile.memory_bandwidth > 0 and profile.cpu.peak_fp32 > 0
    assert "Sources:" in path.read_text() and "http" in path.read_text()


def _raw(name="pi-5-8gb") -> dict:
    return yaml.safe_load((devices_dir() / f"{name}.yaml").read_text())


def _write(tmp_path: Path, raw: dict, name: str = "pi-5-8gb") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_unknown_keys_are_rejected_with_the_key_named(tmp_path):
    raw = _raw()
    raw["memory_bugdet"] = "1GB"
    with pytest.raises(DeviceError, match="memory_bugdet: unknown key"):
        load_profile_file(_write(tmp_path, raw))
    raw = _raw()
    raw["cpu"]["turbo"] = True
    with pytest.raises(DeviceError, match="cpu.turbo: unknown key"):
        load_profile_file(_write(tmp_path, raw))


@pytest.mark.parametrize("key,value,fragment", [
    ("ram", "8 gigs", "ram"),
    ("memory_budget", "-1GB", "memory_budget"),
    ("memory_budget", "16GB", "larger than ram"),
    ("memory_bandwidth", "17GB", "memory_bandwidth"),
    ("runtimes", ["llama.cpp", "tensorflow"], "runtimes"),
])
def test_bad_values_name_the_key(tmp_path, key, value, fragment):
    raw = _raw()
    raw[key] = value
    with pytest.raises(DeviceError, match=fragment):
        load_profile_file(_write(tmp_path, raw))


def test_missing_key_and_name_mismatch_are_reported(tmp_path):
    raw = _raw()
    del raw["cpu"]
    with pytest.raises(DeviceError, match="cpu: required key is missing"):
        load_profile_file(_write(tmp_path, raw))
    with pytest.raises(DeviceError, match="rename the file"):
        load_profile_file(_write(tmp_path, _raw(), name="other-name"))


def test_unknown_device_suggests_the_closest_name():
    with pytest.raises(DeviceError, match="did you mean 'pi-zero-2w'"):
        load_device("pi-zero-2")


def test_units_parse_to_base_numbers():
    p = load_device("pi-zero-2w")
    assert p.ram == 512_000_000 and p.memory_budget == 300_000_000
    assert p.memory_bandwidth == pytest.approx(3.6e9)


def test_host_is_detected_measured_once_and_cached(home):
    host = detect_host()
    assert isinstance(host, DeviceProfile) and host.name == "host"
    assert host.ram > 0 and host.memory_budget < host.ram and host.cpu.threads >= 1
    assert host.memory_bandwidth > 1e8 and host.cpu.peak_fp32 > 1e8  # sane: above 100 MB/s and 100 MFLOPS
    cache = Path(host.measured["cache"])
    assert cache.is_file() and cache.parent.parent == home
    again = detect_host()
    assert again.memory_bandwidth == host.memory_bandwidth  # read from the cache, not measured again
    assert "llama.cpp" in again.runtimes  # the pinned set installs it


def test_corrupt_host_cache_is_measured_again(home):
    host = detect_host()
    Path(host.measured["cache"]).write_text("{not json")
    assert detect_host().memory_bandwidth > 0


def test_list_devices_with_host():
    names = [p.name for p in list_devices(include_host=True)]
    assert names[-1] == "host" and "pi-zero-2w" in names


def test_listing_rereads_a_profile_edited_since_and_reports_a_broken_one(tmp_path):
    """Listed profiles are kept between listings; an edit (same name, new content) must still be seen."""
    raw = _raw()
    path = _write(tmp_path, raw)
    assert [p.memory_budget for p in list_devices(tmp_path)] == [load_profile_file(path).memory_budget]
    raw["memory_budget"] = "3GB"
    _write(tmp_path, raw)
    assert list_devices(tmp_path)[0].memory_budget == 3 * 10**9
    path.write_text("name: [")
    with pytest.raises(DeviceError, match="pi-5-8gb.yaml"):
        list_devices(tmp_path)
