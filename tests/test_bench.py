"""bench.py runs end to end on a tiny configuration (speed itself is measured by running bench.py, not here)."""
import json

import bench


def test_bench_reports_both_sides_and_their_ratio(prepared_root, tmp_path):
    out = tmp_path / "bench.json"
    args = bench.get_args_parser().parse_args(
        ["--data_root", prepared_root, "--img_size", "32", "--batch_size", "4", "--workers", "1", "--steps", "1",
         "--rounds", "1", "--device", "cpu", "--amp", "bf16", "--json", str(out)])
    results = bench.main(args)
    assert set(results) == {"data", "step"}
    assert results["data"]["images"] == 12
    for r in results.values():
        assert r["kit"] > 0 and r["plain"] > 0 and abs(r["ratio"] - r["kit"] / r["plain"]) < 1e-9
    assert json.load(open(out))["results"]["step"]["kit"] == results["step"]["kit"]
