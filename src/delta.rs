//! Stage 5: the delta variance ΔVar(z) = ∇q(z)ᵀ Σ ∇q(z): Σ built once from a strategy
//! ([`build_sigma`]), applied to blocks of query gradients ([`delta_variances`]) or to query
//! gradients held layer by layer ([`query_delta_variances`]), and the whole pipeline for any
//! engine ([`engine_delta_variances_with`]; [`mlp_delta_variances`] for a known MLP).

use faer::{Mat, MatRef};

use crate::data::Dataset;
use crate::engine::{FactoredOptions, LayeredGradients, QueryGradients};
use crate::error::{Error, Result};
use crate::fisher::{FisherSource, DEFAULT_MEMORY_BUDGET};
use crate::likelihood::Likelihood;
use crate::qoi::Qoi;
use crate::sigma::{
    choose_full_method, CgInverseFisher, CgOptions, CustomSigma, DenseSigma, DiagonalSigma,
    FullMethod, IdentitySigma, InverseDiagonalFisher, InverseFullFisher, KernelInverseFisher,
    KernelPrecision, KfacSigma, LowRankInverseFisher, LowRankOptions, MethodChoice, QuadForms,
    ScaledSigma, SigmaOp,
};

/// How Σ is chosen (the seed's `sigma_strategy`).
pub enum SigmaStrategy {
    /// `'identity'`: Σ = I.
    Identity,
    /// `'diagonal_empirical_fim'`: Σ = diag(F + λ)⁻¹. Needs a [`FisherSource`].
    DiagonalEmpiricalFim,
    /// `'inverse_full_empirical_fim'`: Σ = (F + λI)⁻¹. Needs a [`FisherSource`].
    InverseFullEmpiricalFim,
    /// Beyond the seed: Σ = (U S Uᵀ + D + λI)⁻¹ from the top-k eigenpairs of F and a diagonal
    /// correction ([`LowRankInverseFisher`]). Needs a [`FisherSource`]; the options'
    /// `memory_budget` is replaced by [`SigmaOptions::memory_budget`].
    LowRankEmpiricalFim(LowRankOptions),
    /// Beyond the seed: Σ = the K-FAC approximation of (F + λI)⁻¹ (per layer reading rows the
    /// damped inverse of Ā ⊗ Ḡ, the exact damped diagonal elsewhere: [`crate::sigma::KfacSigma`]).
    /// Needs a [`FisherSource`] with Kronecker factors: a Fisher over training data on the
    /// graph or capture engine ([`crate::GraphFisher`], [`crate::CapturedFisher`]); a saved
    /// Fisher and the generic engine have none.
    KfacEmpiricalFim,
    /// A 1-D tensor in the seed: Σ = diag(d).
    Diagonal(Vec<f64>),
    /// A 2-D tensor in the seed: Σ = S (P×P).
    Dense(Mat<f64>),
    /// A callable in the seed: g ↦ gᵀΣg.
    Custom(CustomSigma),
}

impl std::fmt::Debug for SigmaStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigmaStrategy({})", self.name())
    }
}

impl SigmaStrategy {
    /// The seed's name for the strategy.
    pub fn name(&self) -> &'static str {
        match self {
            SigmaStrategy::Identity => "identity",
            SigmaStrategy::DiagonalEmpiricalFim => "diagonal_empirical_fim",
            SigmaStrategy::InverseFullEmpiricalFim => "inverse_full_empirical_fim",
            SigmaStrategy::LowRankEmpiricalFim(_) => "lowrank_empirical_fim",
            SigmaStrategy::KfacEmpiricalFim => "kfac",
            SigmaStrategy::Diagonal(_) => "diagonal",
            SigmaStrategy::Dense(_) => "dense",
            SigmaStrategy::Custom(_) => "custom",
        }
    }

    /// Whether Σ is built from a Fisher (the empirical-Fisher strategies; a given Σ or the
    /// identity needs none).
    pub fn needs_fisher(&self) -> bool {
        matches!(
            self,
            SigmaStrategy::DiagonalEmpiricalFim
                | SigmaStrategy::InverseFullEmpiricalFim
                | SigmaStrategy::LowRankEmpiricalFim(_)
                | SigmaStrategy::KfacEmpiricalFim
        )
    }
}

