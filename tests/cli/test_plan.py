"""``spillcache plan`` (issue 12): its predictions against runs that measure the same
thing, its JSON and config output, and its errors."""

from __future__ import annotations

import errno
import json
import os
import re
import tomllib
from pathlib import Path

import pytest
import torch

from spillcache import CacheConfig, cli
from spillcache._internal.cli import plan as plan_module
from spillcache._internal.cli import plan_figures
from spillcache._internal.process.resolved import process_budgets, transit_bytes
from spillcache._internal.text import format_bytes

# The demo's sizes: 64 samples of 256 tokens, hidden 64 (64 KiB of hidden states and
# 64 KiB of bool causal mask per sample: both tiered at the default inline_bytes).
DEMO = ["--samples", "64", "--seq-len", "256", "--hidden", "64", "--layers", "3"]
DEMO_BYTES = 64 * (256 * 64 * 4 + 256 * 256)
# What the plan counts per sample besides: its position ids (2 KiB, inline).
DEMO_PLANNED = DEMO_BYTES + 64 * 256 * 8
MiB = 2**20


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def planned(capsys, *argv: str) -> dict:
    status, out, err = run(capsys, "plan", *argv, "--no-probe", "--json")
    assert status == 0, err
    return json.loads(out)


@pytest.mark.parametrize(
    ("fraction", "part"), [(0.2, MiB // 2), (0.5, MiB // 2), (0.8, MiB // 2), (0.5, "auto")]
)
def test_plan_predicts_the_demos_disk_traffic(capsys, monkeypatch, fraction, part):
    """Within 2 % (the order of cache calls is the same, so it should be exact). A host
    tier of ``fraction`` of the activations: host_bytes is that and the parts for values
    on their way to and from disk, set for both runs (512 KiB each: a few batches of
    prefetched reads); with "auto" parts (an eighth of host_bytes each) host_bytes is
    the fraction and the tier three quarters of it."""
    for name in ("SPILLCACHE_WRITE_BEHIND_BYTES", "SPILLCACHE_READ_BUFFER_BYTES"):
        monkeypatch.setenv(name, str(part))
    parts = 0 if part == "auto" else 2 * part
    budget = str(int(DEMO_BYTES * fraction) + parts)
    status, out, err = run(capsys, "demo", *DEMO, "--host-bytes", budget, "--json")
    assert status == 0, err
    measured = json.loads(out)
    assert measured["disk_written_bytes"] > 0 and measured["disk_read_bytes"] > 0
    plan = planned(capsys, *DEMO, "--dtype", "float32", "--mask", "bool", "--host-bytes", budget)
    assert plan["cached_bytes"] >= measured["cached_bytes"]  # position ids too, inline
    # The same host tier, whichever way host_bytes is split.
    assert plan["host_tier_bytes"] == measured["host_tier_bytes"]
    if part != "auto":
        assert plan["host_tier_bytes"] == int(DEMO_BYTES * fraction)
    for key in ("disk_written_bytes", "disk_read_bytes"):
        assert abs(plan[key] - measured[key]) <= 0.02 * measured[key], (
            key,
            plan[key],
            measured[key],
        )


def test_everything_in_ram_plans_no_disk_traffic(capsys):
    plan = planned(capsys, *DEMO, "--dtype", "float32", "--mask", "bool", "--host-bytes", "1GiB")
    assert plan["fits_host"] and plan["fits"]
    assert plan["disk_written_bytes"] == plan["disk_read_bytes"] == plan["disk_needed_bytes"] == 0
    # The recommended host_bytes holds every cached value in its host tier, besides its
    # "auto" parts for values on their way to and from disk.
    host = plan["config"]["host_bytes"]
    assert host - 2 * transit_bytes(host) >= plan["cached_bytes"]


def test_host_bytes_of_the_whole_pass_leaves_a_smaller_host_tier(capsys):
    """host_bytes is all of the host memory: as much as a pass caches still spills,
    since the parts for values on their way to and from disk come out of it."""
    plan = planned(
        capsys, *DEMO, "--dtype", "float32", "--mask", "bool", "--host-bytes", str(DEMO_PLANNED)
    )
    assert plan["cached_bytes"] == plan["host_bytes"] == DEMO_PLANNED
    assert plan["host_tier_bytes"] == DEMO_PLANNED - 2 * transit_bytes(DEMO_PLANNED)
    assert not plan["fits_host"]
    assert plan["disk_written_bytes"] > 0 and plan["disk_read_bytes"] > 0
    assert plan["config"]["host_bytes"] == DEMO_PLANNED  # the budget given; the rest spills


def test_the_recommended_config_keeps_the_pass_in_the_tier_beside_its_parts(capsys, monkeypatch):
    """Parts of host_bytes set node-wide, two ranks: the recommended host_bytes, resolved
    on a rank as a cache resolves it, leaves each rank a tier holding its samples, and
    the file keeps the parts it was planned with."""
    monkeypatch.setenv("SPILLCACHE_WRITE_BEHIND_BYTES", "2MiB")
    monkeypatch.setenv("SPILLCACHE_READ_BUFFER_BYTES", "1MiB")
    plan = planned(capsys, *DEMO, "--dtype", "float32", "--mask", "bool", "--host-bytes", "1GiB",
                   "--ranks", "2")  # fmt: skip
    assert plan["fits_host"] and plan["disk_written_bytes"] == 0
    assert plan["host_tier_bytes"] == 2**30 - 3 * MiB
    config = plan["config"]
    assert (config["write_behind_bytes"], config["read_buffer_bytes"]) == (2 * MiB, MiB)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    budgets = process_budgets(CacheConfig(**config))
    per_rank = DEMO_PLANNED // 2
    assert (budgets.write_behind_bytes, budgets.read_buffer_bytes) == (MiB, MiB // 2)
    # The pass, plus an eighth; host_bytes rounded up to whole KiB (for the file) adds
    # less than 1 KiB to each rank's tier.
    wanted = per_rank + per_rank // 8
    assert wanted <= budgets.host_tier_bytes < wanted + 2**10


def test_parts_above_host_bytes_exit_2_naming_host_bytes(capsys, monkeypatch):
    monkeypatch.setenv("SPILLCACHE_WRITE_BEHIND_BYTES", "2MiB")
    monkeypatch.setenv("SPILLCACHE_READ_BUFFER_BYTES", "2MiB")
    status, out, err = run(capsys, "plan", *DEMO, "--host-bytes", "3MiB", "--no-probe")
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--host-bytes" in err, err
    assert "write_behind_bytes" in err and "read_buffer_bytes" in err


def test_json_keys_are_the_documented_ones(capsys):
    plan = planned(capsys, *DEMO, "--host-bytes", "1MiB")
    for key in ("cached_bytes", "disk_written_bytes", "disk_read_bytes", "disk_needed_bytes"):
        assert isinstance(plan[key], int) and plan[key] > 0, key
    assert set(plan["config"]) == set(plan["why"])
    CacheConfig(**{k: v for k, v in plan["config"].items()})  # a valid config
    documented = (Path(__file__).parents[2] / "docs" / "plan.md").read_text()
    for key in plan:
        assert f"`{key}`" in documented, key


def test_a_model_config_sizes_hidden_states_mask_and_rotary(capsys, tmp_path):
    config = {
        "hidden_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
        "torch_dtype": "bfloat16", "model_type": "llama",
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    plan = planned(capsys, "--model", str(tmp_path), "--samples", "4", "--seq-len", "128")
    assert plan["model"] == {
        "hidden": 512, "layers": 2, "dtype": "bfloat16", "mask": "bfloat16", "head_dim": 64,
    }  # fmt: skip
    assert plan["per_sample_bytes"] == {
        "hidden states": 128 * 512 * 2,
        "position ids": 128 * 8,
        "causal mask": 128 * 128 * 2,
        "rotary embeddings": 2 * 128 * 64 * 2,
    }
    assert plan["cached_bytes"] == 4 * sum(plan["per_sample_bytes"].values())


def test_ranks_share_the_node_budget_and_split_the_samples(capsys):
    one = planned(capsys, *DEMO, "--host-bytes", "2MiB")
    two = planned(capsys, *DEMO, "--host-bytes", "4MiB", "--ranks", "2")
    # Two ranks of 32 samples with 2 MiB each: per rank half of the one-rank run's
    # samples and budget, so the node's traffic is a fixed point of that split.
    assert two["cached_bytes"] == one["cached_bytes"]
    assert two["disk_written_bytes"] < one["disk_written_bytes"]


@pytest.mark.parametrize("host", ["1MiB", "1GiB"])  # spills (the budget given), or fits
def test_write_gives_a_config_file_spillcache_reads_with_sizes_in_units(capsys, tmp_path, host):
    target = tmp_path / "plan.toml"
    plan = planned(capsys, *DEMO, "--host-bytes", host, "--disk-path", str(tmp_path),
                   "--write", str(target))  # fmt: skip
    written = tomllib.loads(target.read_text())
    assert written.keys() == plan["config"].keys()
    sizes = {name: value for name, value in written.items() if name.endswith("_bytes")}
    assert "host_bytes" in sizes and (host == "1MiB" or "disk_bytes" not in sizes)
    for name, text in sizes.items():  # never a raw byte count: a number and a unit
        assert re.fullmatch(r"\d+(\.\d\d?)?(KiB|MiB|GiB|TiB)", text), (name, text)
    assert CacheConfig.from_file(target) == CacheConfig(**plan["config"])


def test_check_exits_1_when_the_disk_is_too_small(capsys, tmp_path):
    # Half a TiB a pass, over 16 samples of 32 GiB of hidden states (the replay runs
    # each sample: 512 samples of 1 GiB, the same bytes, took seconds).
    huge = ["--samples", "16", "--seq-len", "8192", "--hidden", "2097152", "--layers", "2"]
    status, out, _ = run(
        capsys, "plan", *huge, "--host-bytes", "1GiB", "--disk-path", str(tmp_path),
        "--no-probe", "--check",
    )  # fmt: skip
    assert status == 1
    assert "WARNING: not enough free space" in out and "does not fit" in out
    status, _, _ = run(capsys, "plan", *huge, "--host-bytes", "1GiB", "--no-probe")
    assert status == 0  # without --check it only warns


def test_the_probe_measures_each_disk_and_leaves_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(plan_figures, "PROBE_SECONDS", 1.0)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    status, out, err = run(
        capsys, "plan", *DEMO, "--host-bytes", "1MiB", "--disk-path", str(first), str(second),
        "--json",
    )  # fmt: skip
    assert status == 0, err
    plan = json.loads(out)
    assert [d["path"] for d in plan["disks"]] == [str(first), str(second)]
    for disk in plan["disks"]:
        assert disk["write_bytes_per_second"] > 0 and disk["read_bytes_per_second"] > 0
    assert plan["io_seconds"] > 0
    assert plan["config"]["disk_path"] == [str(first), str(second)]
    assert list(first.iterdir()) == list(second.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--samples", "0", "--hidden", "8", "--layers", "1"], "--samples"),
        (["--hidden", "8"], "--layers"),
        (["--hidden", "8", "--layers", "1", "--host-bytes", "12XB"], "host"),
        (["--hidden", "8", "--layers", "1", "--disk-path", "/no/such/dir"], "--disk-path"),
        (["--hidden", "8", "--layers", "1", "--dtype", "float77"], "--dtype"),
        (["--hidden", "8", "--layers", "1", "--mask", "maybe"], "--mask"),
        (["--model", "/no/such/config.json"], "--model"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_option(capsys, argv, names):
    status, out, err = run(capsys, "plan", *argv, "--no-probe")
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and names in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("layers", [10**12, 1001])  # 1001: one past MAX_LAYERS
def test_more_layers_than_any_model_is_one_line_before_the_workload(
    capsys, tmp_path, monkeypatch, layers
):
    def no_workload(*args, **kwargs):  # a pass list of 10**12 layers would never end
        raise AssertionError(f"the plan went on to build the workload of {layers} layers")

    monkeypatch.setattr(plan_figures, "sequential_pipeline", no_workload)
    status, out, err = run(capsys, "plan", "--hidden", "8", "--layers", str(layers), "--no-probe")
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"--layers: {layers} layers is more than any decoder model has" in err
    (tmp_path / "config.json").write_text(
        json.dumps({"hidden_size": 8, "num_hidden_layers": layers})
    )
    status, _, err = run(capsys, "plan", "--model", str(tmp_path), "--no-probe")
    assert status == 2 and "num_hidden_layers: " in err and "config.json" in err, err


def test_a_model_config_without_the_sizes_names_what_is_missing(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    status, _, err = run(capsys, "plan", "--model", str(tmp_path), "--no-probe")
    assert status == 2 and "hidden_size" in err and "--hidden" in err


# ------------------------------------------------------------------ the node (issue 23)

# A small Llama-style model: hidden 64, 2 layers, 4 heads of 16, MLP 128, vocabulary 1000.
SMALL_MODEL = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 128, "vocab_size": 1000, "torch_dtype": "bfloat16",
}  # fmt: skip
# Per layer: q, k, v, o 4 x 64 x 64; gate, up, down 3 x 64 x 128; two norms of 64. Then
# the final norm, the embeddings and the (untied) LM head, 1000 x 64 each. bfloat16.
SMALL_MODEL_BYTES = 2 * (2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64 + 2 * 1000 * 64)
TINY = ["--samples", "4", "--seq-len", "32"]
KiB = 2**10


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    for name in ("SPILLCACHE_HOST_BYTES", "SPILLCACHE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(SMALL_MODEL))
    return directory


def test_labels_say_where_each_figure_came_from(capsys, monkeypatch):
    monkeypatch.setenv("SPILLCACHE_HOST_BYTES", "1MiB")
    status, out, err = run(capsys, "plan", *DEMO, "--no-probe")
    assert status == 0, err
    assert "the budget given" not in out
    assert "node: RAM" in out and "this machine's available RAM now, not the target" in out
    assert "host_bytes 1.0 MiB, from SPILLCACHE_HOST_BYTES," in out
    assert "host_bytes = 1.0 MiB    # from SPILLCACHE_HOST_BYTES (1.0 MiB for the node" in out
    monkeypatch.delenv("SPILLCACHE_HOST_BYTES")
    plan = planned(capsys, *DEMO, "--ram", "4MiB")
    assert plan["host_bytes"] == 2 * MiB and plan["sources"]["ram_bytes"] == "--ram"
    assert plan["sources"]["host_bytes"] == ('the default host_bytes: "auto", half of the RAM')
    assert plan["sources"]["disk_path"] == "the default disk_path"
    assert plan["weights_bytes"] is None and plan["weights_host_bytes"] is None


def test_the_weights_on_the_cpu_take_host_ram_and_are_warned_about(capsys, model_dir):
    ram = str(SMALL_MODEL_BYTES + 256 * KiB)  # room for the weights and 256 KiB more
    plan = planned(capsys, "--model", str(model_dir), *TINY, "--ram", ram, "--host-bytes", "128KiB")
    assert plan["weights_bytes"] == plan["weights_host_bytes"] == SMALL_MODEL_BYTES
    assert plan["sources"]["weights_bytes"] == (
        "210240 parameters of bfloat16 counted from config.json's sizes"
    )
    assert plan["fits_ram"] and plan["fits"]
    # A host budget that, with the weights, is more than the RAM: warned, and --check fails.
    argv = ["plan", "--model", str(model_dir), *TINY, "--ram", ram, "--host-bytes", "512KiB",
            "--no-probe"]  # fmt: skip
    status, out, _ = run(capsys, *argv, "--check")
    assert status == 1
    (warning,) = [line for line in out.splitlines() if "WARNING" in line]
    assert (
        "host_bytes, 512.0 KiB (--host-bytes), and the weights on the CPU, 410.6 KiB, are "
        "together more than the RAM" in warning
    )
    assert f"more than the RAM, {format_bytes(int(ram))}" in warning
    # On the GPUs they take no host RAM: the same budget fits.
    plan = planned(capsys, *argv[1:-1], "--weights-device", "gpu")
    assert plan["weights_bytes"] == SMALL_MODEL_BYTES and plan["weights_host_bytes"] == 0
    assert plan["fits_ram"]
    # Weights that alone are more than the RAM: said so, whatever host_bytes comes to.
    status, out, _ = run(capsys, "plan", "--model", str(model_dir), *TINY, "--ram", "100KiB",
                         "--no-probe")  # fmt: skip
    assert status == 0  # only --check fails a plan that does not fit
    assert "WARNING: the weights on the CPU alone are more than the RAM, 100.0 KiB" in out


def test_auto_host_bytes_is_half_of_what_the_weights_leave(capsys, model_dir):
    ram = SMALL_MODEL_BYTES + 4 * MiB
    plan = planned(capsys, "--model", str(model_dir), *TINY, "--ram", str(ram))
    assert plan["host_bytes"] == 2 * MiB
    assert "half of the RAM the weights on the CPU leave" in plan["sources"]["host_bytes"]
    plan = planned(capsys, "--model", str(model_dir), *TINY, "--ram", str(ram),
                   "--weights-device", "cuda")  # fmt: skip
    assert plan["host_bytes"] == ram // 2


def test_a_checkpoints_own_size_is_used_where_it_has_one(capsys, model_dir):
    (model_dir / "model-00001-of-00001.safetensors").write_bytes(b"x" * 1000)
    plan = planned(capsys, "--model", str(model_dir / "config.json"), *TINY)
    assert plan["weights_bytes"] == 1000
    assert plan["sources"]["weights_bytes"] == "its 1 .safetensors file(s)"
    index = {"metadata": {"total_size": 123456789}, "weight_map": {}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    plan = planned(capsys, "--model", str(model_dir), *TINY)
    assert plan["weights_bytes"] == 123456789
    assert plan["sources"]["weights_bytes"] == "model.safetensors.index.json's total_size"


def no_replay(monkeypatch):
    """Bad paths are found before the replay (and the probe) run."""
    monkeypatch.setattr(plan_figures, "replay", lambda *a, **k: pytest.fail("replayed"))


def test_write_into_a_missing_directory_is_one_line_before_the_plan(capsys, tmp_path, monkeypatch):
    no_replay(monkeypatch)
    target = tmp_path / "no" / "plan.toml"
    status, out, err = run(capsys, "plan", *DEMO, "--no-probe", "--write", str(target))
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert f"--write: {target.parent} is not an existing directory; create it first" in err


def test_a_read_only_disk_path_is_one_line_naming_the_option(capsys, read_only_dir, monkeypatch):
    no_replay(monkeypatch)
    status, out, err = run(capsys, "plan", *DEMO, "--disk-path", str(read_only_dir))
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert f"--disk-path: {read_only_dir} is not writable by this process" in err
    assert "Errno" not in err
    status, _, err = run(capsys, "plan", *DEMO, "--write", str(read_only_dir / "plan.toml"))
    assert status == 2 and f"--write: {read_only_dir} is not writable" in err, err


def test_a_probe_that_fails_is_one_line_naming_the_option(capsys, tmp_path, monkeypatch):
    def probe(path, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "probe"))

    monkeypatch.setattr(plan_figures, "probe_disk", probe)
    status, out, err = run(capsys, "plan", *DEMO, "--disk-path", str(tmp_path))
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert f"--disk-path: cannot write the probe's files in {tmp_path} (No space left" in err
    assert "--no-probe" in err and "Errno" not in err


@pytest.mark.parametrize(
    ("config", "published"),
    [
        (json.loads((Path(__file__).parents[2] / "docs/examples/llama-3-70b-config.json")
                    .read_text()), 70.55e9),  # Llama-3-70B
        ({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
          "num_local_experts": 8}, 46.70e9),  # Mixtral-8x7B
    ],
    ids=["llama-3-70b", "mixtral-8x7b"],
)  # fmt: skip
def test_a_config_only_counts_the_parameters_a_checkpoint_of_it_has(config, published):
    nbytes, how = plan_module.model_weights(config, torch.bfloat16, None)
    assert abs(nbytes / 2 - published) < 0.01 * published, (nbytes / 2, published)
    assert how.endswith("parameters of bfloat16 counted from config.json's sizes")
