"""Imbalanced data: download.py's class-count summary and warning, --class_balance loss (inverse-frequency weights,
mixed targets weighted per class) and sampler (a seeded, resumable, DDP-sharded plan drawing every class equally
often), and each raising a minority class's recall in real training."""
import numpy as np
import pytest
import torch

import augment
import download
import train_caltech101 as train
from conftest import make_image, run_cli, tiny_cfg
from kit.data import sampling
from kit.training import training


def test_every_class_balance_is_a_flag_value():
    parser = train.get_args_parser()
    for value in ("none", "loss", "sampler"):  # "none" is a value here, not null
        assert vars(parser.parse_args(["--class_balance", value]))["class_balance"] == value


def test_class_weights_are_inverse_frequency_averaging_one():
    # 10 images of class 0, 2 of class 1, none of class 2: w = 12 / (2 * n_c), 0 for the absent class.
    weights = augment.class_weights([0] * 10 + [1] * 2, 3)
    assert weights.tolist() == pytest.approx([0.6, 3.0, 0.0])
    assert (10 * 0.6 + 2 * 3.0) / 12 == pytest.approx(1.0)
    assert augment.class_weights([0, 1, 2] * 4, 3).tolist() == pytest.approx([1.0, 1.0, 1.0])  # balanced: all 1


def test_mixed_targets_weigh_each_class_share():
    """MixUp of a class-0 and a class-1 image with lam: the targets are lam * w0 and (1 - lam) * w1, so the loss is
    lam * w0 * CE_0 + (1 - lam) * w1 * CE_1; label smoothing's share of each class is weighted too."""
    weights = torch.tensor([0.6, 3.0])
    mixer = augment.MixupCutmix(2, mixup_alpha=1.0, label_smoothing=0.1, seed=0, class_weights=weights)
    _, targets = mixer(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))
    lam = mixer.last["lam"]
    plain = augment.soft_targets(torch.tensor([0, 1]), 2, 0.1)  # [[0.95, 0.05], [0.05, 0.95]]
    mixed = lam * plain + (1 - lam) * plain.flip(0)
    assert torch.allclose(targets, mixed * weights)
    logits = torch.randn(2, 2)
    log_p = torch.log_softmax(logits, 1)
    expected = -(mixed * weights * log_p).sum(1).mean()
    assert torch.allclose(augment.soft_target_cross_entropy(logits, targets), expected)


def balanced_plan(labels, fixed_shard=False, rank=0, world=1):
    sizes = (np.full(len(labels), 100), np.full(len(labels), 120))
    data = sampling.DataSettings(seed=1, balanced=True, cache=fixed_shard)
    return sampling.SamplePlan(len(labels), 8, True, data, rank, world, sizes=sizes, labels=labels)


def drawn(plan, epochs):
    return np.concatenate([step["index"] for e in range(epochs) for step in plan.epoch(e)])


def test_the_balanced_plan_draws_every_class_equally_often_and_resumes():
    labels = [0] * 100 + [1] * 10  # 10:1
    plan = balanced_plan(labels)
    picks = np.asarray(labels)[drawn(plan, 20)]  # 2,200 draws with replacement, p = 1/2 per class
    assert abs(picks.mean() - 0.5) < 0.04  # standard error 0.011
    assert len(set(drawn(plan, 1))) < 110  # with replacement: some images twice in an epoch, some not at all
    # Seeded and resumable: the same epoch again, and from its third step on, gives the same draws and boxes.
    full, again, tail = list(plan.epoch(3)), list(plan.epoch(3)), list(plan.epoch(3, 2))
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(full, again) for k in a)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(full[2:], tail) for k in a)
    # The default plan is untouched by the option: a permutation of the split.
    plain = sampling.SamplePlan(110, 8, True, sampling.DataSettings(seed=1), sizes=(np.full(110, 100),
                                                                                  np.full(110, 120)), labels=labels)
    assert sorted(drawn(plain, 1)) == list(range(110))


@pytest.mark.parametrize("fixed_shard", [False, True])
def test_two_ranks_share_the_balanced_draws_in_equal_steps(fixed_shard):
    labels = [0] * 40 + [1] * 4 + [2] * 9
    one = balanced_plan(labels, fixed_shard=fixed_shard)
    ranks = [balanced_plan(labels, fixed_shard=fixed_shard, rank=r, world=2) for r in (0, 1)]
    assert ranks[0].steps == ranks[1].steps
    for epoch in range(3):
        steps = [list(r.epoch(epoch)) for r in ranks]
        assert len(steps[0]) == len(steps[1])  # equal steps (the short last one split 3 + 2 images)
        if fixed_shard:  # each rank draws only from the images it holds
            assert all((s["index"] % 2 == r).all() for r, rank_steps in enumerate(steps) for s in rank_steps)
        else:  # the 2-rank global batches are the 1-process ones
            together = np.concatenate([np.concatenate([a["index"], b["index"]]) for a, b in zip(*steps)])
            assert np.array_equal(together, np.concatenate([s["index"] for s in one.epoch(epoch)]))


