"""bench.py runs every section end to end on a tiny configuration (speed itself is measured by running bench.py,
never asserted here)."""
import json

import pytest

import bench
from kit.reporting import bench_baselines


@pytest.mark.slow
def test_bench_reports_both_sides_and_their_ratio(prepared_root, tmp_path):
    out = tmp_path / "bench.json"
    args = bench.get_args_parser().parse_args(
        ["--data_root", prepared_root, "--img_size", "32", "--batch_size", "4", "--eval_batch_size", "8",
         "--workers", "1", "--steps", "1", "--rounds", "1", "--images", "8", "--device", "cpu", "--amp", "bf16",
         "--json", str(out), "--only", "data,step,e2e,eval"])
    results = bench.main(args)
    assert [r["section"] for r in results] == ["data"] * 4 + ["step", "step", "e2e", "e2e", "eval"]
    assert [r["images"] for r in results if "images" in r] == [8] * 7  # --images: every section's subset
    assert all(r["kit"] > 0 and r["plain"] > 0 for r in results)  # speed is measured by running bench.py
    assert results[5]["plain_name"] == "kit step without that restore"
    assert 0 < results[7]["cache_data_share"] < 1
    assert 0 < results[1]["cache_mib"] < 1  # 8 small synthetic images
    saved = json.load(open(out))["results"]
    assert [r["kit"] for r in saved] == [r["kit"] for r in results]


def test_bench_rejects_unknown_sections_and_nonsense(prepared_root):
    with pytest.raises(bench.errors.ConfigError, match="choose from data, step, e2e, eval, infer, overhead, recipes"):
        bench.main(bench.get_args_parser().parse_args(["--data_root", prepared_root, "--only", "disk"]))
    with pytest.raises(bench.errors.ConfigError, match="--rounds must be at least 1"):
        bench.main(bench.get_args_parser().parse_args(["--data_root", prepared_root, "--rounds", "0"]))


def test_decode_only_ceiling_yields_each_epoch_exactly(prepared_root):
    """The ceiling row counts real images only: the reader's padding of the last batch is not counted, and every
    pass is one whole epoch (5 + 5 + 2 for 12 images in batches of 5)."""
    import torch

    files, _ = bench.splits.read_split(prepared_root, "train")
    decode = bench_baselines.DecodeOnly(prepared_root, files, 5, 1, torch.device("cpu"))
    assert decode.steps == 3
    for _ in range(2):
        sizes = [len(images) for images, _ in decode]
        assert sizes == [5, 5, 2]
    images, _ = next(iter(decode))
    shapes = [image.shape for image in images]
    assert all(len(s) == 3 and s[2] == 3 and s[0] >= 1 and s[1] >= 1 for s in shapes)


@pytest.mark.slow
def test_infer_and_overhead_sections(prepared_root):
    args = bench.get_args_parser().parse_args(
        ["--data_root", prepared_root, "--img_size", "32", "--batch_size", "4", "--workers", "1", "--steps", "1",
         "--rounds", "1", "--device", "cpu", "--amp", "bf16", "--only", "infer,overhead"])
    results = bench.main(args)
    assert [r["section"] for r in results] == ["infer"] * 4 + ["overhead"] * 3
    assert [r["images"] for r in results[:4]] == [33] * 4  # the val split's images, every row the same ones
    writes = results[4]
    # ResNet-18 (11.2M fp32 parameters, 45 MB) plus AdamW's two moments: 135 MB.
    assert writes["kit_name"].startswith("last.pth (135 MB)") and writes["kit"] > 0
    assert results[5]["kit"] < writes["kit"]  # the background writer stalls training less than a synchronous write


@pytest.mark.slow
def test_recipes_race_two_runs_to_a_val_top1(prepared_root, tmp_path, monkeypatch):
    """Two tiny recipes (the second with progressive resizing) one after the other: each one's time to the target
    is its first evaluation at or above it in its own metrics.csv, and the ratio is the first's over the second's.
    A target neither reaches is reported as not reached (infinite time), with the best it got."""
    import contextlib

    from kit.training import runs

    monkeypatch.setattr(bench.tempfile, "TemporaryDirectory", lambda: contextlib.nullcontext(str(tmp_path)))
    tiny = "--img_size 48 --batch_size 4 --eval_batch_size 8 --workers 1 --epochs 1 --warmup_epochs 0.5"
    recipes = [f"--exp cpu_smoke {tiny}", f"--exp cpu_smoke {tiny} --img_size_start 32"]
    args = bench.get_args_parser().parse_args(["--data_root", prepared_root, "--only", "recipes", "--target", "0",
                                               "--recipes", *recipes])
    (result,) = bench.main(args)
    first_eval = [runs.read_metrics(str(tmp_path / f"recipe_{k}"))[0]["wall_time_s"] for k in (0, 1)]
    assert (result["plain"], result["kit"]) == tuple(first_eval)
    assert result["ratio"] == first_eval[0] / first_eval[1]
    assert result["kit_name"].startswith(f"recipe B ({recipes[1]}): s to val top-1 0.0")
    args.target = 1.01
    (result,) = bench.main(args)
    assert result["kit"] == result["plain"] == float("inf") and "(not reached; best " in result["kit_name"]
