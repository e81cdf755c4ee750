"""The package's behaviour beyond the numbers: errors, inputs, progress, Ctrl-C, the GIL,
metrics and calibration, torch."""

import os
import signal
import threading
import time

import numpy as np
import pytest

import deltavar_rs as dv
from conftest import PARITY, Case


@pytest.fixture
def cls():
    return Case("cls-6-12-4-tanh")


def model_of(case, dtype="f64"):
    return dv.Model.from_safetensors(case.path("model.safetensors"), case.arch, dtype=dtype)


def big_mlp(tmp_path, n=40_000, inputs=256, width=2048):
    """An MLP state dict and classification data for a pass of a few seconds and many steps."""
    rng = np.random.default_rng(0)
    save_file = pytest.importorskip("safetensors.numpy").save_file

    w = {
        "0.weight": rng.standard_normal((width, inputs)).astype(np.float32) * 0.05,
        "0.bias": np.zeros(width, np.float32),
        "2.weight": rng.standard_normal((10, width)).astype(np.float32) * 0.05,
        "2.bias": np.zeros(10, np.float32),
    }
    save_file(w, str(tmp_path / "big.safetensors"))
    x = rng.standard_normal((n, inputs)).astype(np.float32)
    y = rng.integers(0, 10, n)
    arch = f"mlp:{inputs},{width},10:relu"
    return dv.Model.from_safetensors(tmp_path / "big.safetensors", arch), x, y


def test_errors_are_python_exceptions_with_the_clis_message(cls, tmp_path):
    m = model_of(cls)
    q = cls.array("queries.npy")
    # a bad option: a ValueError
    with pytest.raises(dv.DeltavarValueError, match="sigma") as e:
        m.delta_variance(q, sigma="nonsense", progress=False)
    assert isinstance(e.value, ValueError) and isinstance(e.value, dv.DeltavarError)
    with pytest.raises(ValueError, match="qoi"):
        m.delta_variance(q, qoi="output:x", sigma="identity", progress=False)
    # a missing file: an OSError naming it
    with pytest.raises(dv.DeltavarIOError, match="/nonexistent/w.safetensors") as e:
        dv.Model.from_safetensors("/nonexistent/w.safetensors", cls.arch).delta_variance(q, sigma="identity")
    assert isinstance(e.value, OSError)
    # a corrupt file names the file
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(dv.DeltavarIOError, match="bad.npy"):
        m.delta_variance(str(bad), sigma="identity", progress=False)
    with pytest.raises(dv.DeltavarIOError, match="nope.fim"):
        dv.Fisher.load(tmp_path / "nope.fim")
    # a NaN in the queries names the row
    q2 = q.copy()
    q2[1, 2] = np.nan
    with pytest.raises(dv.DeltavarValueError, match="row 1"):
        m.delta_variance(q2, sigma="identity", progress=False)
    # token ids given as floats are checked too (a NaN is not cast to some id)
    from conftest import GRAPH
    gpt = dv.Model.from_onnx(GRAPH / "gpt" / "model.onnx", weights=GRAPH / "gpt" / "model.safetensors")
    ids = np.load(GRAPH / "gpt" / "queries.npy").astype(np.float64)
    ids[0, 0] = np.nan
    with pytest.raises(dv.DeltavarValueError, match="row 0"):
        gpt.delta_variance(ids, sigma="identity", progress=False)
    # a NaN in the training data
    x = cls.array("train_x.npy").copy()
    x[3, 0] = np.inf
    with pytest.raises(dv.DeltavarValueError):
        m.delta_variance(q, sigma="diag-fim", fisher=(x, cls.array("train_y.npy")), progress=False)
    # wrong shapes
    with pytest.raises(dv.DeltavarIOError, match="queries must have shape"):
        m.delta_variance(q[:, :3], sigma="identity", progress=False)
    with pytest.raises(dv.DeltavarError):
        m.delta_variance(q, sigma="diag-fim", fisher=(cls.array("train_x.npy")[:5], cls.array("train_y.npy")),
                         progress=False)
    # arrays of other types, a wrong Σ array, a bad fisher argument
    with pytest.raises(dv.DeltavarValueError, match="complex"):
        m.delta_variance(q.astype(np.complex64), sigma="identity", progress=False)
    with pytest.raises(dv.DeltavarError):
        m.delta_variance(q, sigma=np.ones(3), progress=False)
    with pytest.raises(dv.DeltavarValueError, match="fisher"):
        m.delta_variance(q, sigma="diag-fim", fisher=(1, 2, 3), progress=False)
    with pytest.raises(dv.DeltavarValueError, match="fisher"):
        m.delta_variance(q, sigma="diag-fim", fisher="a string", progress=False)
    # negative counts, a Σ matrix that is not a covariance
    with pytest.raises(dv.DeltavarValueError, match="batch_size"):
        m.fisher(cls.array("train_x.npy"), cls.array("train_y.npy"), batch_size=-1, progress=False)
    with pytest.raises(dv.DeltavarValueError, match="memory_budget"):
        m.delta_variance(q, sigma="identity", memory_budget=-5, progress=False)
    p = m.num_params([q.shape[1]])
    with pytest.raises(dv.DeltavarValueError, match="non-negative"):
        m.delta_variance(q, sigma=-np.eye(p), progress=False)
    # a Σ that needs a Fisher without one
    with pytest.raises(dv.DeltavarValueError, match="training data"):
        m.delta_variance(q, sigma="full-fim", progress=False)
    # a memory budget too small is its own kind
    with pytest.raises(dv.DeltavarMemoryError):
        m.delta_variance(q, sigma="full-fim", method="dense", memory_budget=16,
                         fisher=(cls.array("train_x.npy"), cls.array("train_y.npy")), progress=False)


