"""The seed's numbers through the package, and the CLI's numbers to float rounding."""

import numpy as np
import pytest

import deltavar_rs as dv
from conftest import GRAPH, max_rel_err, parity_tol


def model_of(case):
    return dv.Model.from_safetensors(case.path("model.safetensors"), case.arch, dtype="f64")


@pytest.mark.parametrize(
    "sigma,key",
    [("identity", "identity"), ("diag-fim", "diagonal_empirical_fim"), ("full-fim", "inverse_full_empirical_fim")],
)
def test_seed_parity_from_arrays(case, sigma, key):
    model = model_of(case)
    r = model.delta_variance(
        case.array("queries.npy"),
        qoi=case.meta["qoi"],
        sigma=sigma,
        fisher=None if sigma == "identity" else (case.array("train_x.npy"), case.array("train_y.npy")),
        likelihood=case.likelihood,
        damping=case.meta["damping"],
        progress=False,
    )
    assert isinstance(r.delta_variance, np.ndarray) and r.delta_variance.shape == (case.meta["m"],)
    assert max_rel_err(r.delta_variance, case.expected[key]) < parity_tol(case.name, key)
    assert max_rel_err(r.qoi, case.expected["qoi_value"]) < 1e-12
    assert r.num_params == case.expected["num_params"]
    if sigma == "full-fim":
        assert isinstance(r.method, str) and isinstance(r.reason, str)
    np.testing.assert_allclose(r.std, np.sqrt(r.delta_variance))


@pytest.mark.parametrize("method", ["dense", "kernel", "kernel-cg", "cg"])
def test_each_full_method_by_name(case, method):
    r = model_of(case).delta_variance(
        case.path("queries.npy"),
        qoi=case.meta["qoi"],
        fisher=(case.path("train_x.npy"), case.path("train_y.npy")),
        likelihood=case.likelihood,
        damping=case.meta["damping"],
        method=method,
        progress=False,
    )
    assert r.method == method
    m = {"dense": "direct", "kernel-cg": "kernel"}.get(method, method)
    assert max_rel_err(r.delta_variance, case.expected["inverse_full_empirical_fim"]) < parity_tol(
        case.name, "inverse_full_empirical_fim", m
    )
    if method in ("cg", "kernel-cg"):
        assert r.cg is not None and r.cg["iterations"] >= 1


def test_fisher_diagonal_is_the_seeds_mean_diagonal(case):
    f = model_of(case).fisher(case.array("train_x.npy"), case.array("train_y.npy"), likelihood=case.likelihood,
                              progress=False)
    assert f.num_examples == case.meta["n"] and f.kind == "diag" and f.complete
    d = f.diagonal
    # named and shaped like the parameters, in the seed's order
    assert [(k, list(v.shape)) for k, v in d.items()] == [(n, list(s)) for n, s in case.expected["param_order"]]
    flat = np.concatenate([v.ravel() for v in d.values()])
    assert max_rel_err(flat, case.expected["fim_diagonal"]) < 1e-12


def test_a_saved_fisher_gives_the_training_datas_answer(case, tmp_path):
    model = model_of(case)
    x, y = case.array("train_x.npy"), case.array("train_y.npy")
    common = dict(qoi=case.meta["qoi"], likelihood=case.likelihood, damping=case.meta["damping"], progress=False)
    for kind, sigma in [("diag", "diag-fim"), ("dense", "full-fim")]:
        f = model.fisher(x, y, likelihood=case.likelihood, kind=kind, progress=False)
        f.save(tmp_path / f"{kind}.fim")
        g = dv.Fisher.load(tmp_path / f"{kind}.fim")
        a = model.delta_variance(case.array("queries.npy"), sigma=sigma, fisher=g, **common)
        b = model.delta_variance(case.array("queries.npy"), sigma=sigma, fisher=(x, y), **common)
        assert max_rel_err(a.delta_variance, b.delta_variance) < 1e-10
    # shards merge to the one pass
    parts = [model.fisher(x, y, likelihood=case.likelihood, shard=f"{i}/3", progress=False) for i in range(3)]
    assert not parts[0].complete
    merged = dv.Fisher.merge(parts)
    whole = model.fisher(x, y, likelihood=case.likelihood, progress=False)
    assert merged.complete and merged.num_examples == whole.num_examples
    for k in whole.diagonal:
        np.testing.assert_allclose(merged.diagonal[k], whole.diagonal[k], rtol=1e-13)
    # a partial Fisher is refused unless allowed, and then warns
    q = case.array("queries.npy")
    with pytest.raises(dv.DeltavarValueError):
        model.delta_variance(q, sigma="diag-fim", fisher=parts[0], **common)
    with pytest.warns(UserWarning):
        model.delta_variance(q, sigma="diag-fim", fisher=parts[0].allow_partial(), **common)


