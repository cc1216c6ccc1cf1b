"""Bagel (ByteDance-Seed BAGEL-7B-MoT) as a self-rewarding unified model for srum.

Bagel is a Qwen2 mixture-of-transformers: understanding experts and generation experts (``*_moe_gen``)
share attention in every layer. Its generation module is a rectified flow over FLUX-VAE latents, packed
as ``[text] [start-of-image, latent tokens, end-of-image]``; its understanding module (SigLIP-NaViT
tokens + the understanding experts) is the judge. The modelling code comes from the pip package
``nemo-automodel`` (``nemo_automodel.components.models.bagel``); srum adds the adapters:

- :mod:`bagel.backend`: importing the package, the packed attention mask and the attention kernels
  that run on a CPU (the package's kernels need CUDA: flex attention has no CPU backward, SigLIP needs
  flash-attn);
- :mod:`bagel.packing`: NaViT packing of generation and understanding sequences, latent (un)patchify;
- :mod:`bagel.model`: building (tiny random from configs, or a local checkpoint directory), the
  generation velocity and the understanding logits;
- :mod:`bagel.policy`: :class:`~bagel.policy.BagelPolicy`, the generation module behind srum's policy
  interface (LoRA on the generation experts or full training of the generation experts only);
- :mod:`bagel.judge`: :class:`~bagel.judge.BagelJudge`, Bagel's understanding as an in-process judge;
- :mod:`bagel.bundle`: what the composition root registers (policy kind ``bagel``, judge backend
  ``bagel``).
"""
