"""RMSNorm: y = weight * cast(x / sqrt(mean(x^2) + eps)), normalized in fp32 (Hugging Face rounding order)."""
import torch


def rms_norm_reference(x, weight, eps):
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


rms_norm_torch = rms_norm_reference
