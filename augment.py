"""Batch-level MixUp and CutMix in plain torch, on whatever device the batch lives on.

    mixer = augment.MixupCutmix(num_classes=101, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1)
    images, targets = mixer(images, labels)          # targets: (N, num_classes) soft labels, rows sum to 1
    loss = augment.soft_target_cross_entropy(model(images), targets)

Each batch is mixed with its own reverse (sample i with sample N-1-i), the way timm pairs samples: no
permutation index on the device, and an odd batch or a batch of one simply mixes its middle sample with itself.
When both alphas are > 0 one of the two is chosen per batch (CutMix with probability `switch_prob`); an alpha
of 0 disables that one; both 0 returns the batch unchanged with (smoothed) one-hot targets.
The mixing coefficient and the box are drawn on the host from a seeded numpy Generator, so nothing here waits
for the device and the sequence of mixes is reproducible (and resumable: `mixer.rng.bit_generator.state`).
With `class_weights` (--class_balance loss) each class's share of a target is scaled by its weight, so a mixed
pair's loss is lam * w_a * CE_a + (1 - lam) * w_b * CE_b.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


def soft_targets(labels, num_classes, smoothing=0.0, dtype=torch.float32):
    """One-hot targets with label smoothing folded in: (1 - smoothing) on the label, smoothing spread evenly."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=dtype)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def class_weights(labels, num_classes):
    """Inverse-frequency class weights of a list of labels: w_c = N / (K * n_c) over the K classes present (0 for a
    class with no image), so the weights average 1 over the images and a balanced split weighs every class 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.where(present, len(labels) / (present.sum() * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def soft_target_cross_entropy(logits, targets):
    """Mean over the batch of -sum_c targets_c * log_softmax(logits)_c, computed in float32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def cutmix_box(height, width, lam, rng):
    """A box covering about (1 - lam) of the image, centred uniformly at random and clipped to the image.

    Returns (y0, y1, x0, x1) and the lambda that the clipped box really leaves (1 - box area / image area).
    """
    cut_ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    lam_area = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    return (y0, y1, x0, x1), lam_area


class MixupCutmix:
    """Callable batch mixer; `last` holds the mode and lambda of the most recent batch (for logs and tests)."""

    def __init__(self, num_classes, mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5, label_smoothing=0.0,
                 seed=None, class_weights=None):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0")
        if not 0.0 <= switch_prob <= 1.0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError("switch_prob must be in [0, 1] and label_smoothing in [0, 1)")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.switch_prob, self.label_smoothing = switch_prob, label_smoothing
        self.rng = np.random.default_rng(seed)  # host-side draws: no device sync; state is checkpointable
        # --class_balance loss: each class's share of a (mixed, smoothed) target counts w_c times in the loss
        self.class_weights = class_weights
        self.last = {"mode": "none", "lam": 1.0}

    @property
    def enabled(self):
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def choose(self):
        """Draw (mode, lam) for one batch."""
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = self.rng.random() < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        if not self.enabled:
            return "none", 1.0
        if use_cutmix:
            return "cutmix", float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        return "mixup", float(self.rng.beta(self.mixup_alpha, self.mixup_alpha))

    def __call__(self, images, labels):
        targets = soft_targets(labels, self.num_classes, self.label_smoothing)
        mode, lam = self.choose()
        if mode == "mixup":
            images = images.mul(lam).add_(images.flip(0), alpha=1.0 - lam)
        elif mode == "cutmix":
            (y0, y1, x0, x1), lam = cutmix_box(images.shape[-2], images.shape[-1], lam, self.rng)
            images = images.clone()
            images[..., y0:y1, x0:x1] = images.flip(0)[..., y0:y1, x0:x1]
        if mode != "none":
            targets = targets.mul(lam).add_(targets.flip(0), alpha=1.0 - lam)
        if self.class_weights is not None:
            targets = targets * self.class_weights
        self.last = {"mode": mode, "lam": lam}
        return images, targets