impl std::str::FromStr for SigmaStrategy {
    type Err = Error;
    /// The Fisher-free and Fisher strategies by name: `identity`, `diag-fim` (or the seed's
    /// `diagonal_empirical_fim`), `full-fim` (or `inverse_full_empirical_fim`), `lowrank:K`
    /// (k eigenpairs and the diagonal correction), `lowrank:K:nodiag` (without it) or `kfac`.
    fn from_str(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("lowrank:") {
            let (k, diagonal) = match rest.split_once(':') {
                None => (rest, true),
                Some((k, "nodiag")) => (k, false),
                Some((_, other)) => {
                    return Err(Error::invalid(
                        "sigma",
                        s,
                        format!(
                        "unknown low-rank option '{other}'; expected lowrank:K or lowrank:K:nodiag"
                    ),
                    ))
                }
            };
            let rank: usize = k.parse().map_err(|_| {
                Error::invalid("sigma", s, "lowrank:K needs a positive integer rank K")
            })?;
            if rank == 0 {
                return Err(Error::invalid("sigma", s, "lowrank:K needs K ≥ 1"));
            }
            return Ok(SigmaStrategy::LowRankEmpiricalFim(LowRankOptions {
                diagonal,
                ..LowRankOptions::rank(rank)
            }));
        }
        match s {
            "identity" => Ok(SigmaStrategy::Identity),
            "diag-fim" | "diagonal_empirical_fim" => Ok(SigmaStrategy::DiagonalEmpiricalFim),
            "full-fim" | "inverse_full_empirical_fim" => Ok(SigmaStrategy::InverseFullEmpiricalFim),
            "kfac" => Ok(SigmaStrategy::KfacEmpiricalFim),
            _ => Err(Error::invalid(
                "sigma",
                s,
                "expected identity, diag-fim, full-fim, kfac or lowrank:K",
            )),
        }
    }
}

/// Options of Σ (the seed's `sigma_options`).
#[derive(Debug, Clone)]
pub struct SigmaOptions {
    /// λ added to the Fisher before inversion. Default 1e-5, as in the seed.
    pub damping: f64,
    /// Divide the Fisher-based Σ by N: the paper's canonical Σ = F⁻¹/N. Default false (the
    /// seed's semantics). Only for the empirical-FIM strategies.
    pub posterior_scale: bool,
    /// Largest dense allocation allowed, in bytes. Default [`DEFAULT_MEMORY_BUDGET`].
    pub memory_budget: u64,
    /// How the full inverse Fisher is applied. Default [`FullMethod::Auto`].
    pub full_method: FullMethod,
    /// Options of the CG method (its `memory_budget` is replaced by this struct's).
    pub cg: CgOptions,
    /// Right-hand sides the automatic method choice plans for. Default 16.
    pub expected_queries: usize,
    /// Precision of the kernel method's factorization. Default [`KernelPrecision::Auto`] (f64).
    pub kernel_precision: KernelPrecision,
}

impl Default for SigmaOptions {
    fn default() -> Self {
        Self {
            damping: 1e-5,
            posterior_scale: false,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            full_method: FullMethod::Auto,
            cg: CgOptions::default(),
            expected_queries: 16,
            kernel_precision: KernelPrecision::Auto,
        }
    }
}

/// A built Σ and, for the full inverse Fisher, the method chosen and why. Dereferences to the
/// operator, so `&*built` is a `&dyn SigmaOp`.
pub struct BuiltSigma<'a> {
    /// The operator.
    pub op: Box<dyn SigmaOp + 'a>,
    /// The full-inverse method chosen and why (`None` for the other strategies).
    pub method: Option<MethodChoice>,
}

impl<'a> BuiltSigma<'a> {
    /// (operator, method choice).
    pub fn into_parts(self) -> (Box<dyn SigmaOp + 'a>, Option<MethodChoice>) {
        (self.op, self.method)
    }
}

impl<'a> std::ops::Deref for BuiltSigma<'a> {
    type Target = dyn SigmaOp + 'a;
    fn deref(&self) -> &Self::Target {
        &*self.op
    }
}