def test_inputs_may_be_tensors_lists_or_paths(cls):
    m = model_of(cls)
    q = cls.array("queries.npy")
    want = m.delta_variance(q, sigma="identity", progress=False).delta_variance

    class TensorLike:
        """What a torch tensor offers: detach / cpu / numpy."""

        def __init__(self, a):
            self.a = a

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.a

    class ArrayLike:
        def __array__(self, dtype=None, copy=None):
            return q

    for form in [TensorLike(q), ArrayLike(), q.tolist(), q.astype(np.float32), cls.path("queries.npy"),
                 np.asfortranarray(q)]:
        got = m.delta_variance(form, sigma="identity", progress=False).delta_variance
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # a Σ array: the identity as a diagonal and as a matrix
    p = m.num_params([q.shape[1]])
    for s in [np.ones(p), np.eye(p)]:
        np.testing.assert_allclose(m.delta_variance(q, sigma=s, progress=False).delta_variance, want, rtol=1e-12)


def test_metrics_calibrate_and_evaluate(cls, tmp_path):
    r = dv.metrics([0.1, -2.0, 0.5, 3.0], [0.01, 4.0, 0.2, 9.0])
    assert r["spearman"] == pytest.approx(1.0) and r["m"] == 4
    with pytest.raises(dv.DeltavarValueError):
        dv.metrics([1.0, 2.0], [1.0])
    m = model_of(cls)
    x, y = cls.array("train_x.npy"), cls.array("train_y.npy")
    opts = dict(qoi="prob:1", sigma="diag-fim", fisher=(x, y), likelihood="categorical", damping=1e-3, progress=False)
    c = m.calibrate(x, y, out=tmp_path / "cal.json", **opts)
    assert len(c.scales) == len(c.layers) == 2 and np.isfinite(c.scales).all() and c.nll <= c.nll_one_scale + 1e-9
    assert (tmp_path / "cal.json").exists()
    r = m.delta_variance(x, calibration=c, **opts)
    assert r.calibration is not None and r.predictive_variance is not None
    r2 = m.delta_variance(x, calibration=tmp_path / "cal.json", **opts)
    np.testing.assert_array_equal(r.delta_variance, r2.delta_variance)
    with pytest.raises(dv.DeltavarValueError, match="fitted for Sigma"):
        m.delta_variance(x, calibration=c, **{**opts, "sigma": "identity", "fisher": None})
    ev = m.evaluate(x, y, **opts)
    assert ev["m"] == len(x) and np.isfinite(ev["nll"]) and ev["errors"].shape == (len(x),)
    split = m.delta_variance(x, by_layer=True, **opts)
    blocks = split.by_layer["blocks"]
    assert blocks.shape == (len(x), 2, 2)
    np.testing.assert_allclose(blocks.sum(axis=(1, 2)), split.delta_variance, rtol=1e-10)


