//! The K-FAC factors a native engine accumulates (used by `sigma::KfacSigma`).

/// One Kronecker-factored layer: Ā ((in+1)² with a bias, in² without), Ḡ (out²), and where its
/// weight (out × in, row-major) and bias sit in the flat layout.
#[derive(Debug, Clone)]
pub struct KfacLayer {
    /// Offset of the weight (out × in, row-major).
    pub w_off: usize,
    /// Offset of the bias (out), if any.
    pub b_off: Option<usize>,
    /// in.
    pub inp: usize,
    /// out.
    pub out: usize,
    /// Ā, row-major, (in + bias) square.
    pub a: Vec<f64>,
    /// Ḡ, row-major, out × out.
    pub g: Vec<f64>,
}

/// The K-FAC factors of a model: Kronecker-factored layers and diagonal blocks (offset, mean
/// EF diagonal) for the other parameters.
#[derive(Debug, Clone, Default)]
pub struct KfacFactors {
    /// P.
    pub num_params: usize,
    /// The factored layers.
    pub layers: Vec<KfacLayer>,
    /// (offset, F_ii) blocks for parameters outside the factored layers.
    pub diagonal: Vec<(usize, Vec<f64>)>,
}