/// Builds Σ once, to apply to as many query gradients as needed, together with the method
/// chosen for the full inverse Fisher (and why).
///
/// `num_params` is P (the query gradients' length); `fisher` is required for the empirical-FIM
/// strategies (an [`Error::MissingInput`] otherwise) and its P must match. The full inverse
/// Fisher is applied by the method of `opts.full_method`; each Σ kind is built from the Fisher
/// source ([`FisherSource`]), the only thing it sees.
///
/// ```
/// use deltavar::{build_sigma, SigmaOptions, SigmaStrategy};
/// let s = build_sigma(SigmaStrategy::Diagonal(vec![2.0, 3.0]), 2, &SigmaOptions::default(), None).unwrap();
/// assert_eq!(s.quad_form(&[1.0, 1.0]).unwrap(), 5.0);
/// assert!(s.method.is_none());
/// ```
pub fn build_sigma<'a>(
    strategy: SigmaStrategy,
    num_params: usize,
    opts: &SigmaOptions,
    fisher: Option<&'a dyn FisherSource>,
) -> Result<BuiltSigma<'a>> {
    let name = strategy.name();
    if opts.posterior_scale && !strategy.needs_fisher() {
        return Err(Error::invalid(
            "posterior_scale",
            true,
            format!("the 1/N posterior scaling applies to the empirical-FIM strategies only, not '{name}'"),
        ));
    }
    let user: Box<dyn SigmaOp> = match strategy {
        SigmaStrategy::Identity => Box::new(IdentitySigma::new(num_params)),
        SigmaStrategy::Diagonal(d) => Box::new(DiagonalSigma::new(d)?),
        SigmaStrategy::Dense(m) => Box::new(DenseSigma::new(m)?),
        SigmaStrategy::Custom(c) => Box::new(c),
        SigmaStrategy::DiagonalEmpiricalFim
        | SigmaStrategy::InverseFullEmpiricalFim
        | SigmaStrategy::LowRankEmpiricalFim(_)
        | SigmaStrategy::KfacEmpiricalFim => {
            let src = fisher.ok_or_else(|| Error::MissingInput {
                strategy: name.into(),
                missing:
                    "a Fisher source (log-likelihood closure, parameters and training dataset)"
                        .into(),
            })?;
            if src.num_params() != num_params {
                return Err(Error::shape(
                    format!("Fisher source for '{name}' (its parameters must be those of the QoI gradient)"),
                    format!("{num_params} parameters"),
                    format!("{} parameters", src.num_params()),
                ));
            }
            let (op, method) = fisher_sigma(strategy, src, opts)?;
            return Ok(BuiltSigma { op, method });
        }
    };
    if user.dim() != num_params {
        return Err(Error::shape(
            format!("Sigma '{name}' (its size must equal the number of parameters P)"),
            format!("P = {num_params}"),
            format!("P = {}", user.dim()),
        ));
    }
    Ok(BuiltSigma {
        op: user,
        method: None,
    })
}

/// The empirical-FIM strategies: Σ from the Fisher source (of the QoI's parameters), scaled
/// by 1/N if asked.
fn fisher_sigma<'a>(
    strategy: SigmaStrategy,
    src: &'a dyn FisherSource,
    opts: &SigmaOptions,
) -> Result<(Box<dyn SigmaOp + 'a>, Option<MethodChoice>)> {
    let name = strategy.name();
    let n = src.num_examples();
    let (sigma, choice): (Box<dyn SigmaOp + 'a>, Option<MethodChoice>) = match strategy {
        SigmaStrategy::DiagonalEmpiricalFim => (
            Box::new(InverseDiagonalFisher::from_fisher(src, opts.damping)?),
            None,
        ),
        SigmaStrategy::LowRankEmpiricalFim(lo) => {
            let lo = LowRankOptions {
                memory_budget: opts.memory_budget,
                ..lo
            };
            (
                Box::new(LowRankInverseFisher::from_fisher(src, opts.damping, &lo)?),
                None,
            )
        }
        SigmaStrategy::KfacEmpiricalFim => {
            let f = src.kronecker_factors().ok_or_else(|| Error::MissingInput {
                strategy: name.into(),
                missing: "a Fisher source with Kronecker factors: training data through the graph or capture engine (a saved Fisher and the generic engine have none)".into(),
            })??;
            (Box::new(KfacSigma::new(&f, opts.damping)?), None)
        }
        _ => {
            let (s, c) = build_full(src, opts)?;
            (s, Some(c))
        }
    };
    if opts.posterior_scale {
        if n == 0 {
            return Err(Error::invalid(
                "posterior_scale",
                true,
                "the training dataset is empty, so there is no N to divide by",
            ));
        }
        return Ok((Box::new(ScaledSigma::new(sigma, 1.0 / n as f64)?), choice));
    }
    Ok((sigma, choice))
}

/// Σ = (F + λI)⁻¹ by the chosen method.
fn build_full<'a>(
    src: &'a dyn FisherSource,
    opts: &SigmaOptions,
) -> Result<(Box<dyn SigmaOp + 'a>, MethodChoice)> {
    let (p, n) = (src.num_params(), src.num_examples());
    let requested = if opts.full_method == FullMethod::Auto
        && (opts.damping == 0.0 || !src.has_gradient_operator())
    {
        // the kernel and CG methods need λ > 0 and per-example gradients
        FullMethod::Dense
    } else {
        opts.full_method
    };
    let choice = choose_full_method(
        requested,
        p,
        n,
        src.gram_width(),
        src.gradient_operator_bytes(opts.memory_budget),
        opts.expected_queries,
        opts.memory_budget,
    )?;
    let sigma: Box<dyn SigmaOp + 'a> = match choice.method {
        FullMethod::Kernel if n > 0 => Box::new(KernelInverseFisher::with_precision(
            src.gradient_matrix(opts.memory_budget)?,
            opts.damping,
            opts.kernel_precision,
        )?),
        FullMethod::KernelCg if n > 0 => Box::new(KernelInverseFisher::iterative(
            src.gradient_matrix(opts.memory_budget)?,
            opts.damping,
            &CgOptions {
                memory_budget: opts.memory_budget,
                ..opts.cg.clone()
            },
        )?),
        FullMethod::Cg if n > 0 => Box::new(CgInverseFisher::from_fisher(
            src,
            opts.damping,
            CgOptions {
                memory_budget: opts.memory_budget,
                ..opts.cg.clone()
            },
        )?),
        // dense, and the empty dataset for every method (F = 0, so Σ = I/λ exactly)
        _ => Box::new(InverseFullFisher::from_fisher(
            src,
            opts.damping,
            opts.memory_budget,
        )?),
    };
    Ok((sigma, choice))
}

