"""bench.py runs every section end to end on a tiny configuration (speed itself is measured by running bench.py,
never asserted here)."""
import json

import pytest

import bench


def test_bench_reports_both_sides_and_their_ratio(prepared_root, tmp_path):
    out = tmp_path / "bench.json"
    args = bench.get_args_parser().parse_args(
        ["--data_root", prepared_root, "--img_size", "32", "--batch_size", "4", "--eval_batch_size", "8",
         "--workers", "1", "--steps", "1", "--rounds", "1", "--images", "8", "--device", "cpu", "--amp", "bf16",
         "--json", str(out)])
    results = bench.main(args)
    assert [r["section"] for r in results] == ["data", "data", "step", "e2e", "e2e", "eval"]
    assert results[0]["images"] == 12 and results[3]["images"] == 8 and results[5]["images"] == 8
    for r in results:
        assert r["kit"] > 0 and r["plain"] > 0 and abs(r["ratio"] - r["kit"] / r["plain"]) < 1e-9
    assert 0 < results[4]["cache_data_share"] < 1
    saved = json.load(open(out))["results"]
    assert [r["kit"] for r in saved] == [r["kit"] for r in results]


def test_bench_rejects_unknown_sections_and_nonsense(prepared_root):
    with pytest.raises(bench.train.presets.ConfigError, match="choose from data, step, e2e, eval"):
        bench.main(bench.get_args_parser().parse_args(["--data_root", prepared_root, "--only", "disk"]))
    with pytest.raises(bench.train.presets.ConfigError, match="--rounds must be at least 1"):
        bench.main(bench.get_args_parser().parse_args(["--data_root", prepared_root, "--rounds", "0"]))
