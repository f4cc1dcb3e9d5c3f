"""SwiGLU activation: silu(gate) * up."""
import torch.nn.functional as F


def swiglu_reference(gate, up):
    return F.silu(gate) * up


swiglu_torch = swiglu_reference
