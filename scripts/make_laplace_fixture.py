#!/usr/bin/env python3
"""laplace-torch's GLM functional variance as a parity case for deltavar's vector-QoI covariance.

    /tmp/peers-venv/bin/python scripts/make_laplace_fixture.py tests/data/laplace

A 3-8-2 tanh regression MLP (f64), N = 40, sigma_noise = 1, prior precision delta = 0.5, full
empirical-Fisher Laplace (`hessian_structure="full"`, an EF backend): its posterior covariance
is (sum_i g_i g_i^T + delta I)^-1 with g_i the per-example gradient of the Gaussian
log-likelihood, i.e. deltavar's full-fim with damping delta/N and `posterior_scale`. Writes
model.safetensors (names 0.weight, ...), train_x/train_y/queries .npy (f64) and expected.json
with `f_var` (M x K x K) and `f_mu` (M x K).
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file


def main(out):
    torch.manual_seed(3)
    torch.set_default_dtype(torch.float64)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(40, 3)
    y = torch.stack([x[:, 0].sin() + 0.3 * x[:, 1], x[:, 2] * x[:, 0]], 1) + 0.1 * torch.randn(40, 2)
    q = torch.randn(5, 3) * 1.5
    from laplace import Laplace
    from laplace.curvature import CurvlinopsEF

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=40)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="full",
                 backend=CurvlinopsEF, sigma_noise=1.0, prior_precision=0.5)
    la.fit(loader)
    f_mu, f_var = la(q, pred_type="glm")
    os.makedirs(out, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              os.path.join(out, "model.safetensors"))
    np.save(os.path.join(out, "train_x.npy"), x.numpy())
    np.save(os.path.join(out, "train_y.npy"), y.numpy())
    np.save(os.path.join(out, "queries.npy"), q.numpy())
    json.dump({"f_mu": f_mu.detach().tolist(), "f_var": f_var.detach().tolist(),
               "sigma_noise": 1.0, "prior_precision": 0.5, "n": 40,
               "backend": "CurvlinopsEF", "hessian_structure": "full"},
              open(os.path.join(out, "expected.json"), "w"))
    print("f_var[0]", f_var[0].tolist())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/laplace")