/// ΔVar for a P×M block of query gradients (one column each) under a built Σ.
pub fn delta_variances(qoi_gradients: MatRef<'_, f64>, sigma: &dyn SigmaOp) -> Result<Vec<f64>> {
    sigma.quad_forms(qoi_gradients)
}

/// Which route [`query_delta_variances`] took for a Σ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryPath {
    /// A diagonal Σ on the factors: Σ_l rowsum((Δq∘Δq)∘((Xq∘Xq)S_Wᵀ)) + (Δq∘Δq)s_b, no
    /// gradients formed.
    DiagonalFactored,
    /// The Σ's own factored quadratic forms (the kernel Σ: G·q from the factors), no gradients
    /// formed.
    Factored,
    /// The P×M block of query gradients formed and handed to the Σ.
    Gradients,
}

/// ΔVarⱼ = qⱼᵀ Σ qⱼ for query gradients held layer by layer ([`LayeredGradients`], from any
/// engine's `query_layered_gradients`), with the route taken and, for CG, the solver's
/// report. A diagonal Σ (identity, diagonal, inverse diagonal Fisher, and their scalings)
/// never forms the gradients of a factored layer read once per example
/// ([`QueryPath::DiagonalFactored`]); the kernel Σ over a layered gradient operator of the
/// same layout takes them pair by pair ([`QueryPath::Factored`]); any other Σ gets the formed
/// P×M block (O(P·M) memory).
pub fn query_delta_variances_reported(
    q: &LayeredGradients,
    sigma: &dyn SigmaOp,
) -> Result<(QuadForms, QueryPath)> {
    let p = q.num_params();
    if sigma.dim() != p {
        return Err(Error::shape(
            format!(
                "Sigma '{}' (its size must equal the number of parameters P)",
                sigma.name()
            ),
            format!("P = {p}"),
            format!("P = {}", sigma.dim()),
        ));
    }
    if let Some(d) = sigma.diagonal() {
        let values = crate::sigma::finish(&sigma.name(), q.quad_forms_diag(&d)?)?;
        return Ok((QuadForms { values, cg: None }, QueryPath::DiagonalFactored));
    }
    if let Some(r) = sigma.quad_forms_layered(q) {
        let values = crate::sigma::finish(&sigma.name(), r?)?;
        return Ok((QuadForms { values, cg: None }, QueryPath::Factored));
    }
    let r = sigma.quad_forms_reported(q.to_dense().as_ref())?;
    Ok((r, QueryPath::Gradients))
}

/// ΔVarⱼ for query gradients held layer by layer (see [`query_delta_variances_reported`]).
pub fn query_delta_variances(q: &LayeredGradients, sigma: &dyn SigmaOp) -> Result<Vec<f64>> {
    Ok(query_delta_variances_reported(q, sigma)?.0.values)
}

/// The delta variances of a [`crate::Mlp`] in one call, on the graph engine
/// ([`crate::GraphEngine::from_mlp`]): Σ from `strategy` (the Fisher strategies use a
/// [`crate::GraphFisher`] over `training`), query gradients from one batched pass over the rows
/// of `queries`, and ΔVar for every row (a diagonal Σ never forms the Jacobian). The same as
/// [`engine_delta_variances_with`] on that engine; any other model goes there.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use deltavar::*;
/// let vm = VarMap::new();
/// let mlp = Mlp::new(VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu), &[2, 16, 1], Activation::Tanh, None).unwrap();
/// let x = Tensor::randn(0f64, 1., (64, 2), &Device::Cpu).unwrap();
/// let y = Tensor::randn(0f64, 1., (64, 1), &Device::Cpu).unwrap();
/// let data = TensorDataset::new(x, y).unwrap();
/// let z = Tensor::new(&[[0.0f64, 0.0], [3.0, 3.0]], &Device::Cpu).unwrap();
/// let out = mlp_delta_variances(
///     &mlp, Qoi::Sum, &z, SigmaStrategy::DiagonalEmpiricalFim,
///     &SigmaOptions { damping: 1e-3, ..Default::default() },
///     Some((&data, Likelihood::gaussian(0.5))), &FactoredOptions::default(),
/// ).unwrap();
/// assert_eq!(out.delta_variance.len(), 2);
/// ```
pub fn mlp_delta_variances(
    mlp: &crate::Mlp,
    qoi: Qoi,
    queries: &candle_core::Tensor,
    strategy: SigmaStrategy,
    opts: &SigmaOptions,
    training: Option<(&dyn Dataset, Likelihood)>,
    engine_opts: &FactoredOptions,
) -> Result<DeltaVariances> {
    let engine = crate::engine::GraphEngine::from_mlp(mlp)?;
    let fisher = training.map(|(data, lik)| {
        crate::fisher::GraphFisher::with_engine(engine.clone(), lik, data, engine_opts.clone())
    });
    let req = DeltaRequest {
        qoi,
        options: opts.clone(),
        fisher: fisher.as_ref().map(|f| f as &dyn FisherSource),
        engine: engine_opts.clone(),
        ..DeltaRequest::new(queries, strategy)
    };
    engine_delta_variances_with(&engine, req)
}

