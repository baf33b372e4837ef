"""
Model FLOPs utilization: one formula (BENCHMARKS.md writes it out), the FLOPs of a training step and the GPU's peak.

    flops = step_flops(vlm, tokens=..., tokens_sq=..., supervised=..., images=...)   # one rank's micro-batches
    mfu = flops_all_ranks / seconds / (peak_flops("NVIDIA H100 80GB HBM3") * world)

Per matrix weight (2-D and up; the embedding table is a lookup, norms are vectors): 2 FLOPs per token forward, 2 more
for the input gradient where a gradient passes through the module, 2 more for the weight gradient where the weight
trains. A frozen tower that no gradient crosses (the encoder in stages 1-2) costs its forward only. Attention scores
and values: 4 x heads x head_dim x L^2 per layer and sample forward (half that causal), x3 with the backward. The LLM
head runs on the supervised tokens only (LLM.loss).
"""

from attention import Attention

# dense bf16 tensor-core peaks (no sparsity), by torch.cuda.get_device_name() exactly: names that share a prefix
# (L4 / L40 / L40S, H100 SXM / PCIe / NVL) are different chips; a GPU not listed needs --peak-tflops
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
              "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA A100-SXM4-80GB": 312e12,
              "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
              "NVIDIA L4": 121e12, "NVIDIA L40": 181e12, "NVIDIA L40S": 362e12, "NVIDIA A10": 125e12,
              "NVIDIA GeForce RTX 4090": 165e12, "NVIDIA GeForce RTX 3090": 71e12}


def peak_flops(gpu_name: str, peak_tflops: float = 0.0) -> float | None:
    """--peak-tflops when given, else the table's entry for this exact GPU name, else None (MFU not reported)."""
    return peak_tflops * 1e12 if peak_tflops > 0 else PEAK_FLOPS.get(gpu_name)


def matmul_flops(modules, tokens: float, grad_in: bool) -> float:
    params = {id(p): p for m in modules for p in m.parameters() if p.dim() >= 2}.values()  # tied weights once
    return sum((2 + 2 * grad_in + 2 * p.requires_grad) * p.numel() * tokens for p in params)


def attention_flops(modules, sq: float, causal: bool, grad_in: bool) -> float:
    """sq: the sum over sequences of their squared length."""
    attns = [m for mod in modules for m in mod.modules() if isinstance(m, Attention)]
    per = sum(4 * a.n_heads * a.head_dim for a in attns) * sq * (0.5 if causal else 1.0)
    return per * (3 if grad_in else 1)


def step_flops(vlm, image_size: int, tokens: float, tokens_sq: float, supervised: float, images: float) -> float:
    """FLOPs of forward + backward over micro-batches holding `tokens` text tokens (sequences whose squared lengths
    sum to tokens_sq), `supervised` of them scored, and `images` images of image_size px. The LLM always passes a
    gradient back (to the projector in stages 1 and 3); the encoder does only where one of its weights trains, and
    runs only up to the block the projector reads (its pooling head never)."""
    vit, lm = vlm.vit, vlm.lm
    blocks = list(vit.blocks)[: vlm.feature_layer % len(vit.blocks) + 1]
    vit_grad = any(p.requires_grad for b in blocks for p in b.parameters())
    h, w = vit.grid(image_size, image_size)
    per_image = h * w + vit.cfg.n_prefix  # encoder tokens of one image
    vision = (matmul_flops(blocks, images * per_image, vit_grad)
              + attention_flops(blocks, images * per_image**2, False, vit_grad)
              + matmul_flops([vit.patch_embed], images * h * w, False))
    projector = matmul_flops([vlm.projector], images * vlm.projector.n_tokens(h, w), vit_grad)
    layers = lm.model.layers
    text = matmul_flops(layers, tokens, True) + attention_flops(layers, tokens_sq, True, True)
    head = (4 + 2 * lm.lm_head.weight.requires_grad) * lm.lm_head.weight.numel() * supervised
    return vision + projector + text + head


def batch_flops(vlm, image_size: int, batches: list[dict]) -> float:
    """This rank's FLOPs of one step's micro-batches (step_flops); a depth teacher's steps are not counted (no LLM:
    MFU is the VLM's)."""
    if not hasattr(vlm, "lm"):
        return 0.0
    count = lambda k: sum(float(b[k]) for b in batches)
    return step_flops(vlm, image_size, count("n_tokens"), count("n_tokens_sq"), count("n_supervised"),
                      sum(b["pixels"].shape[0] for b in batches))


def mfu(flops_all_ranks: float, seconds: float, peak: float | None, world: int) -> float | None:
    return flops_all_ranks / seconds / (peak * world) if peak else None

