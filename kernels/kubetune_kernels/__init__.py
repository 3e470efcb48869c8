"""Fused kernels for the trainer: what no well-kept library fuses, and the pure-torch twins of what
Liger Kernel fuses on CUDA.

- `cross_entropy` — the next-token loss and token log-probabilities from the last hidden state in
  chunks of tokens, so the `[tokens, vocab]` logits are never held whole (pure torch: CPU and
  anywhere Triton cannot run).
- `lora` — LoRA linear layers, the LoRA'd SwiGLU MLP and QKV projections as autograd Functions with
  hand-written backward passes that save only what they must; the 4-bit (QLoRA) base is
  dequantised by bitsandbytes inside forward and backward.
- `liger` — Liger Kernel's RMSNorm, RoPE and fused linear cross-entropy applied to one model
  instance, on CUDA.
- `grouped_lora` — LoRA deltas for a serving batch where each row has its own adapter (or none): all
  adapters of a layer stacked and zero-padded to one rank, applied in one pass (Punica's BGMV), in
  torch and as a Triton kernel pair on CUDA; inference only.

Every kernel is checked against a float64 reference in tests/kernels. The trainer decides what
to use, and logs why, in kubetune_trainer/acceleration.py. Importing this package pulls in nothing.
"""
