//! Trains a small MLP on 1-D data with a gap and plots mean ± 2·sqrt(ΔVar) (the demo, as a
//! library call).
//!
//!     cargo run --release --example regression_plot -- [OUT_DIR]

fn main() -> deltavar::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "deltavar-demo".into());
    let report = deltavar::demo::run_demo(Some(std::path::Path::new(&out)))?;
    print!("{}", deltavar::demo::demo_table(&report));
    if let Some(p) = report.png {
        println!("plot written to {}", p.display());
    }
    Ok(())
}