def test_progress_lines_reach_the_bar(cls, capsys):
    m = model_of(cls)
    m.delta_variance(cls.array("queries.npy"), sigma="full-fim", method="kernel-cg",
                     fisher=(cls.array("train_x.npy"), cls.array("train_y.npy")), progress=True)
    err = capsys.readouterr().err
    assert "deltavar: " in err and "cg iteration" in err
    m.delta_variance(cls.array("queries.npy"), sigma="full-fim", method="kernel-cg",
                     fisher=(cls.array("train_x.npy"), cls.array("train_y.npy")), progress=False)
    assert capsys.readouterr().err == ""


def test_long_passes_release_the_gil(tmp_path):
    model, x, y = big_mlp(tmp_path)
    ticks = []
    done = threading.Event()

    def count():
        while not done.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    t0 = time.monotonic()
    f = model.fisher(x, y, progress=False)
    secs = time.monotonic() - t0
    done.set()
    t.join()
    assert f.num_examples == len(x)
    # the counting thread ran all along: without the GIL released it would tick once per switch
    # interval at best
    during = [s for s in ticks if t0 <= s <= t0 + secs]
    assert len(during) > 0.3 * secs / 0.001 * 0.5, (len(during), secs)


def test_ctrl_c_stops_a_pass(tmp_path):
    model, x, y = big_mlp(tmp_path)
    t0 = time.monotonic()
    model.fisher(x[:4096], y[:4096], batch_size=64, progress=False)
    step = time.monotonic() - t0  # one step of 64 batches
    timer = threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT))
    finished = False
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        model.fisher(x, y, batch_size=64, progress=False)
        finished = True
        time.sleep(30)  # should the pass end before the signal, the test fails below
    timer.cancel()
    assert not finished, "the pass ended before the signal: make it longer"
    # stopped at the next step, not at the end of the pass (about len(x) / 4096 steps)
    assert time.monotonic() - t0 < 0.2 + 3 * step + 0.5, (time.monotonic() - t0, step)


def test_from_torch_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    # batch norm with running statistics of its own (eval mode reads them)
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.randn(20, 1, 8, 8)
    y = torch.randint(0, 3, (20,))
    model = dv.Model.from_torch(net, x[:2], path=tmp_path / "net")
    assert (tmp_path / "net.onnx").exists()
    r = model.delta_variance(x[:5], qoi="prob:0", sigma="full-fim", fisher=(x, y), damping=1e-3, progress=False)
    # torch.func's per-example gradients, Σ = (F + λI)⁻¹ in float64
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach().double() for k, v in net.named_parameters()}
    netd = net.double()

    def ll(p, xi, yi):
        out = functional_call(netd, p, (xi[None],))
        return (torch.log_softmax(out, -1)[0] * yi).sum()

    onehot = torch.nn.functional.one_hot(y, 3).double()
    g = vmap(grad(ll), in_dims=(None, 0, 0))(params, x.double(), onehot)
    G = torch.cat([g[k].reshape(len(x), -1) for k in params], 1)
    F = G.T @ G / len(x) + 1e-3 * torch.eye(G.shape[1], dtype=torch.float64)

    def q(p, xi):
        return torch.softmax(functional_call(netd, p, (xi[None],)), -1)[0, 0]

    J = vmap(grad(q), in_dims=(None, 0))(params, x[:5].double())
    J = torch.cat([J[k].reshape(5, -1) for k in params], 1)
    want = torch.einsum("mp,mp->m", J, torch.linalg.solve(F, J.T).T).numpy()
    np.testing.assert_allclose(r.delta_variance, want, rtol=1e-4)


def test_every_fixture_folder_is_a_case():
    names = sorted(p.name for p in PARITY.iterdir() if p.is_dir())
    assert len(names) == 4