def test_the_same_numbers_as_the_cli(case, cli, tmp_path):
    """Same library call, same inputs: the package and the CLI agree bit for bit."""
    base = ["--weights", case.path("model.safetensors"), "--arch", case.arch, "--queries", case.path("queries.npy"),
            "--qoi", case.meta["qoi"], "--damping", case.meta["damping"], "--dtype", "f64"]
    data = ["--train-x", case.path("train_x.npy"), "--train-y", case.path("train_y.npy"),
            "--likelihood", case.likelihood]
    model = model_of(case)
    for sigma in ["identity", "diag-fim", "full-fim", "kfac", "lowrank:4"]:
        want = cli("variance", *base, "--sigma", sigma, *(data if sigma != "identity" else []), "--quiet")
        got = model.delta_variance(
            case.array("queries.npy"), qoi=case.meta["qoi"], sigma=sigma,
            fisher=(case.array("train_x.npy"), case.array("train_y.npy")) if sigma != "identity" else None,
            likelihood=case.likelihood, damping=case.meta["damping"], progress=False,
        )
        np.testing.assert_array_equal(got.delta_variance, np.asarray(want["delta_variance"]), err_msg=sigma)
        np.testing.assert_array_equal(got.qoi, np.asarray(want["qoi"]))
        assert got.method == want["method"] and got.sigma == want["sigma"]
    # every output's covariance
    want = cli("variance", *base[:-6], "--qoi", "outputs", "--damping", case.meta["damping"], "--dtype", "f64",
               "--sigma", "full-fim", *data, "--quiet")
    got = model.delta_variance(case.array("queries.npy"), qoi="outputs", fisher=(case.array("train_x.npy"),
                               case.array("train_y.npy")), likelihood=case.likelihood, damping=case.meta["damping"],
                               progress=False)
    np.testing.assert_array_equal(got.covariance, np.asarray(want["covariance"]))
    k = case.meta["sizes"][-1]
    assert got.covariance.shape == (case.meta["m"], k, k) and got.delta_variance.shape == (case.meta["m"], k)
    # the Fisher pass writes the file the CLI writes
    out = tmp_path / "cli.fim"
    cli("fim", "--weights", case.path("model.safetensors"), "--arch", case.arch, "--dtype", "f64",
        "--train-x", case.path("train_x.npy"), "--train-y", case.path("train_y.npy"),
        "--likelihood", case.likelihood, "--out", out, "--quiet")
    a = dv.Fisher.load(out).diagonal
    b = model.fisher(case.path("train_x.npy"), case.path("train_y.npy"), likelihood=case.likelihood,
                     progress=False).diagonal
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("name", ["resblock", "gpt"])
def test_an_onnx_model_gives_the_clis_numbers(name, cli):
    import json

    d = GRAPH / name
    meta = json.loads((d / "case.json").read_text())
    model = dv.Model.from_onnx(d / "model.onnx", weights=d / "model.safetensors")
    args = ["--arch", f"onnx:{d / 'model.onnx'}", "--weights", d / "model.safetensors", "--queries", d / "queries.npy",
            "--train-x", d / "train_x.npy", "--train-y", d / "train_y.npy", "--likelihood", meta["lik"],
            "--qoi", meta["qoi"], "--damping", meta["damping"], "--rollout", meta["rollout"], "--quiet"]
    for sigma in ["diag-fim", "full-fim"]:
        want = cli("variance", *args, "--sigma", sigma)
        got = model.delta_variance(np.load(d / "queries.npy"), qoi=meta["qoi"], sigma=sigma,
                                   fisher=(np.load(d / "train_x.npy"), np.load(d / "train_y.npy")),
                                   likelihood=meta["lik"], damping=meta["damping"], rollout=meta["rollout"],
                                   progress=False)
        np.testing.assert_array_equal(got.delta_variance, np.asarray(want["delta_variance"]))
        assert np.all(got.delta_variance > 0)
    params = model.parameters(np.load(d / "queries.npy").shape[1:])
    assert set(meta["params"]) <= set(params)
    assert sum(int(np.prod(s)) for s in params.values()) == got.num_params
