#!/usr/bin/env python3
"""Export a PyTorch model for the deltavar command line.

Any model, as ONNX (`--onnx`): writes `model.onnx` with every parameter kept as an initializer
under its state-dict name and value (PyTorch's default exports fold batch norm into convolutions,
copy Linear weights, split tied weights and merge equal initializers; see the README) and the
state dict as `model.safetensors`, checks both, and prints the `--arch onnx:...` value:

    python scripts/export_torch.py --onnx --module mypkg.models:make_resnet --checkpoint ckpt.pt \
        --input-shape 3,32,32 --out out/model
    deltavar fim --arch onnx:out/model.onnx --weights out/model.safetensors ...

    from deltavar_rs.export_torch import export_onnx        # scripts/export_torch.py runs this file
    arch = export_onnx(model, example_input, "out/model")   # out/model.onnx + out/model.safetensors

(`deltavar_rs.Model.from_torch(model, example_input)` calls `export_onnx` and loads the result.)

An nn.Sequential, as a `seq:` string (the form below): the state dict and the `--arch seq:...`
string that describes it.

Writes the model's state dict as safetensors (PyTorch's names: `3.weight`, `3.bias`, BatchNorm's
running statistics) and prints the `--arch` string that describes it, so that

    python scripts/export_torch.py --module mypkg.models:make_cnn --checkpoint ckpt.pt --out model.safetensors
    deltavar variance --weights model.safetensors --arch "$(cat model.arch)" --queries q.npy ...

round-trips. Use it as a library too:

    from deltavar_rs.export_torch import export
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


def export_onnx(model, example, out, check=True):
    """Writes `out`.onnx (every parameter an initializer under its state-dict name and value,
    weights inside the file, the batch axis (axis 0 of the one input) dynamic) and
    `out`.safetensors (the state dict), checks them, and returns the `--arch onnx:...` value.

    The recipe (measured with torch 2.15, onnxscript 0.7): torch.onnx's dynamo export without its
    optimizer, then onnxscript's optimizer with the parameters pinned as graph inputs so that
    nothing folds, fuses, renames or merges them. `example` is a batch of at least 2 examples."""
    import contextlib
    import io
    import logging
    import os

    import onnx
    import onnx_ir
    import onnxscript.optimizer
    import torch
    from onnx import numpy_helper
    from safetensors.torch import save_file

    out = out[:-5] if out.endswith(".onnx") else out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    model.eval()
    if example.shape[0] < 2:
        raise ValueError("the example batch needs at least 2 examples (a batch of 1 fixes the batch axis)")
    with contextlib.redirect_stdout(io.StringIO()):
        prog = torch.onnx.export(model, (example,), dynamo=True, optimize=False, input_names=["x"],
                                 output_names=["y"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    g = prog.model.graph
    # parameters and buffers (batch norm's running statistics) pinned, so that nothing folds them
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    names |= set(dict(model.named_buffers(remove_duplicate=False)))
    n_in = len(g.inputs)
    g.inputs.extend([v for k, v in g.initializers.items() if k in names])
    # the optimizer logs a warning per pinned initializer ("Skipped deduplication ..."): expected
    quiet = logging.getLogger("onnx_ir")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        onnxscript.optimizer.optimize_ir(prog.model)
    finally:
        quiet.setLevel(level)
    del g.inputs[n_in:]
    onnx_ir.save(prog.model, out + ".onnx")
    # the state dict without aliases (a tied weight once, under its first name)
    state = {k: v.detach().cpu().contiguous() for k, v in model.named_parameters()}
    state.update({k: v.detach().cpu().contiguous() for k, v in model.named_buffers()})
    save_file(state, out + ".safetensors")
    if check:
        m = onnx.load(out + ".onnx")
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        for name, p in model.named_parameters():
            if name not in inits:
                raise RuntimeError(f"parameter {name} is not an initializer of {out}.onnx: the export folded or renamed it")
            a = inits[name]
            b = p.detach().cpu().numpy()
            if a.shape != b.shape or not (a == b).all():
                raise RuntimeError(f"parameter {name} is in {out}.onnx with other values or shape")
        try:
            import onnxruntime as ort
            sess = ort.InferenceSession(out + ".onnx", providers=["CPUExecutionProvider"])
            more = torch.cat([example, example[:1]])
            with torch.no_grad():
                want = model(more).numpy()
            got = sess.run(None, {sess.get_inputs()[0].name: more.numpy()})[0]
            err = float(abs(got - want).max() / max(1e-12, abs(want).max()))
            if err > 1e-4:
                raise RuntimeError(f"onnxruntime and torch disagree on {out}.onnx (relative {err:.2e})")
        except ImportError:
            pass
    return f"onnx:{out}.onnx"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", required=True,
                    help="package.module:callable returning the nn.Sequential (or package.module:attribute)")
    ap.add_argument("--checkpoint", help="a state dict (torch.save) to load into it")
    ap.add_argument("--out", required=True,
                    help="safetensors file to write; with --onnx the path without extension (OUT.onnx, OUT.safetensors)")
    ap.add_argument("--onnx", action="store_true", help="export any model as ONNX (see above)")
    ap.add_argument("--input-shape", help="with --onnx: one example's input shape, e.g. 3,32,32 or 32")
    ap.add_argument("--input-dtype", default="float32", choices=["float32", "float64", "int64"],
                    help="with --onnx: the input's type (int64 for token ids)")
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
    if a.onnx:
        if not a.input_shape:
            ap.error("--onnx needs --input-shape")
        shape = [2] + [int(v) for v in a.input_shape.split(",") if v]
        dt = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}[a.input_dtype]
        example = torch.zeros(shape, dtype=dt) if dt == torch.int64 else torch.randn(shape, dtype=dt)
        print(export_onnx(model, example, a.out))
        return 0
    arch = export(model, a.out)
    with open(a.out.rsplit(".", 1)[0] + ".arch", "w") as f:
        f.write(arch + "\n")
    print(arch)


if __name__ == "__main__":
    sys.exit(main())
