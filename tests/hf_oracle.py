"""The external oracle for the model tests: a random transformers `Qwen2ForCausalLM` (PyTorch,
float32) saved with `save_pretrained`. Biases are made non-zero so a dropped q/k/v bias shows."""

from __future__ import annotations

import numpy as np


def make_hf_model(out_dir, kv_heads=2, tied=True, heads=4, seed=0, dtype=None, **kw):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
    )
    cfg.update(kw)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # HF inits these to 0 / 1: randomise them
                p.add_(0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(out_dir))
    return model


def hf_logits(model, ids, attention_mask=None, position_ids=None):
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(ids)),
            attention_mask=None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)),
            position_ids=None if position_ids is None else torch.as_tensor(np.asarray(position_ids)),
        )
    return out.logits.float().numpy()
