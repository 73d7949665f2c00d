"""augment: MixUp / CutMix properties on real tensors."""
import pytest
import torch

import augment


def batch(n, c=3, h=16, w=20, num_classes=7):
    g = torch.Generator().manual_seed(n)
    images = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return images, labels


@pytest.mark.parametrize("n", [1, 5, 8])
@pytest.mark.parametrize("mix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_targets_are_distributions_and_shapes_hold(n, mix):
    mixer = augment.MixupCutmix(7, mixup_alpha=mix[0], cutmix_alpha=mix[1], label_smoothing=0.1, seed=0)
    for _ in range(10):
        images, labels = batch(n)
        mixed, targets = mixer(images, labels)
        assert mixed.shape == images.shape and targets.shape == (n, 7)
        assert torch.allclose(targets.sum(1), torch.ones(n))
        assert (targets >= 0).all()
        assert mixed.is_contiguous(memory_format=torch.channels_last)


def test_mixup_is_the_convex_combination_with_the_reversed_batch():
    mixer = augment.MixupCutmix(7, mixup_alpha=0.4, seed=1)
    images, labels = batch(6)
    mixed, targets = mixer(images, labels)
    lam = mixer.last["lam"]
    assert mixer.last["mode"] == "mixup" and 0 < lam < 1
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6)
    onehot = torch.nn.functional.one_hot(labels, 7).float()
    assert torch.allclose(targets, lam * onehot + (1 - lam) * onehot.flip(0), atol=1e-6)


@pytest.mark.parametrize("n", [4, 5])
def test_cutmix_pastes_from_the_sample_its_target_names(n):
    """Known answer: image i is the constant i and has label i; wherever image i shows a pasted pixel, its value j
    names the source, and the target gives label j exactly the pasted share of the area (plus i keeps lam)."""
    mixer = augment.MixupCutmix(n, cutmix_alpha=1.0, seed=2)
    labels = torch.arange(n)
    for _ in range(20):
        images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 24, 30).clone()
        mixed, targets = mixer(images, labels)
        lam = mixer.last["lam"]
        for i in range(n):
            pasted = mixed[i] != i
            share = pasted.float().mean().item()
            assert abs(share - (1 - lam)) < 1e-6 or n - 1 - i == i  # an odd batch's middle mixes with itself
            if share:
                sources = mixed[i][pasted].unique().tolist()
                assert sources == [n - 1 - i]  # one source, the one the soft target names
                assert targets[i, n - 1 - i].item() == pytest.approx(1 - lam, abs=1e-6)
                assert targets[i, i].item() == pytest.approx(lam, abs=1e-6)
            assert targets[i].sum().item() == pytest.approx(1.0)


def test_alpha_zero_is_the_identity():
    mixer = augment.MixupCutmix(7, mixup_alpha=0.0, cutmix_alpha=0.0, seed=0)
    images, labels = batch(5)
    mixed, targets = mixer(images, labels)
    assert torch.equal(mixed, images) and mixer.last["mode"] == "none"
    assert torch.equal(targets, torch.nn.functional.one_hot(labels, 7).float())


def test_switch_probability_picks_both_modes():
    mixer = augment.MixupCutmix(7, mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5, seed=0)
    modes = []
    for _ in range(200):
        mixer(*batch(2))
        modes.append(mixer.last["mode"])
    assert 60 < modes.count("cutmix") < 140 and modes.count("cutmix") + modes.count("mixup") == 200
    only_cutmix = augment.MixupCutmix(7, mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=1.0, seed=0)
    for _ in range(20):
        only_cutmix(*batch(2))
        assert only_cutmix.last["mode"] == "cutmix"


def test_label_smoothing_and_soft_cross_entropy():
    labels = torch.tensor([0, 3])
    t = augment.soft_targets(labels, 4, smoothing=0.2)
    assert torch.allclose(t[0], torch.tensor([0.85, 0.05, 0.05, 0.05]))
    logits = torch.randn(2, 4)
    hard = augment.soft_target_cross_entropy(logits, augment.soft_targets(labels, 4))
    assert torch.allclose(hard, torch.nn.functional.cross_entropy(logits, labels))
    smooth = augment.soft_target_cross_entropy(logits, t)
    assert torch.allclose(smooth, torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2))


def test_seeded_mixers_repeat_and_bad_alphas_are_rejected():
    a, b = (augment.MixupCutmix(7, 0.4, 1.0, seed=5) for _ in range(2))
    images, labels = batch(4)
    assert torch.equal(a(images, labels)[0], b(images, labels)[0])
    with pytest.raises(ValueError):
        augment.MixupCutmix(7, mixup_alpha=-1)