/// One delta-variance question for any engine with query gradients ([`QueryGradients`]: the
/// graph and capture engines): the QoI at the rows of `queries` after `rollout` applications
/// of the model, under the Σ that `strategy` and `options` build (the Fisher strategies read
/// `fisher`), the engine run with `engine`. What [`engine_delta_variances_with`],
/// [`engine_group_delta_variances_with`] and [`engine_delta_covariances_with`] answer.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use deltavar::*;
/// let z = Tensor::new(&[[0.0f64, 1.0]], &Device::Cpu).unwrap();
/// let req = DeltaRequest::new(&z, SigmaStrategy::Identity).qoi(Qoi::Output(0)).rollout(3);
/// assert_eq!((req.rollout, req.fisher.is_none()), (3, true));
/// ```
pub struct DeltaRequest<'a> {
    /// The quantity of interest (default [`Qoi::Sum`]); the covariances take every output and
    /// do not read it.
    pub qoi: Qoi,
    /// The query inputs, one per row.
    pub queries: &'a candle_core::Tensor,
    /// Read the QoI after this many applications of the model (default 1; more need equal
    /// input and output shapes).
    pub rollout: usize,
    /// How Σ is built.
    pub strategy: SigmaStrategy,
    /// Σ's options (default [`SigmaOptions::default`]).
    pub options: SigmaOptions,
    /// The Fisher the Fisher strategies read (default none).
    pub fisher: Option<&'a dyn FisherSource>,
    /// Batch size and threads of the engine's query pass (default
    /// [`FactoredOptions::default`]).
    pub engine: FactoredOptions,
}

impl<'a> DeltaRequest<'a> {
    /// ΔVar of the sum of the outputs at `queries` under `strategy`, one step, default options.
    pub fn new(queries: &'a candle_core::Tensor, strategy: SigmaStrategy) -> Self {
        Self {
            qoi: Qoi::Sum,
            queries,
            rollout: 1,
            strategy,
            options: SigmaOptions::default(),
            fisher: None,
            engine: FactoredOptions::default(),
        }
    }
    /// The quantity of interest.
    pub fn qoi(mut self, qoi: Qoi) -> Self {
        self.qoi = qoi;
        self
    }
    /// Read the QoI after `steps` applications of the model.
    pub fn rollout(mut self, steps: usize) -> Self {
        self.rollout = steps;
        self
    }
    /// Σ's options.
    pub fn options(mut self, options: SigmaOptions) -> Self {
        self.options = options;
        self
    }
    /// The Fisher the Fisher strategies read.
    pub fn fisher(mut self, fisher: &'a dyn FisherSource) -> Self {
        self.fisher = Some(fisher);
        self
    }
    /// The engine's options.
    pub fn engine_options(mut self, engine: FactoredOptions) -> Self {
        self.engine = engine;
        self
    }

    /// Σ built once for `engine`'s parameters (the strategy is taken out of the request).
    fn take_sigma(&mut self, engine: &dyn QueryGradients) -> Result<BuiltSigma<'a>> {
        let strategy = std::mem::replace(&mut self.strategy, SigmaStrategy::Identity);
        build_sigma(strategy, engine.num_params(), &self.options, self.fisher)
    }
}

