"""CacheConfig and parse_size: normalisation, validation messages, TOML and env loading."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from spillcache.config import AUTO, CacheConfig, parse_size
from spillcache.errors import ConfigError, SpillCacheError

# ------------------------------------------------------------------ parse_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1, 1),
        (2**40 + 3, 2**40 + 3),
        ("0", 0),
        ("1024", 1024),
        (" 1024 ", 1024),
        ("512MiB", 512 * 2**20),
        ("8GiB", 8 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("1.5 GB", 1_500_000_000),
        ("2TiB", 2 * 2**40),
        ("3TB", 3 * 10**12),
        ("7kb", 7000),
        ("7KiB", 7 * 1024),
        ("100B", 100),
        (".5KB", 500),
        ("1e3", 1000),
        ("0.5KiB", 512),
        (4096.0, 4096),
        (0.0, 0),
    ],
)
def test_parse_size_normalises_to_exact_int(value, expected):
    result = parse_size("host_bytes", value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize("text", ["8gib", "8GIB", "8GiB", "8gIb", "8 GiB"])
def test_parse_size_units_are_case_insensitive(text):
    assert parse_size("host_bytes", text) == 8 * 2**30


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        ("lots", ConfigError, r"host_bytes: cannot read 'lots'.*MiB"),
        ("", ConfigError, r"host_bytes: cannot read"),
        (
            "12 parsecs",
            ConfigError,
            r"host_bytes: cannot read.*units: b, kb, mb, gb, tb, kib, mib, gib, tib, any case",
        ),
        ("-1", ConfigError, r"host_bytes: cannot read '-1'"),
        (-1, ConfigError, r"host_bytes: sizes cannot be negative, got -1"),
        (-1.0, ConfigError, r"host_bytes: sizes cannot be negative"),
        ("1.5B", ConfigError, r"host_bytes: '1.5B' is not a whole number of bytes"),
        ("0.1GiB", ConfigError, r"host_bytes: .* not a whole number"),
        # Past decimal's default 28 digits: refused, never rounded to 0 or to 1 KiB.
        ("1e-2000000GiB", ConfigError, r"host_bytes: '1e-2000000GiB' is not a whole number"),
        ("1.00000000000000000000000000001KiB", ConfigError, r"not a whole number"),
        ("1e999999999GiB", ConfigError, r"'1e999999999GiB' is larger than any disk or memory"),
        (1.5, ConfigError, r"host_bytes: 1.5 is not a whole number"),
        (float("inf"), ConfigError, r"host_bytes: inf is not a whole number"),
        (float("nan"), ConfigError, r"host_bytes: nan is not a whole number"),
        (True, TypeError, r"host_bytes: expected an int of bytes .* got the bool True"),
        (False, TypeError, r"host_bytes: .*bool False"),
        ([1024], TypeError, r"host_bytes: expected an int of bytes .* got list"),
        (None, TypeError, r"host_bytes: .* got NoneType"),
    ],
)
def test_parse_size_rejects_bad_values(value, error, pattern):
    with pytest.raises(error, match=pattern):
        parse_size("host_bytes", value)


def test_config_error_is_a_value_error():
    """Callers that catch ValueError for bad settings keep working."""
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, SpillCacheError)


def test_parse_size_decimal_fraction_that_is_whole():
    assert parse_size("host_bytes", "8.2MB") == 8_200_000


def test_parse_size_large_integer_string_is_exact():
    assert parse_size("host_bytes", "9007199254740993") == 2**53 + 1


def test_parse_size_overflowing_string_is_config_error():
    with pytest.raises(ConfigError, match="host_bytes"):
        parse_size("host_bytes", "1e400")


# ------------------------------------------------------------------ CacheConfig


def test_defaults():
    config = CacheConfig()
    assert config.device_bytes == AUTO == "auto"
    assert config.host_bytes == "auto"
    assert config.disk_path == "auto"
    assert config.disk_bytes is None
    assert config.inline_bytes == 64 * 1024
    assert config.prefetch_depth == 2
    assert config.eviction == "scan"
    assert config.keep_store is False
    assert config.direct_io == "auto"
    assert config.read_mode == "copy"
    assert config.write_behind_bytes == "auto"  # parts of host_bytes, resolved with it
    assert config.read_buffer_bytes == "auto"
    assert config.io_threads == 3
    assert config.checksum is True


def test_sizes_are_normalised_on_every_size_field():
    config = CacheConfig(
        device_bytes="1GiB", host_bytes="512MiB", disk_bytes="1.5GB", inline_bytes="4KiB"
    )
    assert (config.device_bytes, config.host_bytes) == (2**30, 512 * 2**20)
    assert (config.disk_bytes, config.inline_bytes) == (1_500_000_000, 4096)
    assert config == CacheConfig(
        device_bytes=2**30, host_bytes=512 * 2**20, disk_bytes=1_500_000_000, inline_bytes=4096
    )


@pytest.mark.parametrize("text", ["auto", "AUTO", " Auto "])
def test_auto_is_kept_as_the_string_auto(text):
    config = CacheConfig(device_bytes=text, host_bytes=text, disk_path=text)
    assert (config.device_bytes, config.host_bytes, config.disk_path) == ("auto",) * 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("none", None),
        ("None", None),
        ("auto", "auto"),
        ("/tmp/cache", "/tmp/cache"),
        (Path("/var/spill"), "/var/spill"),
    ],
)
def test_disk_path(value, expected):
    assert CacheConfig(disk_path=value).disk_path == expected


def test_an_empty_disk_path_is_refused_and_only_none_turns_the_disk_tier_off(tmp_path):
    """``export SPILLCACHE_DISK_PATH=$SCRATCH`` with SCRATCH unset gives "": refused,
    saying how to turn the disk tier off, however it was given; never read as None."""
    fix = 'give a directory, "auto" (the temp directory), or "none" to turn the disk tier off'
    for empty in ("", "  "):
        with pytest.raises(ConfigError, match=re.escape(f"disk_path: the path is empty; {fix}")):
            CacheConfig(disk_path=empty)
        with pytest.raises(ConfigError, match="it came from SPILLCACHE_DISK_PATH: fix or unset it"):
            CacheConfig.from_env({"SPILLCACHE_DISK_PATH": empty})
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path))}.*the path is empty"):
        CacheConfig.from_file(_write(tmp_path, 'disk_path = ""\n'))
    assert CacheConfig(disk_path=None).disk_path is None
    assert CacheConfig.from_env({"SPILLCACHE_DISK_PATH": "none"}).disk_path is None


@pytest.mark.parametrize("value", [None, "none", ""])
def test_disk_bytes_none_means_unlimited(value):
    assert CacheConfig(disk_bytes=value).disk_bytes is None


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(host_bytes="lots"), ConfigError, r"^host_bytes: cannot read 'lots'"),
        (dict(device_bytes=-1), ConfigError, r"^device_bytes: sizes cannot be negative"),
        (dict(disk_bytes="1.5B"), ConfigError, r"^disk_bytes: .*not a whole number"),
        (dict(inline_bytes=True), TypeError, r"^inline_bytes: .*bool"),
        (dict(host_bytes=[1]), TypeError, r"^host_bytes: .*got list"),
        (dict(disk_path=42), TypeError, r"^disk_path: expected a directory path, a list of them"),
        (dict(disk_path=[]), ConfigError, r"^disk_path: the list is empty"),
        (dict(disk_path=["/a", 3]), TypeError, r"^disk_path: expected .* got 3"),
        (dict(disk_path=["/a", "/b/../a"]), ConfigError, r"names a directory twice"),
        (
            dict(eviction="fifo"),
            ConfigError,
            r"^eviction: unknown policy 'fifo'; choose one of 'scan', 'lru'$",
        ),
        (dict(eviction=None), ConfigError, r"^eviction: unknown policy None.*'lru'"),
        (dict(read_mode="zero"), ConfigError, r"^read_mode: unknown mode 'zero'.*'mmap'"),
        (dict(direct_io="sometimes"), ConfigError, r"^direct_io: expected true or false"),
        (dict(write_behind_bytes="-1MiB"), ConfigError, r"^write_behind_bytes: cannot read"),
        (dict(io_threads=0), ConfigError, r"^io_threads: must be 1 or more"),
        (dict(read_buffer_bytes="much"), ConfigError, r"^read_buffer_bytes: cannot read"),
        (dict(io_threads="two"), ConfigError, r"^io_threads: expected a whole number"),
        (dict(prefetch_depth=-1), ConfigError, r"^prefetch_depth: must be 0 or more, got -1"),
        (dict(prefetch_depth="-3"), ConfigError, r"^prefetch_depth: must be 0 or more"),
        (dict(prefetch_depth=1.0), TypeError, r"^prefetch_depth: expected a whole number"),
        (dict(prefetch_depth=True), TypeError, r"^prefetch_depth: expected a whole number"),
        (
            dict(keep_store="maybe"),
            ConfigError,
            r"^keep_store: expected true or false, got 'maybe'",
        ),
        (dict(keep_store=1), ConfigError, r"^keep_store: expected true or false, got 1"),
    ],
)
def test_bad_values_name_the_field(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        CacheConfig(**kwargs)


def test_prefetch_depth_non_number_string_names_the_field():
    with pytest.raises(
        (TypeError, ValueError), match=r"^prefetch_depth: expected a whole number, got 'x'"
    ):
        CacheConfig(prefetch_depth="x")


def test_prefetch_depth_non_number_string_is_config_error():
    with pytest.raises(ConfigError):
        CacheConfig.from_env({"SPILLCACHE_PREFETCH_DEPTH": "x"})


def test_counts_bools_and_eviction_are_normalised():
    config = CacheConfig(prefetch_depth=" 5 ", keep_store="Yes", eviction=" LRU ")
    assert config.prefetch_depth == 5
    assert config.keep_store is True
    assert config.eviction == "lru"


def test_config_is_frozen():
    config = CacheConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.host_bytes = 1  # type: ignore[misc]
    assert config.host_bytes == "auto"


def test_replace_revalidates():
    config = CacheConfig(host_bytes="1GiB")
    changed = config.replace(host_bytes="2GiB", keep_store="on")
    assert (changed.host_bytes, changed.keep_store) == (2 * 2**30, True)
    assert config.host_bytes == 2**30, "replace must not change the original"
    with pytest.raises(ConfigError, match="^host_bytes: cannot read 'lots'"):
        config.replace(host_bytes="lots")
    with pytest.raises(ConfigError, match="^eviction"):
        config.replace(eviction="mru")


# ------------------------------------------------------------------ from_file


def _write(tmp_path: Path, text: str, name: str = "spill.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_from_file_parses_values(tmp_path):
    path = _write(
        tmp_path,
        'host_bytes = "2GiB"\ndevice_bytes = 0\ndisk_path = "/scratch"\n'
        'disk_bytes = "10GB"\nprefetch_depth = 4\nkeep_store = true\n',
    )
    config = CacheConfig.from_file(path)
    assert config == CacheConfig(
        host_bytes=2 * 2**30,
        device_bytes=0,
        disk_path="/scratch",
        disk_bytes=10 * 10**9,
        prefetch_depth=4,
        keep_store=True,
    )
    assert CacheConfig.from_file(str(path)) == config


def test_from_file_empty_gives_defaults(tmp_path):
    assert CacheConfig.from_file(_write(tmp_path, "")) == CacheConfig()


def test_from_file_unknown_key(tmp_path):
    path = _write(tmp_path, "host_bytes = 1\nhost_byte = 2\n")
    with pytest.raises(
        ConfigError,
        match=r"unknown setting\(s\) 'host_byte'; known settings "
        r"are device_bytes, host_bytes, .*keep_store",
    ) as info:
        CacheConfig.from_file(path)
    assert str(path) in str(info.value)


def test_from_file_invalid_toml(tmp_path):
    path = _write(tmp_path, "host_bytes = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        CacheConfig.from_file(path)


def test_from_file_invalid_value_names_the_file_and_the_field(tmp_path):
    path = _write(tmp_path, 'eviction = "fifo"\n')
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: eviction: unknown policy"):
        CacheConfig.from_file(path)
    path = _write(tmp_path, "prefetch_depth = 1.5\n")
    with pytest.raises(TypeError, match=f"^{re.escape(str(path))}: prefetch_depth: expected"):
        CacheConfig.from_file(path)


def test_from_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CacheConfig.from_file(tmp_path / "absent.toml")


# ------------------------------------------------------------------ from_env


def test_from_env_reads_prefixed_variables():
    config = CacheConfig.from_env(
        {
            "SPILLCACHE_HOST_BYTES": "1GiB",
            "SPILLCACHE_DEVICE_BYTES": "0",
            "SPILLCACHE_DISK_BYTES": "5GB",
            "SPILLCACHE_INLINE_BYTES": "0",
            "SPILLCACHE_PREFETCH_DEPTH": "3",
            "SPILLCACHE_EVICTION": "LRU",
            "SPILLCACHE_DIRECT_IO": "off",
            "SPILLCACHE_READ_MODE": "mmap",
            "SPILLCACHE_WRITE_BEHIND_BYTES": "64MiB",
            "SPILLCACHE_IO_THREADS": "4",
            "PATH": "/usr/bin",
            "HOME": "/root",
            "spillcache_host_bytes": "nonsense",
        }
    )
    assert config == CacheConfig(
        host_bytes=2**30,
        device_bytes=0,
        disk_bytes=5 * 10**9,
        inline_bytes=0,
        prefetch_depth=3,
        eviction="lru",
        direct_io=False,
        read_mode="mmap",
        write_behind_bytes=64 * 2**20,
        io_threads=4,
    )


def test_from_env_empty_gives_defaults():
    assert CacheConfig.from_env({}) == CacheConfig()
    assert CacheConfig.from_env({"UNRELATED": "x", "SPILLCACHE_CONFIG": ""}) == CacheConfig()


@pytest.mark.parametrize(
    ("text", "expected"), [("true", True), ("1", True), ("0", False), ("false", False)]
)
def test_from_env_keep_store(text, expected):
    assert CacheConfig.from_env({"SPILLCACHE_KEEP_STORE": text}).keep_store is expected


@pytest.mark.parametrize(("text", "expected"), [("none", None), ("auto", "auto"), ("/d", "/d")])
def test_from_env_disk_path(text, expected):
    assert CacheConfig.from_env({"SPILLCACHE_DISK_PATH": text}).disk_path == expected


def test_from_env_unknown_variable():
    with pytest.raises(
        ConfigError,
        match=r"unknown variable SPILLCACHE_FOO; known variables "
        r"are SPILLCACHE_CONFIG, SPILLCACHE_DEVICE_BYTES",
    ):
        CacheConfig.from_env({"SPILLCACHE_FOO": "1"})


def test_from_env_config_file_with_override(tmp_path):
    """File values apply, and a SPILLCACHE_<FIELD> variable wins over the file."""
    path = _write(tmp_path, 'host_bytes = "2GiB"\nprefetch_depth = 7\ndisk_path = "/from/file"\n')
    config = CacheConfig.from_env(
        {
            "SPILLCACHE_CONFIG": str(path),
            "SPILLCACHE_HOST_BYTES": "1MiB",
            "SPILLCACHE_DISK_PATH": "none",
        }
    )
    assert config.host_bytes == 2**20
    assert config.prefetch_depth == 7
    assert config.disk_path is None


def test_a_file_given_to_explain_wins_over_spillcache_config(tmp_path):
    """``spillcache config --file b.toml`` where SPILLCACHE_CONFIG names a.toml: b.toml
    is read, a.toml is not, and the variable is not refused as an unknown one."""
    a = _write(tmp_path, 'host_bytes = "1GiB"\nprefetch_depth = 5\n', name="a.toml")
    b = _write(tmp_path, 'host_bytes = "2GiB"\n', name="b.toml")
    config, sources = CacheConfig.explain({"SPILLCACHE_CONFIG": str(a)}, file=b)
    assert config.host_bytes == 2 * 2**30 and sources["host_bytes"] == str(b)
    assert config.prefetch_depth == 2 and sources["prefetch_depth"] == "default"


def test_from_env_config_file_errors_propagate(tmp_path):
    with pytest.raises(FileNotFoundError):
        CacheConfig.from_env({"SPILLCACHE_CONFIG": str(tmp_path / "absent.toml")})
    bad = _write(tmp_path, "colour = 1\n")
    with pytest.raises(ConfigError, match="'colour'"):
        CacheConfig.from_env({"SPILLCACHE_CONFIG": str(bad)})


def test_from_env_invalid_value_names_the_field():
    with pytest.raises(ConfigError, match="^host_bytes: cannot read 'plenty'"):
        CacheConfig.from_env({"SPILLCACHE_HOST_BYTES": "plenty"})
