"""A fixed, learnable training batch for in-process trainer tests."""
import torch
import torch.nn.functional as F


def make_batch(trainer, batch_size=2, seed=0):
    """Smooth random images, labels from intensity thresholds; deep-supervision targets if enabled."""
    g = torch.Generator().manual_seed(seed)
    patch = list(trainer.configuration_manager.patch_size)
    x = torch.randn([batch_size, 1] + patch, generator=g)
    x = (F.avg_pool3d if len(patch) == 3 else F.avg_pool2d)(x, 5, 1, 2)
    x = (x - x.mean()) / x.std()
    y = (x > 0.3).long() + (x > 1.0).long()
    target = y.float()
    if trainer.enable_deep_supervision:
        scales = trainer._get_deep_supervision_scales()
        target = [F.interpolate(y.float(), size=[round(s * f) for s, f in zip(patch, sc)], mode="nearest")
                  for sc in scales]
    return {"data": x, "target": target}