/// The delta variances of any engine with query gradients ([`QueryGradients`]: the graph and
/// capture engines) for one [`DeltaRequest`]: Σ built once, the QoI gradients at the queries,
/// and ΔVar for every row. A non-diagonal Σ takes the queries held layer by layer (the kernel
/// Σ pairs them with the training gradients without forming the P×M block); a diagonal Σ its
/// quadratic forms inside the query pass where the engine can, else the P×M block.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use deltavar::*;
/// let spec: SeqSpec = "seq:linear(2,8),tanh,linear(8,2)".parse().unwrap();
/// let model = Sequential::init(spec, &[2], DType::F64, 0).unwrap();
/// let engine = GraphEngine::from_sequential(&model).unwrap();
/// let x = Tensor::randn(0f64, 1., (32, 2), &Device::Cpu).unwrap();
/// let y = Tensor::randn(0f64, 1., (32, 2), &Device::Cpu).unwrap();
/// let data = TensorDataset::new(x, y).unwrap();
/// let fisher = GraphFisher::with_engine(engine.clone(), Likelihood::gaussian(0.5), &data, FactoredOptions::default());
/// let z = Tensor::new(&[[0.0f64, 0.0], [1.0, -1.0]], &Device::Cpu).unwrap();
/// // the QoI: output 0 after 3 steps of the network
/// let req = DeltaRequest::new(&z, SigmaStrategy::InverseFullEmpiricalFim)
///     .qoi(Qoi::Output(0))
///     .rollout(3)
///     .options(SigmaOptions { damping: 1e-3, ..Default::default() })
///     .fisher(&fisher);
/// let out = engine_delta_variances_with(&engine, req).unwrap();
/// assert_eq!(out.delta_variance.len(), 2);
/// ```
pub fn engine_delta_variances_with(
    engine: &dyn QueryGradients,
    req: DeltaRequest<'_>,
) -> Result<DeltaVariances> {
    let p = engine.num_params();
    let mut a = req;
    let (sigma, choice) = a.take_sigma(engine)?.into_parts();
    let fisher = a.fisher;
    if let Some(d) = sigma.diagonal() {
        // a diagonal Σ straight from each batch's pass where the engine can: no query
        // gradients kept
        if let Some(r) = engine.query_diag_forms(&a.qoi, a.queries, a.rollout, &a.engine, &d) {
            let (values, forms) = r?;
            let forms = QuadForms {
                values: crate::sigma::finish(&sigma.name(), forms)?,
                cg: None,
            };
            let path = QueryPath::DiagonalFactored;
            return Ok(assemble(values, forms, path, &*sigma, choice, p, fisher));
        }
    } else if let Some(r) = engine.query_layered_gradients(
        &a.qoi,
        a.queries,
        a.rollout,
        &a.engine,
        crate::engine::LayerRoute::Auto,
    ) {
        // the kernel Σ takes the queries layer by layer (no P×M block for factored layers)
        let (ql, values) = r?;
        let (forms, path) = query_delta_variances_reported(&ql, &*sigma)?;
        return Ok(assemble(values, forms, path, &*sigma, choice, p, fisher));
    }
    let (qg, values) = engine.query_gradients(&a.qoi, a.queries, a.rollout, &a.engine)?;
    Ok(from_gradients(qg.as_ref(), values, &*sigma, choice, fisher, None)?.0)
}

/// The result record from the values, the forms and the route taken.
fn assemble(
    values: Vec<f64>,
    forms: QuadForms,
    path: QueryPath,
    sigma: &dyn SigmaOp,
    choice: Option<MethodChoice>,
    num_params: usize,
    fisher: Option<&dyn FisherSource>,
) -> DeltaVariances {
    DeltaVariances {
        qoi: values,
        delta_variance: forms.values,
        sigma: sigma.name(),
        method: choice,
        cg: forms.cg.or_else(|| sigma.solve_report()),
        lowrank: sigma.lowrank_report(),
        path,
        num_params,
        num_train: fisher.map(|f| f.num_examples()).unwrap_or(0),
    }
}

/// The result of a pipeline whose query gradients are formed (P×M), and with `groups` the
/// per-layer blocks too.
fn from_gradients(
    qg: MatRef<'_, f64>,
    values: Vec<f64>,
    sigma: &dyn SigmaOp,
    choice: Option<MethodChoice>,
    fisher: Option<&dyn FisherSource>,
    groups: Option<&[crate::calibration::ParamGroup]>,
) -> Result<(DeltaVariances, Option<Vec<Vec<f64>>>)> {
    let forms = sigma.quad_forms_reported(qg)?;
    let blocks = groups
        .map(|g| crate::calibration::group_delta_variances(qg, sigma, g))
        .transpose()?;
    let out = assemble(
        values,
        forms,
        QueryPath::Gradients,
        sigma,
        choice,
        qg.nrows(),
        fisher,
    );
    Ok((out, blocks))
}

