"""Weights as safetensors: export.py --format safetensors and a run's best.safetensors hold best.pth's weights and
the metadata predicting needs, load with safetensors' own function and no pickle, and are read wherever bare
weights are (predict, evaluate, export); files that do not fit are one-line errors."""
import json
import os
import pickle

import pytest
import torch

import evaluate
import export
import model_utils
import predict
from conftest import one_line_error, run_cli, tiny_cfg
from kit.data import splits
from kit.models import weights_file
from kit.training import runs, training


@pytest.fixture(scope="module")
def exported_weights(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("st")
    export.main(export.get_args_parser().parse_args(["--checkpoint", trained_run["out_dir"], "--format",
                                                     "safetensors", "--out", str(out)]))
    return str(out / "model.safetensors")


def val_batch(root, count=8, size=32):
    transform = splits.val_transform(size)
    files = splits.read_split(root, "val")[0][:count]
    return torch.stack([transform(splits.load_rgb(os.path.join(splits.image_root(root), f))) for f in files])


def no_pickle(monkeypatch):
    """Every unpickling path fails from here on: what loads a .safetensors file must not use one."""
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_the_readme_lines_load_best_pths_model_without_pickle(exported_weights, trained_run, prepared_with_test,
                                                               monkeypatch):
    import torchvision
    from safetensors import safe_open
    from safetensors.torch import load_file

    best = model_utils.load_trained(os.path.join(trained_run["out_dir"], "best.pth"), 3).eval()
    no_pickle(monkeypatch)
    with safe_open(exported_weights, "pt") as f:  # the README's lines, without the kit
        meta = f.metadata()
    model = torchvision.models.resnet18(num_classes=int(meta["num_classes"]))
    model.load_state_dict(load_file(exported_weights))
    assert json.loads(meta["classes"]) == ["alpha", "bravo", "charlie"]
    # resize_shorter: 32 * 256 / 224 = 36.6, floored as the val transform does
    assert (meta["arch"], meta["eval_size"], meta["resize_shorter"]) == ("resnet18", "32", "36")
    assert json.loads(meta["mean"]) == list(splits.IMAGENET_MEAN)
    images = val_batch(prepared_with_test)
    with torch.inference_mode():
        assert torch.equal(model.eval()(images), best(images))
        assert torch.equal(model_utils.load_trained(exported_weights, 3).eval()(images), best(images))


@pytest.mark.slow
def test_predict_and_evaluate_read_it_as_bare_weights(exported_weights, trained_run, prepared_with_test, tmp_path):
    files = [os.path.join(splits.image_root(prepared_with_test), f)
             for f in splits.read_split(prepared_with_test, "val")[0][:5]]
    answers = []
    for checkpoint in (trained_run["out_dir"], exported_weights):  # no --arch, --img_size, --classes needed
        path = tmp_path / f"{len(answers)}.json"
        predict.main(predict.get_args_parser().parse_args([*files, "--checkpoint", checkpoint, "--json", str(path)]))
        answers.append(json.load(open(path))["results"])
    assert answers[0] == answers[1]
    reports = [evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", checkpoint, "--data_root", prepared_with_test, "--out_dir", str(tmp_path / f"e{i}")]))
        for i, checkpoint in enumerate((os.path.join(trained_run["out_dir"], "best.pth"), exported_weights))]
    assert reports[0]["top1"] == reports[1]["top1"] and reports[0]["loss"] == pytest.approx(reports[1]["loss"])


def test_files_that_do_not_fit_are_one_line_errors(exported_weights, trained_run, tmp_path, capfd):
    from safetensors.torch import save_file

    code, _, err = run_cli(predict.cli, ["x.jpg", "--checkpoint", exported_weights, "--arch", "mobilenet_v3_large"],
                           capfd)
    one_line_error(code, err, f"--arch mobilenet_v3_large: {exported_weights} is arch=resnet18 (its metadata)")
    state, meta = weights_file.read(exported_weights)
    state["fc.weight"] = torch.zeros(3, 256)  # a head that fits no ResNet-18
    raw_meta = weights_file.metadata(meta["arch"], meta["classes"], meta["eval_size"], "test")
    bad = str(tmp_path / "bad.safetensors")
    save_file(state, bad, metadata=raw_meta)
    code, _, err = run_cli(predict.cli, ["x.jpg", "--checkpoint", bad], capfd)
    one_line_error(code, err, f"{bad} does not fit a resnet18: 1 of another shape (e.g. fc.weight: (3, 256) vs "
                              f"(3, 512))")
    plain = str(tmp_path / "plain.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, plain)  # no metadata: not the kit's
    code, _, err = run_cli(predict.cli, ["x.jpg", "--checkpoint", plain], capfd)
    one_line_error(code, err, f"{plain} has no 'caltech101-kit weights 1' metadata (not written by export.py): its "
                              f"architecture and classes are unknown")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    code, _, err = run_cli(predict.cli, ["x.jpg", "--checkpoint", str(tmp_path / "junk.safetensors")], capfd)
    assert code == 1 and err.startswith(f"error: {tmp_path / 'junk.safetensors'} is not a readable safetensors file")
    with pytest.raises(Exception, match="holds a 3-class resnet18"):
        model_utils.load_trained(exported_weights, 5)


@pytest.mark.slow
def test_a_run_can_write_best_safetensors_at_its_end(prepared_root, tmp_path):
    result = training.main(tiny_cfg(prepared_root, tmp_path, epochs=1, save_safetensors=True))
    run_dir = result["out_dir"]
    state, meta = weights_file.read(os.path.join(run_dir, "best.safetensors"))
    best = model_utils.load_state_dict_file(os.path.join(run_dir, "best.pth"))
    assert state.keys() == best.keys() and all(torch.equal(state[k], best[k]) for k in best)
    assert meta["classes"] == splits.read_classes(prepared_root) and meta["eval_size"] == 32
    assert runs.open_run(os.path.join(run_dir, "best.safetensors")).arch == "resnet18"


@pytest.mark.slow
def test_real_images_give_best_pths_logits(real_root, tmp_path):
    """A 101-class ResNet-18 (random weights: the point is the file, not accuracy) through safetensors: the same
    logits on real val images, bit for bit."""
    model = model_utils.get_model(101).eval()
    torch.save(model.state_dict(), tmp_path / "best.pth")
    (tmp_path / "classes.txt").write_text("\n".join(splits.read_classes(real_root)) + "\n")
    run = runs.open_run(str(tmp_path / "best.pth"), "resnet18", 64, str(tmp_path / "classes.txt"))
    from kit.models import exporter

    exporter.export(run, str(tmp_path / "out"), ("safetensors",), data_root=real_root, check_images=32)
    loaded = model_utils.load_trained(str(tmp_path / "out" / "model.safetensors"), 101).eval()
    images = val_batch(real_root, 32, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(images), model(images))
