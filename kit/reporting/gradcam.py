"""Grad-CAM and Grad-CAM++ heatmaps for the kit's models, in plain torch with hooks.

    python predict.py photo.jpg --checkpoint checkpoints/cpu_smoke --gradcam          # overlays next to results
    python predict.py photo.jpg --checkpoint ... --gradcam --target airplanes --cam_method gradcam++

    from kit.reporting import gradcam
    heat = gradcam.class_activation_map(model, batch, class_idx)   # (N, H, W) in [0, 1]; layer=None: the default
    gradcam.save_overlay(pil_image, heat[0], "overlay.png")

Grad-CAM (Selvaraju et al. 2017) weights each feature map of `layer` by the spatial mean of the class score's
gradient; Grad-CAM++ (Chattopadhay et al. 2018) weights by the positive gradients with per-position
coefficients built from the second and third powers of the gradient (the exponential-score closed form).
The layers each architecture offers (its stages' spatial maps) and its default are archs.py's.
"""
import torch
import torch.nn.functional as F

from kit.data import splits
from kit.models import archs


def layers(model):
    """The layer names Grad-CAM takes for this model (its architecture's stages with a spatial map)."""
    return tuple(archs.anatomy_of(model).cam_layers)


def class_activation_map(model, images, class_idx, layer=None, method="gradcam"):
    """Heatmaps (N, H, W) at the input resolution, each scaled to [0, 1], for class_idx (int or (N,) tensor).
    `layer`: one of layers(model) (None: the architecture's default, its last spatial map)."""
    if method not in ("gradcam", "gradcam++"):
        raise ValueError(f"unknown CAM method '{method}': choose gradcam or gradcam++")
    anatomy = archs.anatomy_of(model)
    layer = layer or anatomy.cam_default
    if layer not in anatomy.cam_layers:
        raise ValueError(f"model has no layer '{layer}'; choose from {', '.join(anatomy.cam_layers)}")
    module = model.get_submodule(anatomy.cam_layers[layer])
    captured = {}
    handle = module.register_forward_hook(lambda m, inp, out: captured.update(features=out))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            images = images.detach().requires_grad_(False)
            logits = model(images).float()
            features = captured["features"]
            if features.dim() != 4:
                raise ValueError(f"layer '{layer}' has no spatial map (output {tuple(features.shape)}); choose from "
                                 f"{', '.join(anatomy.cam_layers)}")
            idx = torch.as_tensor(class_idx, device=logits.device).expand(logits.shape[0])
            score = logits.gather(1, idx.view(-1, 1)).sum()
            grads = torch.autograd.grad(score, features)[0].float()
    finally:
        handle.remove()
        model.train(was_training)
    features = features.detach().float()
    if method == "gradcam":
        weights = grads.mean(dim=(2, 3), keepdim=True)
    else:
        g2, g3 = grads.pow(2), grads.pow(3)
        denom = 2 * g2 + (features * g3).sum(dim=(2, 3), keepdim=True)
        alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
        weights = (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    # Min-max per image: the map shows where the class evidence is relative to the rest of the image (a
    # from-scratch network's CAM often carries a near-uniform floor that would otherwise hide it).
    low = cam.flatten(1).min(1).values.view(-1, 1, 1)
    span = (cam.flatten(1).max(1).values.view(-1, 1, 1) - low).clamp(min=1e-12)
    return (cam - low) / span


def save_overlay(image, heat, path, box=None, alpha=0.45):
    """Blend a [0, 1] heatmap over a PIL image at the image's own size and save it as PNG (see overlay)."""
    overlay(image, heat, box, alpha).save(path, format="PNG")
    return path


def overlay(image, heat, box=None, alpha=0.45):
    """A PIL image: the [0, 1] heatmap blended over `image` at the image's own size.

    box=(x0, y0, x1, y1): the region of the original image the heatmap covers (the centre crop the model saw);
    outside it there is no heat. None: the whole image.
    """
    import matplotlib
    import numpy as np
    from PIL import Image

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = box or (0, 0, width, height)
    full = np.zeros((height, width), dtype=np.float32)
    placed = F.interpolate(heat[None, None].float().cpu(), size=(y1 - y0, x1 - x0), mode="bilinear",
                           align_corners=False)[0, 0].clamp(0, 1).numpy()
    full[y0:y1, x0:x1] = placed
    colour = matplotlib.colormaps["jet"](full)[..., :3]
    blended = (1 - alpha) * rgb + alpha * colour
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def explain(model, image, img_size, class_idx, method="gradcam", layer=None):
    """A PIL image: `class_idx`'s heatmap over a PIL image, computed on the view the run's val transform gives the
    model (shorter side to img_size*256/224, centre crop) and placed where that crop sits in the image."""
    x = splits.val_transform(img_size)(image.convert("RGB"))[None].to(next(model.parameters()).device)
    heat = class_activation_map(model, x, class_idx, layer=layer, method=method)[0]
    return overlay(image, heat, centre_crop_box(image.width, image.height, splits.resize_size(img_size), img_size))


def centre_crop_box(width, height, resize_shorter, crop):
    """The region of a width x height image that 'resize shorter side, then centre crop' keeps, in its pixels."""
    scale = resize_shorter / min(width, height)
    resized_w, resized_h = round(width * scale), round(height * scale)
    left, top = (int(splits.centre_crop_offsets(side, crop)) for side in (resized_w, resized_h))
    x0, y0 = int(round(left / scale)), int(round(top / scale))
    x1, y1 = min(width, int(round((left + crop) / scale))), min(height, int(round((top + crop) / scale)))
    return x0, y0, x1, y1
