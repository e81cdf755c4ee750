"""The peer on W-mnist (issue 21): curvlinops' empirical Fisher + GPyTorch's linear_cg, peers.py
`cg` style, timed per iteration on the files of benches/make_mnist.py (64 right-hand sides: the
queries' gradients of output 3; the system F/N·V + λV with λ = 1e-3 on the mean Fisher).

usage: THREADS=2 python benches/peer_cg_mnist.py DIR [ITERATIONS]     (default 3 iterations)
"""
import json, os, sys, time
import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.func import functional_call, grad

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
d = sys.argv[1]
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 3
case = json.load(open(os.path.join(d, "case.json")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_mnist import mlp  # the same network as the files were written with

model = mlp(case["sizes"])
model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
x = torch.from_numpy(np.load(os.path.join(d, "train_x.npy")))
y = torch.from_numpy(np.load(os.path.join(d, "train_y.npy")))
q = torch.from_numpy(np.load(os.path.join(d, "queries.npy")))
from curvlinops import EFLinearOperator
from linear_operator.utils import linear_cg

params = [p for p in model.parameters()]
N = len(x)
data = [(x[i:i + 512], y[i:i + 512]) for i in range(0, N, 512)]
EF = EFLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), params, data, check_deterministic=False)
pd = {k: v.detach() for k, v in model.named_parameters()}
G = torch.stack([torch.cat([g.flatten() for g in grad(lambda p, z: functional_call(model, p, (z.unsqueeze(0),))[0, 3])(pd, q[j]).values()]) for j in range(len(q))], 1)
count = [0]
def mv(V):
    count[0] += 1
    return EF @ V / N + 1e-3 * V
t = time.perf_counter()
X = linear_cg(mv, G, max_iter=iters, max_tridiag_iter=0, tolerance=1e-30, n_tridiag=0)
t = time.perf_counter() - t
res = ((mv(X) - G).norm(dim=0) / G.norm(dim=0)).max().item()
print(json.dumps(dict(workload="mnist-cg", peer="curvlinops EF + gpytorch linear_cg", N=N, M=len(q),
                      iterations=iters, matvecs=count[0] - 1, seconds=t, seconds_per_iteration=t / iters,
                      max_rel_residual=res)))
