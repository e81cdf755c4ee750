//! The pipeline is one-way: each top-level module imports only modules of its own stage or
//! below (params, data, model, likelihood, qoi → engine → fisher → sigma → delta → seed /
//! prelude → demo; `metrics` sits with delta), and there is no import cycle between top-level modules. Read from the
//! sources' `crate::` paths (code lines, not comments).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn stage(module: &str) -> Option<u32> {
    Some(match module {
        "error" => 0,
        "params" | "data" | "model" | "nn" | "likelihood" | "qoi" | "scalar" | "graph" => 1,
        "engine" => 2,
        "fisher" => 3,
        "sigma" => 4,
        "delta" | "metrics" | "calibration" => 5,
        "seed" | "prelude" => 6,
        "demo" => 7,
        _ => return None,
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules named by `crate::NAME` in the code (comments stripped).
fn references(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in src.lines() {
        let code = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let tail = &rest[i + "crate::".len()..];
            let name: String = tail
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                out.insert(name);
            }
            rest = tail;
        }
    }
    out
}

/// The graph: top-level module → the top-level modules it references.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "bin" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let refs = references(&text);
        g.entry(module.clone())
            .or_default()
            .extend(refs.into_iter().filter(|r| *r != module));
    }
    g
}

#[test]
fn every_module_imports_only_its_stage_or_below() {
    let g = graph();
    assert!(g.contains_key("engine") && g.contains_key("sigma"), "{g:?}");
    let mut bad = vec![];
    for (m, refs) in &g {
        let sm = stage(m).unwrap_or_else(|| panic!("module '{m}' has no stage in this test"));
        for r in refs {
            let Some(sr) = stage(r) else { continue };
            if sr > sm {
                bad.push(format!("{m} (stage {sm}) imports {r} (stage {sr})"));
            }
        }
    }
    assert!(bad.is_empty(), "upward imports:\n{}", bad.join("\n"));
}

#[test]
fn no_import_cycle_between_modules() {
    let g = graph();
    // depth-first search for a back edge
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(m) {
            Some(1) => {
                let i = path.iter().position(|p| p == m).unwrap();
                let mut cycle = path[i..].to_vec();
                cycle.push(m.to_string());
                return Some(cycle);
            }
            Some(2) => return None,
            _ => {}
        }
        state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for r in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(r, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in g.keys() {
        if let Some(c) = visit(m, &g, &mut state, &mut vec![]) {
            panic!("import cycle: {}", c.join(" → "));
        }
    }
}

#[test]
fn the_reader_sees_references_and_skips_comments() {
    let refs = references(
        "use crate::engine::X;\nlet a = crate::sigma::y(); // crate::delta\n/// [`crate::fisher`]\n",
    );
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        vec!["engine".to_string(), "sigma".to_string()]
    );
}
