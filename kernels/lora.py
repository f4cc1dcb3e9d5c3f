"""LoRA linear: y = x W^T + scale (x A^T) B^T with W frozen."""


def lora_linear_reference(x, weight, lora_a, lora_b, scale):
    return x @ weight.T + scale * ((x @ lora_a.T) @ lora_b.T)


lora_linear_torch = lora_linear_reference
