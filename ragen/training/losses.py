"""The two LLM2Vec-Gen training losses, as sums, so that any split of a global batch (over processes and
gradient-accumulation micro-batches) adds up to exactly the same total.

- reconstruction: the frozen causal LM sees only the K reconstruction states as a soft prompt, then the
  response tokens; cross-entropy of each response token given everything before it. The states are the
  *only* route from the query to the response, so minimising it packs the response into them.
- alignment: squared error between the mean over K of the alignment states and the teacher's vector of
  the response (MSE once divided by ``examples x dim``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _ce_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (rows, vocab)
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *,
                              chunk_rows: int = 4096, recompute: bool = False) -> torch.Tensor:
    """Sum of token cross-entropies without materialising all logits at once.

    ``hidden`` (rows, H), ``targets`` (rows,). A 32 x 512 batch on a 151k vocabulary would need 10 GB of
    float32 logits; chunking bounds that, and ``recompute`` (with gradient checkpointing) keeps only one
    chunk's logits alive during backward as well.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        if recompute and torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, head, h, t, use_reentrant=False)
        else:
            total = total + _ce_sum(head, h, t)
    return total


def reconstruction_loss_sum(lm: Any, soft_prompt: torch.Tensor, response_ids: torch.Tensor,
                            response_mask: torch.Tensor, *, recompute_logits: bool = False) -> torch.Tensor:
    """Summed cross-entropy of the responses given only the soft prompt.

    ``soft_prompt`` (B, K, H) in the backbone's dtype; ``response_ids``/``response_mask`` (B, T), right
    padded (the prompt has no padding, so the response always starts at position K).
    """
    b, k, _ = soft_prompt.shape
    t = response_ids.shape[1]
    table = lm.get_input_embeddings()
    embeds = torch.cat([soft_prompt, table(response_ids)], dim=1)  # (B, K+T, H)
    mask = torch.cat([torch.ones((b, k), dtype=response_mask.dtype, device=response_mask.device), response_mask], dim=1)
    hidden = lm.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state  # (B, K+T, H)
    # Position K-1+j (the last prompt state, then each response token) predicts response token j.
    predictors = hidden[:, k - 1:k - 1 + t]  # (B, T, H)
    keep = response_mask.bool()
    return chunked_cross_entropy_sum(lm.get_output_embeddings(), predictors[keep], response_ids[keep],
                                     recompute=recompute_logits)


def alignment_loss_sum(pooled: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Summed squared error between pooled alignment states (B, D) and teacher vectors (B, D), float32."""
    return ((pooled.float() - teacher.float()) ** 2).sum()