/// Delta variances split by parameter group (one group per layer): the ordinary result and
/// the L×L blocks C_lk(zₘ) = g_l(zₘ)ᵀ Σ_lk g_k(zₘ) for every query
/// ([`crate::calibration::group_delta_variances`]), the input of learned Σ scales. Costs L
/// applications of Σ to the P×M query-gradient block (formed: O(P·M)).
#[derive(Debug, Clone)]
pub struct GroupDeltaVariances {
    /// The ordinary delta variances (and QoI values, Σ, method).
    pub result: DeltaVariances,
    /// The groups, in parameter order.
    pub groups: Vec<crate::calibration::ParamGroup>,
    /// M row-major L×L blocks (entries sum to ΔVar; the diagonal is each group's own ΔVar_l).
    pub blocks: Vec<Vec<f64>>,
}

/// [`engine_delta_variances_with`] split by parameter group ([`GroupDeltaVariances`];
/// `groups` in parameter order, for example [`named_groups`] of the parameters).
pub fn engine_group_delta_variances_with(
    engine: &dyn QueryGradients,
    groups: Vec<crate::calibration::ParamGroup>,
    req: DeltaRequest<'_>,
) -> Result<GroupDeltaVariances> {
    let mut a = req;
    let (sigma, choice) = a.take_sigma(engine)?.into_parts();
    let (qg, values) = engine.query_gradients(&a.qoi, a.queries, a.rollout, &a.engine)?;
    let (result, blocks) = from_gradients(
        qg.as_ref(),
        values,
        &*sigma,
        choice,
        a.fisher,
        Some(&groups),
    )?;
    Ok(GroupDeltaVariances {
        result,
        groups,
        blocks: blocks.unwrap_or_default(),
    })
}

/// The parameter groups (one per layer, by the names' module prefix) of named tensors in flat
/// order.
pub fn named_groups(
    named: &[(String, candle_core::Tensor)],
) -> Vec<crate::calibration::ParamGroup> {
    let sizes: Vec<(&str, usize)> = named
        .iter()
        .map(|(n, t)| (n.as_str(), t.elem_count()))
        .collect();
    crate::calibration::layer_groups(&sizes)
}

/// The result of [`mlp_delta_variances`] and [`engine_delta_variances_with`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeltaVariances {
    /// q(θ, zⱼ) for every query row.
    pub qoi: Vec<f64>,
    /// ΔVar(zⱼ) for every query row.
    pub delta_variance: Vec<f64>,
    /// The Σ used.
    pub sigma: String,
    /// For the full inverse Fisher: the method used and why.
    pub method: Option<MethodChoice>,
    /// For the CG method: iterations and per-query residuals.
    pub cg: Option<crate::sigma::CgReport>,
    /// For the low-rank Σ: the eigenpairs' values and residuals.
    pub lowrank: Option<crate::sigma::LowRankReport>,
    /// How the quadratic forms were computed.
    pub path: QueryPath,
    /// P.
    pub num_params: usize,
    /// N (0 without training data).
    pub num_train: usize,
}

/// Covariances Jₘ Σ Jₘᵀ of a vector QoI (K outputs) at M queries: `per_output[k]` holds the
/// gradients of output k at every query (P×M, one column per query). Returns M row-major K×K
/// matrices (symmetrised); the diagonal of query m's matrix is the ΔVar of each output. Σ is
/// applied to blocks of at most 64 queries (P×64K), so memory stays O(P·K·64) beyond the
/// inputs.
///
/// ```
/// use deltavar::{delta_covariances, sigma::DiagonalSigma};
/// use faer::Mat;
/// let g0 = Mat::from_fn(3, 2, |i, j| (i + j) as f64);      // output 0 at 2 queries, P = 3
/// let g1 = Mat::from_fn(3, 2, |i, j| (i * j) as f64 + 1.0); // output 1
/// let s = DiagonalSigma::new(vec![1.0, 2.0, 0.5]).unwrap();
/// let c = delta_covariances(&[g0.clone(), g1], &s).unwrap();
/// // c[m][a·K + b] = g_aᵀ Σ g_b at query m; the diagonal is each output's ΔVar
/// let dv0 = deltavar::delta_variances(g0.as_ref(), &s).unwrap();
/// assert!((c[1][0] - dv0[1]).abs() < 1e-12);
/// ```
pub fn delta_covariances(per_output: &[Mat<f64>], sigma: &dyn SigmaOp) -> Result<Vec<Vec<f64>>> {
    let k = per_output.len();
    let Some(first) = per_output.first() else {
        return Ok(vec![]);
    };
    let (p, m) = (first.nrows(), first.ncols());
    if let Some((i, g)) = per_output
        .iter()
        .enumerate()
        .find(|(_, g)| g.nrows() != p || g.ncols() != m)
    {
        return Err(Error::shape(
            format!("gradients of output {i} (P × M like output 0)"),
            format!("{p} × {m}"),
            format!("{} × {}", g.nrows(), g.ncols()),
        ));
    }
    if sigma.dim() != p {
        return Err(Error::shape(
            format!("Sigma '{}' (its size must equal P)", sigma.name()),
            p,
            sigma.dim(),
        ));
    }
    let chunk = 64usize;
    let mut out = Vec::with_capacity(m);
    for start in (0..m).step_by(chunk) {
        let c = chunk.min(m - start);
        // columns: query-major, output-minor
        let block = Mat::from_fn(p, c * k, |i, j| per_output[j % k][(i, start + j / k)]);
        let applied = sigma.apply(block.as_ref())?;
        for q in 0..c {
            let mut cov = vec![0.0; k * k];
            for a in 0..k {
                for b in a..k {
                    let ga = block.col(q * k + a);
                    let sb = applied.col(q * k + b);
                    let gb = block.col(q * k + b);
                    let sa = applied.col(q * k + a);
                    // average of the two orders: exact symmetry whatever Σ's rounding
                    let v = 0.5 * ((ga.transpose() * sb) + (gb.transpose() * sa));
                    cov[a * k + b] = v;
                    cov[b * k + a] = v;
                }
            }
            out.push(crate::sigma::finish(&sigma.name(), cov)?);
        }
    }
    Ok(out)
}

