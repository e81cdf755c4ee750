"""W-mnist: the workload of exact ΔVar at a real training-set size (issue 21).

The 784-256-256-10 relu MLP of W-cg (nn.Sequential names, f32), N smooth 28x28 "images"
(avg_pool2d of 32x32 noise, as peers.py's cnn workload), labels sampled from the model, 64 query
images. QoI output 3, damping 1e-3 on the mean Fisher (the commands in benches/README.md).

usage: python benches/make_mnist.py OUT [N] [SEED]      (N default 60000, SEED default 0)
Writes OUT/model.safetensors, train_x.npy (N x 784 f32), train_y.npy (N, int64), queries.npy
(64 x 784 f32), case.json. Same seed, same files.
"""
import json, os, sys
import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file


def mlp(sizes):
    """The W-mnist network: Linear layers with ReLU between them (nn.Sequential names)."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def main():
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 60000
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    torch.manual_seed(11 + seed)
    sizes = [784, 256, 256, 10]
    model = mlp(sizes)
    smooth = lambda k: torch.nn.functional.avg_pool2d(torch.randn(k, 1, 32, 32), 5, stride=1).reshape(k, 784)
    x = torch.cat([smooth(min(8192, n - s)) for s in range(0, n, 8192)])
    q = smooth(64)
    with torch.no_grad():
        y = torch.distributions.Categorical(logits=model(x)).sample()
    os.makedirs(out, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "model.safetensors"))
    np.save(os.path.join(out, "train_x.npy"), x.numpy().astype(np.float32))
    np.save(os.path.join(out, "train_y.npy"), y.numpy().astype(np.int64))
    np.save(os.path.join(out, "queries.npy"), q.numpy().astype(np.float32))
    with open(os.path.join(out, "case.json"), "w") as fh:
        json.dump(dict(name="mnist", sizes=sizes, act="relu", lik="categorical", n=n, m=64, seed=seed,
                       qoi="output:3", damping=1e-3), fh)
    print(json.dumps(dict(out=out, n=n, P=sum(p.numel() for p in model.parameters()))))


if __name__ == "__main__":
    main()
