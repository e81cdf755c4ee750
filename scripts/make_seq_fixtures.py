#!/usr/bin/env python3
"""Parity cases for `seq:` models and rollouts, computed by the reference package deltavar 0.1.1.

    /tmp/peers-venv/bin/python scripts/make_seq_fixtures.py tests/data/seq

Each case folder holds model.safetensors (f32, nn.Sequential state-dict names, BatchNorm running
statistics included), train_x.npy / train_y.npy, queries.npy, case.json (the architecture string,
input shape, likelihood, QoI, rollout K, damping) and expected.json: per query `qoi_value`,
`identity`, `diagonal_empirical_fim`, `inverse_full_empirical_fim` (deltavar 0.1.1's
calculate_delta_variance, in float64 from the f32-rounded weights and data), and `fim_diagonal`.

The QoI functional loops the model K times (z -> f(f(...f(z)))) and reads one output; the
log-likelihood is one-step (pairs (s, s')). Gaussian: sum over outputs of log N(y | f, sigma^2);
categorical: log_softmax(f)[y].
"""

import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.func import functional_call

from deltavar import calculate_delta_variance, get_qoi_gradient
from deltavar.sigma import calculate_empirical_fim_diagonal


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_torch import arch_string  # noqa: E402


def case(out, name, model, arch, in_shape, x, y, z, lik, sigma, qoi_k, rollout, damping):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    model.eval()
    assert arch_string(model) == arch, (arch_string(model), arch)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    save_file(state, os.path.join(d, "model.safetensors"))
    x32, y32, z32 = x.float(), y, z.float()
    np.save(os.path.join(d, "train_x.npy"), x32.numpy())
    np.save(os.path.join(d, "train_y.npy"), y.numpy() if y.dtype == torch.int64 else y.float().numpy())
    np.save(os.path.join(d, "queries.npy"), z32.numpy())
    # reference arithmetic in float64 from the f32-rounded values
    m64 = model.double()
    m64.load_state_dict({k: v.double() for k, v in state.items()}, strict=False)
    params = {k: v.detach().clone() for k, v in m64.named_parameters()}
    xd, zd = x32.double(), z32.double()
    yd = y if y.dtype == torch.int64 else y.float().double()

    def qoi(p, m, zz):
        h = zz.unsqueeze(0)
        for _ in range(rollout):
            h = functional_call(m, p, (h,))
        return h.reshape(-1)[qoi_k]

    def ll(p, m, point):
        xx, yy = point
        f = functional_call(m, p, (xx.unsqueeze(0),)).reshape(-1)
        if lik == "gaussian":
            return (-0.5 * ((yy.reshape(-1) - f) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)).sum()
        return torch.log_softmax(f, 0).gather(0, yy.reshape(1)).squeeze(0)

    data = list(zip(xd, yd))
    res = {k: [] for k in ["qoi_value", "identity", "diagonal_empirical_fim", "inverse_full_empirical_fim"]}
    opts = {"damping": damping}
    for zz in zd:
        g = get_qoi_gradient(qoi, params, m64, zz)
        res["qoi_value"].append(float(qoi(params, m64, zz)))
        res["identity"].append(float(calculate_delta_variance(g, "identity")))
        for s in ["diagonal_empirical_fim", "inverse_full_empirical_fim"]:
            res[s].append(float(calculate_delta_variance(
                g, s, opts, log_likelihood_functional=ll, params=params, model=m64, dataset=data)))
    res["fim_diagonal"] = calculate_empirical_fim_diagonal(ll, params, m64, data).double().tolist()
    res["param_order"] = list(params.keys())
    json.dump(res, open(os.path.join(d, "expected.json"), "w"))
    json.dump({"arch": arch, "input_shape": in_shape, "lik": lik, "sigma": sigma,
               "qoi": f"output:{qoi_k}", "rollout": rollout, "damping": damping,
               "n": len(x), "m": len(z)}, open(os.path.join(d, "case.json"), "w"), indent=1)
    print(name, "P =", sum(p.numel() for p in params.values()))


def main(out):
    torch.manual_seed(0)
    # a step network rolled out K = 5 times; one-step training pairs of a damped rotation
    step = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
    s = torch.randn(64, 4)
    a = torch.tensor([[0.9, -0.3, 0.0, 0.1], [0.3, 0.9, 0.1, 0.0], [0.0, -0.1, 0.8, 0.2], [0.1, 0.0, -0.2, 0.8]])
    s1 = s @ a.T + 0.05 * torch.randn(64, 4)
    case(out, "rollout-4-16-4-tanh-k5", step, "seq:linear(4,16),tanh,linear(16,4)", [4],
         s, s1, torch.randn(6, 4), "gaussian", 0.5, 1, 5, 1e-3)
    # a small CNN with every image layer: conv (padding, stride), eval BatchNorm, max-pool, flatten
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 6, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Dropout(0.1), nn.Linear(6, 3))
    with torch.no_grad():
        cnn[1].running_mean.copy_(0.1 * torch.randn(4))
        cnn[1].running_var.copy_(0.5 + torch.rand(4))
        cnn[1].weight.copy_(1 + 0.2 * torch.randn(4))
        cnn[1].bias.copy_(0.1 * torch.randn(4))
    arch = ("seq:conv2d(1,4,3,padding=1),batchnorm2d(4),relu,maxpool2d(2),conv2d(4,6,3,stride=2),"
            "tanh,flatten,dropout,linear(6,3)")
    x = torch.randn(40, 1, 8, 8)
    y = torch.randint(0, 3, (40,))
    case(out, "cnn-bn-pool-1x8x8", cnn, arch, [1, 8, 8], x, y, torch.randn(5, 1, 8, 8),
         "categorical", None, 1, 1, 1e-3)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/seq")
