#!/usr/bin/env python3
"""ONNX fixtures for the graph engine, with torch.func references (CI reads them without torch).

    /tmp/peers-venv/bin/python scripts/make_graph_fixtures.py tests/data/graph

Each case folder holds model.onnx and model.safetensors (exported by export_torch.export_onnx:
every parameter an initializer under its state-dict name), train_x.npy, train_y.npy, queries.npy,
case.json (likelihood, QoI, rollout, damping, parameter order) and ref.safetensors:

- `g.NAME` (N, *shape): per-example log-likelihood gradients by torch.func (vmap(grad)), float64
  from the f32-rounded weights and data (deltavar 0.1.1's own method);
- `q.NAME` (M, *shape): QoI gradients at the queries (after `rollout` applications of the model);
- `qoi` (M,): the QoI values.

resblock/folded.onnx and gpt/default.onnx are the same models through torch.onnx's default
export (batch norm folded into the convolutions; the tied head read through a copy and the
position embedding folded): deltavar must refuse them with the state dict, naming the tensor.

The rollout case also has expected.json: deltavar 0.1.1's calculate_delta_variance for the
identity, diagonal and full inverse-Fisher Σ with a QoI functional that loops the model.

Cases: a ResNet block with eval batch norm (stride-2 projection shortcut); a causal GPT with a
tied head; a GNN step with gather and index_add (rolled out); a depthwise/pointwise CNN with
dilation, ceil-mode max pooling and padded average pooling; a 1-D CNN whose convolution is used
twice; an MLP of elementwise operators whose Linear is used twice.
"""

import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.func import functional_call, grad, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_torch import export_onnx  # noqa: E402

torch.set_default_dtype(torch.float32)


class ResBlockNet(nn.Module):
    def __init__(s):
        super().__init__()
        s.stem, s.bn0 = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        s.conv1, s.bn1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        s.conv2, s.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        s.short, s.bns = nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6)
        s.head = nn.Linear(6, 3)

    def forward(s, x):
        h = torch.relu(s.bn0(s.stem(x)))
        y = torch.relu(s.bn1(s.conv1(h)))
        y = s.bn2(s.conv2(y)) + s.bns(s.short(h))
        return s.head(torch.relu(y).mean((2, 3)))


