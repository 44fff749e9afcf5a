"""Image-text contrastive loss (ALBEF/CLIP InfoNCE, both directions) over the global batch."""
import torch
import torch.nn.functional as F

from ..dist import gather_with_grad, global_offset


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temperature: torch.Tensor):
    """``image_feat``/``text_feat``: unit-norm [b, E] for this rank's pairs. Each local image is
    contrasted against every text of the global batch and vice versa (features gathered across ranks
    with gradients). Returns (loss, sim_i2t [b, G], sim_t2i [b, G]) with G the global batch; the
    similarities (fp32, detached) feed hard-negative mining."""
    all_image = gather_with_grad(image_feat)
    all_text = gather_with_grad(text_feat)
    sim_i2t = image_feat.float() @ all_text.float().t() / temperature.float()
    sim_t2i = text_feat.float() @ all_image.float().t() / temperature.float()
    targets = torch.arange(image_feat.shape[0], device=image_feat.device) + global_offset(image_feat.shape[0])
    loss = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_t2i, targets)) / 2
    return loss, sim_i2t.detach(), sim_t2i.detach()
