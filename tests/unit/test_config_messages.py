"""What a bad setting says (issue 23): the variable or file it came from, a "did you
mean" for a mistyped key or variable, and a size it would take; where each value came
from (``CacheConfig.source_of``), which messages about it name."""

from __future__ import annotations

import pytest

from spillcache import CacheConfig
from spillcache.config import OTHER_VARIABLES, parse_size
from spillcache.errors import ConfigError


def test_a_bad_size_in_a_variable_names_the_variable():
    with pytest.raises(ConfigError) as raised:
        CacheConfig.from_env({"SPILLCACHE_HOST_BYTES": "12 gigs"})
    message = str(raised.value)
    assert message.startswith("host_bytes: cannot read '12 gigs' as a size")
    assert message.endswith("it came from SPILLCACHE_HOST_BYTES: fix or unset it")
    # any field: a choice, a count, a list of directories with an empty one
    for name, text in (("EVICTION", "fifo"), ("IO_THREADS", "0"), ("DISK_PATH", "/a::/b")):
        with pytest.raises((ConfigError, TypeError), match=f"came from SPILLCACHE_{name}"):
            CacheConfig.from_env({f"SPILLCACHE_{name}": text})


def test_a_bad_size_in_a_file_names_the_file_and_the_key(tmp_path):
    file = tmp_path / "spill.toml"
    file.write_text('host_bytes = "12 gigs"\n')
    for build in (lambda: CacheConfig.from_file(file),
                  lambda: CacheConfig.from_env({"SPILLCACHE_CONFIG": str(file)})):  # fmt: skip
        with pytest.raises(ConfigError, match=f"^{file}: host_bytes: cannot read '12 gigs'"):
            build()


def test_a_file_the_variable_names_that_cannot_be_read_names_the_variable(tmp_path):
    with pytest.raises(FileNotFoundError, match="^SPILLCACHE_CONFIG: config file .* does not"):
        CacheConfig.from_env({"SPILLCACHE_CONFIG": str(tmp_path / "absent.toml")})
    with pytest.raises(ConfigError, match=r"^SPILLCACHE_CONFIG: .*cannot read it \(Is a dir"):
        CacheConfig.from_env({"SPILLCACHE_CONFIG": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"cannot read it \(Is a directory\); give the path"):
        CacheConfig.from_file(tmp_path)


def test_a_size_that_is_not_whole_bytes_suggests_one_that_is():
    with pytest.raises(ConfigError, match=r"'23.4GiB' is not a whole .*, e.g. '23961MiB'$"):
        parse_size("host_bytes", "23.4GiB")
    assert parse_size("host_bytes", "23961MiB") == 23961 * 2**20
    with pytest.raises(ConfigError, match=r"'1.5B' is not a whole number of bytes$"):
        parse_size("host_bytes", "1.5B")


def test_unknown_keys_suggest_the_setting_meant(tmp_path):
    file = tmp_path / "spill.toml"
    file.write_text("host_byte = 1\nevictoin = 'lru'\n")
    with pytest.raises(ConfigError) as raised:
        CacheConfig.from_file(file)
    assert "did you mean 'eviction'?" in str(raised.value)
    assert "did you mean 'host_bytes'?" in str(raised.value)
    with pytest.raises(TypeError, match=r"unknown setting 'host_byte'; did you mean 'host_bytes'"):
        CacheConfig(host_byte="1GiB")
    with pytest.raises(TypeError, match=r"unknown setting 'keepstore'; did you mean 'keep_store'"):
        CacheConfig().replace(keepstore=True)
    with pytest.raises(TypeError, match=r"unknown setting 'colour' \(known settings: device"):
        CacheConfig(colour=1)  # nothing close: no guess


def test_an_unknown_variable_suggests_the_variable_meant():
    with pytest.raises(ConfigError) as raised:
        CacheConfig.from_env({"SPILLCACHE_HOST_BYTE": "8GiB"})
    message = str(raised.value)
    assert "unknown variable SPILLCACHE_HOST_BYTE" in message
    assert "did you mean 'SPILLCACHE_HOST_BYTES'?" in message
    assert message.endswith("(unset SPILLCACHE_HOST_BYTE, or rename it)")


def test_the_variables_read_elsewhere_are_not_unknown():
    """enable() reads these itself; a cache reading its environment passes over them."""
    assert set(OTHER_VARIABLES) == {
        "SPILLCACHE_CHECKPOINT_DIR", "SPILLCACHE_PROGRESS", "SPILLCACHE_METRICS_PATH",
    }  # fmt: skip
    environ = dict.fromkeys(OTHER_VARIABLES, "x")
    assert CacheConfig.from_env({**environ, "SPILLCACHE_EVICTION": "lru"}).eviction == "lru"


def test_each_value_says_where_it_came_from(tmp_path):
    file = tmp_path / "spill.toml"
    file.write_text('host_bytes = "2GiB"\neviction = "lru"\n')
    config = CacheConfig.from_env({"SPILLCACHE_CONFIG": str(file), "SPILLCACHE_EVICTION": "scan"})
    assert config.source_of("host_bytes") == str(file)
    assert config.source_of("eviction") == "SPILLCACHE_EVICTION"
    assert config.source_of("io_threads") == "default"
    changed = config.replace(io_threads=4)
    assert changed.source_of("io_threads") is None  # given in code
    assert changed.source_of("host_bytes") == str(file)
    assert CacheConfig(host_bytes=1).source_of("host_bytes") is None
    assert CacheConfig(host_bytes=1).source_of("eviction") == "default"
    # where values came from is no part of what a config is
    assert config == CacheConfig(host_bytes="2GiB") and hash(config) == hash(
        CacheConfig(host_bytes="2GiB")
    )
