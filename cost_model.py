"""cost_model: how a speedup of self-speculative decoding is predicted and measured.

Costs are in units of one full decoding step (a plain step costs 1): c, one draft step; v[d], a verify pass over
the pending token and d drafts. A round that drafts d tokens costs d c + v[d] and makes its accepted drafts plus
the full model's next token, so the predicted speedup over plain decoding is tokens made / what the rounds cost.
This module is given what it runs (models, functions); it imports no tool and not hsd.
"""
import time

import torch


def clock(device):
    """time.perf_counter(), after waiting for the GPU's queued work if there is a GPU: timings of model calls."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def break_even_acceptance(c, v, k):
    """The per-token acceptance p at which k drafts a round of cost c (verify v) just pay off, S = 1: where
    (1 - p^(k+1)) / (1 - p) = k c + v; None if no p <= 1 does (even accepting every draft would not pay)."""
    target = k * c + v
    if target > k + 1:
        return None
    low, high = 0.0, 1.0
    for _ in range(50):                                    # tokens per round rise with p: bisect
        p = (low + high) / 2
        low, high = (p, high) if sum(p ** i for i in range(k + 1)) < target else (low, p)
    return high
