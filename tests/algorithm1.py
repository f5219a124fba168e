"""The paper's Algorithm 1 (Appendix B.2), written out plainly as the reference the library must match."""

import torch.nn.functional as F
from torch import autograd


class GetSubnet(autograd.Function):
    """Sort |scores|, zero the bottom (1 - k) fraction, one the rest; straight-through backward."""

    @staticmethod
    def forward(ctx, scores, k):
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = int((1 - k) * scores.numel())
        flat_out = out.flatten()
        flat_out[idx[:j]] = 0
        flat_out[idx[j:]] = 1
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


def subnet_linear(x, weight, scores, k):
    return F.linear(x, weight * GetSubnet.apply(scores.abs(), k))


def subnet_conv2d(x, weight, scores, k, **kw):
    return F.conv2d(x, weight * GetSubnet.apply(scores.abs(), k), **kw)