/// The result of [`engine_delta_covariances_with`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeltaCovariances {
    /// The K outputs at each query (M × K).
    pub outputs: Vec<Vec<f64>>,
    /// Jₘ Σ Jₘᵀ per query, row-major K×K.
    pub covariance: Vec<Vec<f64>>,
    /// The Σ used.
    pub sigma: String,
    /// For the full inverse Fisher: the method and why.
    pub method: Option<MethodChoice>,
    /// P.
    pub num_params: usize,
}

impl DeltaCovariances {
    /// The variances on the diagonal, as one result with the M·K values query-major (query m's
    /// K outputs together): what `variance --qoi outputs` reports beside the covariances.
    /// `num_train` is the Fisher's N (0 without one). Fields that do not agree (a matrix that
    /// is not K×K, a query without K outputs) are an error.
    pub fn diagonal(&self, num_train: usize) -> Result<DeltaVariances> {
        let k = self.outputs.first().map(|o| o.len()).unwrap_or(0);
        let consistent = self.covariance.len() == self.outputs.len()
            && self.outputs.iter().all(|o| o.len() == k)
            && self.covariance.iter().all(|m| m.len() == k * k);
        if !consistent {
            return Err(Error::shape(
                "delta covariances (one K×K matrix and K outputs per query)",
                format!("{} queries of {k} outputs", self.outputs.len()),
                format!(
                    "{} matrices of sizes {:?}",
                    self.covariance.len(),
                    self.covariance.iter().map(|m| m.len()).collect::<Vec<_>>()
                ),
            ));
        }
        Ok(DeltaVariances {
            qoi: self.outputs.iter().flatten().copied().collect(),
            delta_variance: self
                .covariance
                .iter()
                .flat_map(|m| (0..k).map(move |a| m[a * k + a]))
                .collect(),
            sigma: self.sigma.clone(),
            method: self.method.clone(),
            cg: None,
            lowrank: None,
            path: QueryPath::Gradients,
            num_params: self.num_params,
            num_train,
        })
    }
}

fn covariances_from(
    grads: Vec<Mat<f64>>,
    values: Vec<Vec<f64>>,
    sigma: &dyn SigmaOp,
    method: Option<MethodChoice>,
) -> Result<DeltaCovariances> {
    let m = values.first().map(|v| v.len()).unwrap_or(0);
    let outputs = (0..m)
        .map(|i| values.iter().map(|v| v[i]).collect())
        .collect();
    Ok(DeltaCovariances {
        outputs,
        covariance: delta_covariances(&grads, sigma)?,
        sigma: sigma.name(),
        method,
        num_params: sigma.dim(),
    })
}

/// The output covariance J Σ Jᵀ (K×K, every output of the model) at every query of `req`,
/// for any engine with query gradients: Σ built once, one batched query pass per output;
/// every element of the per-example output (after the request's rollout) is one of the K
/// outputs, and the request's QoI is not read. Its diagonal equals
/// [`engine_delta_variances_with`] with `Qoi::Output(k)`.
pub fn engine_delta_covariances_with(
    engine: &dyn QueryGradients,
    req: DeltaRequest<'_>,
) -> Result<DeltaCovariances> {
    let mut a = req;
    let (sigma, choice) = a.take_sigma(engine)?.into_parts();
    let k = engine.num_outputs(a.queries)?;
    let mut grads = Vec::with_capacity(k);
    let mut values = Vec::with_capacity(k);
    for o in 0..k {
        let (g, v) = engine.query_gradients(&Qoi::Output(o), a.queries, a.rollout, &a.engine)?;
        values.push(v);
        grads.push(g);
    }
    covariances_from(grads, values, &*sigma, choice)
}