def test_download_summarises_class_counts_and_warns_when_imbalanced(tmp_path, capfd):
    rng = np.random.default_rng(0)
    for part, counts in (("train", {"many": 12, "few": 3}), ("val", {"many": 2, "few": 2})):
        for name, count in counts.items():
            (tmp_path / "data" / part / name).mkdir(parents=True)
            for i in range(count):
                make_image((40 * i % 255, 90, 90), rng).save(tmp_path / "data" / part / name / f"{i}.png")
    code, out, err = run_cli(download.cli, ["--folder", str(tmp_path / "data")], capfd)
    assert code == 0, err
    assert "train images per class: smallest 3 (few), largest 12 (many), ratio 4.0" in out
    assert "warning: the train split is imbalanced (ratio 4.0 > 3): consider --class_balance loss or sampler" in out
    for part in ("train", "val"):  # equal classes: one count, no extremes named
        for name in ("Faces", "one"):
            (tmp_path / "even" / part / name).mkdir(parents=True)
            for i in range(3):
                make_image((40 * i % 255, 90, 90), rng).save(tmp_path / "even" / part / name / f"{i}.png")
    code, out, err = run_cli(download.cli, ["--folder", str(tmp_path / "even")], capfd)
    assert code == 0 and "train images per class: 3 each\n" in out and "smallest" not in out, out + err


def minority_recall(root, tmp_path, balance, seed):
    """Train on the 10:1 split and return the recall of the minority class on the balanced val split."""
    result = training.main(tiny_cfg(root, tmp_path / f"{balance}_{seed}", class_balance=balance, seed=seed, epochs=4,
                                 img_size=32, batch_size=11, eval_every=4, lr_backbone=2e-3, lr_fc=2e-3,
                                 warmup_epochs=0.5, label_smoothing=0.0))
    import evaluate

    report = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", result["out_dir"], "--out_dir", str(tmp_path / f"eval_{balance}_{seed}")]))
    return report["per_class"]["minority"]["accuracy"]  # recall: the share of its images found


@pytest.fixture(scope="module")
def imbalanced_root(tmp_path_factory):
    """Two classes told apart by brightness (grey 120 or 140) through a per-image offset (std 20) and pixel noise
    (std 10), so they overlap: 100 majority and 10 minority train images, 30 + 30 val."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imbalanced")
    rng = np.random.default_rng(0)
    for part, counts in (("train", {"majority": 100, "minority": 10}), ("val", {"majority": 30, "minority": 30})):
        for name, count in counts.items():
            (root / part / name).mkdir(parents=True)
            base = 120 if name == "majority" else 140
            for i in range(count):
                pixels = base + rng.normal(0, 20) + rng.normal(0, 10, (40, 40, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / part / name / f"{i}.png")
    download.prepare_folder(str(root), quiet=True)
    return str(root)


@pytest.mark.slow
def test_loss_and_sampler_raise_the_minority_recall(imbalanced_root, tmp_path):
    """Minority recall on the balanced val split after 4 epochs, observed over seeds 0-4: none 0.0 (everything
    called majority), loss 0.37-0.57, sampler 0.33-0.47, with majority recall 0.7-1.0. One seed here."""
    recall = {balance: minority_recall(imbalanced_root, tmp_path, balance, seed=0)
              for balance in ("none", "loss", "sampler")}
    assert recall["loss"] > recall["none"] + 0.2 and recall["sampler"] > recall["none"] + 0.2, recall


def test_balanced_draws_under_the_cache_with_two_ranks_give_every_class_an_equal_share():
    """Class sizes 20/3/1/9 in split-list order, 2 ranks each drawing only from the images it holds (the device
    cache): over 300 epochs (9,600 draws) every class's share is 1/4 within 0.015 (about 3.5 standard errors).
    Normalising per shard instead gives 0.251/0.274/0.224/0.251."""
    labels = np.array([0] * 20 + [1] * 3 + [2] * 1 + [3] * 9)
    ranks = [balanced_plan(labels, fixed_shard=True, rank=r, world=2) for r in (0, 1)]
    picks = labels[np.concatenate([drawn(plan, 300) for plan in ranks])]
    shares = np.bincount(picks, minlength=4) / len(picks)
    assert np.abs(shares - 0.25).max() < 0.015, shares
    assert all((s["index"] % 2 == r).all() for r, plan in enumerate(ranks) for s in plan.epoch(7))
    assert np.allclose(ranks[0].class_shares, 0.25)  # what the plan expects, said at start-up when it is not equal
