#!/usr/bin/env python3
"""Export a PyTorch nn.Sequential for the deltavar command line.

Writes the model's state dict as safetensors (PyTorch's names: `3.weight`, `3.bias`, BatchNorm's
running statistics) and prints the `--arch` string that describes it, so that

    python scripts/export_torch.py --module mypkg.models:make_cnn --checkpoint ckpt.pt --out model.safetensors
    deltavar variance --weights model.safetensors --arch "$(cat model.arch)" --queries q.npy ...

round-trips. Use it as a library too:

    from export_torch import export
    arch = export(model, "model.safetensors")      # model: an nn.Sequential

Supported modules: Linear, Conv1d, Conv2d (groups=1, zero padding, int or square tuple
arguments), MaxPool2d/AvgPool2d (no padding, floor mode), Flatten (start_dim=1), LayerNorm (over
the last dimension, with affine parameters), BatchNorm2d (eval mode, affine), Dropout, and the
activations ReLU, Tanh, Sigmoid, GELU (exact or tanh), SiLU, Softplus (beta=1), Identity. Anything
else is an error naming the module, never a silent approximation.
"""

import argparse
import importlib
import sys


def _one(v, what):
    """An int argument, or a tuple of equal ints (deltavar's layers are square)."""
    if isinstance(v, int):
        return v
    v = tuple(v)
    if len(set(v)) != 1:
        raise ValueError(f"{what} = {v}: deltavar needs the same value in every dimension")
    return int(v[0])


def layer_string(i, m):
    """The deltavar `seq:` entry of module `m` at index `i` of the Sequential."""
    import torch.nn as nn

    name = type(m).__name__
    if isinstance(m, nn.Linear):
        return f"linear({m.in_features},{m.out_features}" + ("" if m.bias is not None else ",bias=false") + ")"
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        if m.groups != 1:
            raise ValueError(f"module {i} ({name}): groups = {m.groups}, only 1 is supported")
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(f"module {i} ({name}): padding {m.padding!r} / {m.padding_mode}: give an int (zeros)")
        kind = "conv1d" if isinstance(m, nn.Conv1d) else "conv2d"
        s = f"{kind}({m.in_channels},{m.out_channels},{_one(m.kernel_size, 'kernel_size')}"
        st, p, d = _one(m.stride, "stride"), _one(m.padding, "padding"), _one(m.dilation, "dilation")
        if st != 1:
            s += f",stride={st}"
        if p != 0:
            s += f",padding={p}"
        if d != 1:
            s += f",dilation={d}"
        if m.bias is None:
            s += ",bias=false"
        return s + ")"
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        if _one(m.padding, "padding") != 0 or m.ceil_mode:
            raise ValueError(f"module {i} ({name}): padding / ceil_mode are not supported")
        if isinstance(m, nn.MaxPool2d) and _one(m.dilation, "dilation") != 1:
            raise ValueError(f"module {i} ({name}): dilation is not supported")
        if isinstance(m, nn.AvgPool2d) and not m.count_include_pad:
            pass  # no padding: the same thing
        k = _one(m.kernel_size, "kernel_size")
        st = _one(m.stride if m.stride is not None else k, "stride")
        kind = "maxpool2d" if isinstance(m, nn.MaxPool2d) else "avgpool2d"
        return f"{kind}({k})" if st == k else f"{kind}({k},stride={st})"
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise ValueError(f"module {i} (Flatten): only start_dim=1, end_dim=-1")
        return "flatten"
    if isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) != 1 or not m.elementwise_affine or m.bias is None:
            raise ValueError(f"module {i} (LayerNorm): one normalised dimension with weight and bias only")
        return f"layernorm({m.normalized_shape[0]}" + ("" if m.eps == 1e-5 else f",eps={m.eps}") + ")"
    if isinstance(m, nn.BatchNorm2d):
        if not m.affine or not m.track_running_stats:
            raise ValueError(f"module {i} (BatchNorm2d): affine with running statistics only")
        return f"batchnorm2d({m.num_features}" + ("" if m.eps == 1e-5 else f",eps={m.eps}") + ")"
    if isinstance(m, nn.Dropout):
        return "dropout"
    acts = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.Identity: "identity"}
    for cls, s in acts.items():
        if type(m) is cls:
            return s
    if isinstance(m, nn.GELU):
        return "gelu-tanh" if m.approximate == "tanh" else "gelu"
    if isinstance(m, nn.Softplus):
        if m.beta != 1:
            raise ValueError(f"module {i} (Softplus): beta = {m.beta}, only 1")
        return "softplus"
    raise ValueError(f"module {i} ({name}) is not supported by deltavar's seq: architectures")


def arch_string(model):
    """The `--arch seq:...` string of an nn.Sequential."""
    import torch.nn as nn

    if not isinstance(model, nn.Sequential):
        raise TypeError(f"expected an nn.Sequential, got {type(model).__name__}")
    return "seq:" + ",".join(layer_string(i, m) for i, m in enumerate(model))


def export(model, out):
    """Writes model.state_dict() to `out` (safetensors) and returns the --arch string."""
    from safetensors.torch import save_file

    arch = arch_string(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    save_file(state, out)
    return arch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", required=True,
                    help="package.module:callable returning the nn.Sequential (or package.module:attribute)")
    ap.add_argument("--checkpoint", help="a state dict (torch.save) to load into it")
    ap.add_argument("--out", required=True, help="safetensors file to write")
    a = ap.parse_args(argv)
    import torch

    mod, _, attr = a.module.partition(":")
    obj = getattr(importlib.import_module(mod), attr or "model")
    model = obj() if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
    if a.checkpoint:
        state = torch.load(a.checkpoint, map_location="cpu")
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
    model.eval()
    arch = export(model, a.out)
    with open(a.out.rsplit(".", 1)[0] + ".arch", "w") as f:
        f.write(arch + "\n")
    print(arch)


if __name__ == "__main__":
    sys.exit(main())