class GPT(nn.Module):
    def __init__(s, V=13, T=6, d=8, h=2):
        super().__init__()
        s.h = h
        s.wte, s.wpe = nn.Embedding(V, d), nn.Embedding(T, d)
        s.ln1, s.attn, s.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        s.ln2, s.fc, s.out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        s.ln_f = nn.LayerNorm(d)

    def forward(s, tok):
        B, T = tok.shape
        x = s.wte(tok) + s.wpe(torch.arange(T))
        d = x.shape[-1]
        q, k, v = s.attn(s.ln1(x)).split(d, dim=-1)
        q, k, v = (t.reshape(B, T, s.h, d // s.h).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // s.h)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
        x = x + s.proj((att @ v).transpose(1, 2).reshape(B, T, d))
        x = x + s.out(nn.functional.gelu(s.fc(s.ln2(x)), approximate="tanh"))
        return s.ln_f(x) @ s.wte.weight.t()


def ring_edges(n, reach=(1, 2)):
    src, dst = [], []
    for i in range(n):
        for r in reach:
            for j in (i - r, i + r):
                src.append(j % n)
                dst.append(i)
    return torch.tensor([src, dst])


class GNNStep(nn.Module):
    def __init__(s, edges, F=1, H=8):
        super().__init__()
        s.register_buffer("src", edges[0].clone())
        s.register_buffer("dst", edges[1].clone())
        s.edge = nn.Sequential(nn.Linear(2 * F, H), nn.Tanh(), nn.Linear(H, H))
        s.node = nn.Sequential(nn.Linear(F + H, H), nn.Tanh(), nn.Linear(H, F))

    def forward(s, h):
        m = s.edge(torch.cat([h[:, s.src], h[:, s.dst]], dim=-1))
        agg = torch.zeros(h.shape[0], h.shape[1], m.shape[-1], dtype=h.dtype).index_add(1, s.dst, m)
        return h + s.node(torch.cat([h, agg], dim=-1))


class Depthwise(nn.Module):
    def __init__(s):
        super().__init__()
        s.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        s.pw = nn.Conv2d(3, 5, 1)
        s.dil = nn.Conv2d(5, 4, 3, padding=2, dilation=2, stride=2)
        s.head = nn.Linear(4 * 2 * 2, 4)

    def forward(s, x):
        h = torch.relu(s.dw(x))
        h = nn.functional.leaky_relu(s.pw(h), 0.1)
        h = nn.functional.max_pool2d(h, 2, ceil_mode=True)
        h = torch.sigmoid(s.dil(h))
        h = nn.functional.avg_pool2d(h, 2, stride=1, padding=1, count_include_pad=False)
        return nn.functional.softplus(s.head(h[:, :, :2, :2].flatten(1)))


class Conv1dTwice(nn.Module):
    def __init__(s):
        super().__init__()
        s.c1 = nn.Conv1d(2, 4, 3, padding=1)
        s.c2 = nn.Conv1d(4, 4, 3, padding=1)
        s.head = nn.Linear(4 * 5, 3)

    def forward(s, x):
        h = torch.tanh(s.c1(x))
        h = torch.sigmoid(s.c2(h))
        h = torch.tanh(s.c2(h))            # the same convolution again
        h = nn.functional.avg_pool1d(h, 2)
        return s.head(h.flatten(1))


class OpsMLP(nn.Module):
    def __init__(s):
        super().__init__()
        s.lin1, s.ln, s.lin2 = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 6)
        s.scale = nn.Parameter(torch.rand(6) + 0.5)
        s.head = nn.Linear(6, 3)

    def forward(s, x):
        h = nn.functional.gelu(s.ln(s.lin1(x)))
        y = s.lin2(h)
        y = torch.sqrt(y * y + 1.0) * s.scale - torch.exp(-y.abs())
        y = s.lin2(y) / (1.0 + y.pow(2))   # lin2 used twice
        y = torch.erf(y) + torch.log(torch.sigmoid(y) + 0.5)
        return s.head(y - y.sum(-1, keepdim=True) / 6.0)


def write_case(out, name, model, x, y, z, lik, qoi, rollout=1, damping=1e-3, extra=None):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    model.eval()
    export_onnx(model, x[:2], os.path.join(d, "model"))
    np.save(os.path.join(d, "train_x.npy"), x.numpy())
    np.save(os.path.join(d, "train_y.npy"), y.numpy())
    np.save(os.path.join(d, "queries.npy"), z.numpy())
    # float64 references from the f32 values
    m64 = model.double()
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    xd = x if x.dtype == torch.int64 else x.double()
    zd = z if z.dtype == torch.int64 else z.double()
    yd = y if y.dtype == torch.int64 else y.double()

    def out_of(p, inp):
        return functional_call(m64, (p, buffers), (inp.unsqueeze(0),))[0]

    def ll(p, xx, yy):
        f = out_of(p, xx)
        if lik == "categorical":
            f2 = f.reshape(-1, f.shape[-1])
            return torch.log_softmax(f2, -1).gather(1, yy.reshape(-1, 1)).sum()
        sigma = float(lik.split(":")[1]) if ":" in lik else 1.0
        return (-0.5 * ((yy - f) / sigma) ** 2).sum()

    def q_of(p, zz):
        h = zz
        for _ in range(rollout):
            h = out_of(p, h)
        kind, _, k = qoi.partition(":")
        if kind == "sum":
            return h.sum()
        if kind == "output":
            return h.reshape(-1)[int(k)]
        return torch.softmax(h, -1).reshape(-1)[int(k)]

    G = vmap(grad(ll), in_dims=(None, 0, 0))(params, xd, yd)
    Q = vmap(grad(q_of), in_dims=(None, 0))(params, zd)
    vals = vmap(q_of, in_dims=(None, 0))(params, zd)
    ref = {f"g.{k}": v.contiguous() for k, v in G.items()}
    ref.update({f"q.{k}": v.contiguous() for k, v in Q.items()})
    ref["qoi"] = vals.contiguous()
    save_file(ref, os.path.join(d, "ref.safetensors"))
    meta = dict(name=name, lik=lik, qoi=qoi, rollout=rollout, damping=damping,
                params=list(params.keys()), n=len(x), m=len(z))
    meta.update(extra or {})
    json.dump(meta, open(os.path.join(d, "case.json"), "w"), indent=1)
    return m64, params, buffers


def default_export(model, example, path):
    """torch.onnx's default export (dynamo with its optimizer): what users get without the recipe."""
    import contextlib
    import io
    model.eval()
    with contextlib.redirect_stdout(io.StringIO()):
        prog = torch.onnx.export(model, (example,), dynamo=True, input_names=["x"], output_names=["y"],
                                 dynamic_shapes=({0: torch.export.Dim("batch")},))
    prog.save(path)


def seed_values(out, name, m64, params, buffers, x, y, z, lik, qoi_k, rollout, damping):
    """deltavar 0.1.1's delta variances for the rollout case."""
    from deltavar import calculate_delta_variance, get_qoi_gradient
    sigma = float(lik.split(":")[1])

    def qoi(p, m, zz):
        h = zz.unsqueeze(0)
        for _ in range(rollout):
            h = functional_call(m, (p, buffers), (h,))
        return h.reshape(-1)[qoi_k]

    def ll(p, m, point):
        xx, yy = point
        f = functional_call(m, (p, buffers), (xx.unsqueeze(0),))[0]
        return (-0.5 * ((yy - f) / sigma) ** 2).sum()

    data = list(zip(x.double(), y.double()))
    res = {k: [] for k in ["qoi_value", "identity", "diagonal_empirical_fim", "inverse_full_empirical_fim"]}
    for zz in z.double():
        g = get_qoi_gradient(qoi, params, m64, zz)
        res["qoi_value"].append(float(qoi(params, m64, zz)))
        res["identity"].append(float(calculate_delta_variance(g, "identity")))
        for s in ["diagonal_empirical_fim", "inverse_full_empirical_fim"]:
            res[s].append(float(calculate_delta_variance(
                g, s, {"damping": damping}, log_likelihood_functional=ll, params=params, model=m64, dataset=data)))
    json.dump(res, open(os.path.join(out, name, "expected.json"), "w"), indent=1)


def randomize_bn(model, g):
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5, generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.uniform_(-0.2, 0.2, generator=g)


def labels(model, x, g):
    with torch.no_grad():
        return torch.distributions.Categorical(logits=model(x)).sample()


def main(out):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(1)

    m = ResBlockNet()
    randomize_bn(m, g)
    m.eval()
    x = torch.randn(12, 2, 6, 6, generator=g)
    write_case(out, "resblock", m, x, labels(m, x, g), torch.randn(4, 2, 6, 6, generator=g),
               "categorical", "prob:1")
    default_export(m.float(), x[:2], os.path.join(out, "resblock", "folded.onnx"))

    torch.manual_seed(2)
    m = GPT().eval()
    seq = torch.randint(0, 13, (8, 7), generator=g)
    write_case(out, "gpt", m, seq[:, :-1].contiguous(), seq[:, 1:].contiguous(),
               torch.randint(0, 13, (3, 6), generator=g), "categorical", "prob:40")
    default_export(m.float(), seq[:2, :-1].contiguous(), os.path.join(out, "gpt", "default.onnx"))

    torch.manual_seed(3)
    m = GNNStep(ring_edges(6)).eval()
    x = torch.randn(16, 6, 1, generator=g)
    y = x + 0.1 * torch.randn(16, 6, 1, generator=g)
    z = torch.randn(3, 6, 1, generator=g)
    m64, params, buffers = write_case(out, "gnn", m, x, y, z, "gaussian:0.5", "output:2", rollout=3,
                                      damping=1e-3)
    seed_values(out, "gnn", m64, params, buffers, x, y, z, "gaussian:0.5", 2, 3, 1e-3)

    torch.manual_seed(4)
    m = Depthwise().eval()
    x = torch.randn(10, 3, 7, 7, generator=g)
    with torch.no_grad():
        y = m(x) + 0.3 * torch.randn(10, 4, generator=g)
    write_case(out, "depthwise", m, x, y, torch.randn(3, 3, 7, 7, generator=g), "gaussian:0.3", "output:1")

    torch.manual_seed(5)
    m = Conv1dTwice().eval()
    x = torch.randn(10, 2, 10, generator=g)
    write_case(out, "conv1d-twice", m, x, labels(m, x, g), torch.randn(3, 2, 10, generator=g),
               "categorical", "sum")

    torch.manual_seed(6)
    m = OpsMLP().eval()
    x = torch.randn(14, 5, generator=g)
    with torch.no_grad():
        y = m(x) + 0.5 * torch.randn(14, 3, generator=g)
    write_case(out, "ops-mlp", m, x, y, torch.randn(4, 5, generator=g), "gaussian:0.5", "output:0")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/graph")
