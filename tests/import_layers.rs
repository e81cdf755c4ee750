//! The pipeline is one-way: each top-level module imports only modules of its own stage or
//! below (params, data, model, likelihood, qoi, scalar, graph → engine → fisher → sigma →
//! delta → seed / prelude → demo; `metrics` and `calibration` sit with delta), and no two
//! sibling modules import each other, at any depth (`engine::graph` ↔ `engine::gradients`
//! would be a circle as much as `engine` ↔ `fisher`).
//!
//! Read from the sources (code lines, comments stripped): every `crate::`, `super::` and
//! `self::` path, grouped imports (`use crate::{a::X, b::{Y, Z}}`) expanded, each resolved to
//! the module file that defines it — through `pub use` re-exports, so `crate::engine::Rows`
//! counts as the module `Rows` comes from. A module and its own submodules may use each other
//! (`mod.rs` re-exports its children; children use the parent's items).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn stage(module: &str) -> Option<u32> {
    Some(match module {
        "error" | "progress" => 0,
        "params" | "data" | "model" | "nn" | "likelihood" | "qoi" | "scalar" | "graph" => 1,
        "engine" => 2,
        "fisher" => 3,
        "sigma" => 4,
        "delta" | "metrics" | "calibration" => 5,
        "seed" | "prelude" | "pipeline" => 6,
        "demo" => 7,
        _ => return None,
    })
}

type Module = Vec<String>;

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

/// The module a file defines: `engine/graph.rs` → `engine::graph`, `graph/ops/mod.rs` →
/// `graph::ops`.
fn module_of(rel: &Path) -> Module {
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

fn strip_comments(src: &str) -> String {
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands the path starting at `s` (after a `crate::`/`super::`/`self::` root) into full
/// segment lists, groups included; returns them and the bytes consumed.
fn expand(s: &str, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let b = s.as_bytes();
    let mut i = 0;
    let mut segs = prefix.to_vec();
    loop {
        while i < b.len() && (b[i] as char).is_whitespace() {
            i += 1;
        }
        if i < b.len() && b[i] == b'{' {
            i += 1;
            loop {
                while i < b.len() && (b[i] as char).is_whitespace() {
                    i += 1;
                }
                if i >= b.len() || b[i] == b'}' {
                    return (i + 1).min(b.len());
                }
                if b[i] == b',' {
                    i += 1;
                    continue;
                }
                let used = expand(&s[i..], &segs, out);
                i += used.max(1);
            }
        }
        let start = i;
        while i < b.len() && is_ident(b[i] as char) {
            i += 1;
        }
        if i == start {
            out.push(segs);
            return i;
        }
        segs.push(s[start..i].to_string());
        if s[i..].starts_with("::") {
            i += 2;
        } else {
            out.push(segs);
            return i;
        }
    }
}

/// Every path a file names, as absolute segment lists.
fn paths(src: &str, here: &Module) -> Vec<Vec<String>> {
    let code = strip_comments(src);
    let mut out = vec![];
    let b = code.as_bytes();
    for root in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(k) = code[from..].find(root) {
            let at = from + k;
            from = at + root.len();
            if at > 0 && (is_ident(b[at - 1] as char) || b[at - 1] == b':') {
                continue;
            }
            // `self` is the file's module (for a mod.rs, its folder's), `super` its parent
            let dir: Module = here.clone();
            let mut base: Module = match root {
                "crate::" => vec![],
                "self::" => dir,
                _ => {
                    let mut d = dir;
                    d.pop();
                    d
                }
            };
            // `super::super::`
            let mut rest = &code[from..];
            let mut off = 0;
            while root == "super::" && rest.starts_with("super::") {
                base.pop();
                rest = &rest[7..];
                off += 7;
            }
            let used = expand(rest, &base, &mut out);
            from += off + used;
        }
    }
    out
}

struct Crate {
    modules: BTreeSet<Module>,
    /// (module, re-exported name) → the module the name comes from.
    reexports: BTreeMap<(Module, String), Module>,
    /// file module → the paths it names.
    uses: BTreeMap<Module, Vec<Vec<String>>>,
}

fn read_crate() -> Crate {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut c = Crate {
        modules: BTreeSet::new(),
        reexports: BTreeMap::new(),
        uses: BTreeMap::new(),
    };
    let mut texts = vec![];
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_path_buf();
        if rel.starts_with("bin") {
            continue;
        }
        let m = module_of(&rel);
        texts.push((m.clone(), std::fs::read_to_string(&f).unwrap()));
        c.modules.insert(m);
    }
    for (m, text) in &texts {
        let code = strip_comments(text);
        // re-exports: `pub use child::{..}` / `pub use crate::x::Y` (one statement at a time)
        for stmt in code.split(';') {
            let t = stmt.trim();
            let Some(body) = t
                .strip_prefix("pub use ")
                .or_else(|| t.strip_prefix("pub(crate) use "))
            else {
                continue;
            };
            let body = body.trim();
            let (base, tail): (Module, &str) = if let Some(r) = body.strip_prefix("crate::") {
                (vec![], r)
            } else if let Some(r) = body.strip_prefix("super::") {
                let mut d = m.clone();
                d.pop();
                (d, r)
            } else if let Some(r) = body.strip_prefix("self::") {
                (m.clone(), r)
            } else {
                (m.clone(), body)
            };
            let mut full = vec![];
            expand(tail, &base, &mut full);
            for p in full {
                if let Some(name) = p.last() {
                    let target = p[..p.len() - 1].to_vec();
                    c.reexports.insert((m.clone(), name.clone()), target);
                }
            }
        }
        c.uses.insert(m.clone(), paths(text, m));
    }
    c
}

impl Crate {
    /// The module file defining `path` (the longest module prefix, through re-exports).
    fn resolve(&self, path: &[String]) -> Module {
        let mut p = path.to_vec();
        for _ in 0..8 {
            let k = (0..=p.len())
                .rev()
                .find(|&k| self.modules.contains(&p[..k]))
                .unwrap_or(0);
            let m = p[..k].to_vec();
            let Some(name) = p.get(k) else { return m };
            match self.reexports.get(&(m.clone(), name.clone())) {
                Some(t) if *t != m => {
                    let mut q = t.clone();
                    q.extend_from_slice(&p[k..]);
                    p = q;
                }
                _ => return m,
            }
        }
        p
    }

    /// Edges between file modules.
    fn edges(&self) -> BTreeSet<(Module, Module)> {
        let mut e = BTreeSet::new();
        for (m, ps) in &self.uses {
            for p in ps {
                let t = self.resolve(p);
                if t != *m {
                    e.insert((m.clone(), t));
                }
            }
        }
        e
    }
}

#[test]
fn every_module_imports_only_its_stage_or_below() {
    let c = read_crate();
    let mut bad = BTreeSet::new();
    for (a, b) in c.edges() {
        let (Some(ma), Some(mb)) = (a.first(), b.first()) else {
            continue;
        };
        let sa = stage(ma).unwrap_or_else(|| panic!("module '{ma}' has no stage in this test"));
        let Some(sb) = stage(mb) else { continue };
        if sb > sa {
            bad.insert(format!(
                "{} (stage {sa}) imports {} (stage {sb})",
                a.join("::"),
                b.join("::")
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "upward imports:\n{}",
        bad.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn no_import_cycle_between_sibling_modules() {
    let c = read_crate();
    // an edge a → b between two different children of their deepest common ancestor
    let mut g: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    let mut why: BTreeMap<(Module, Module), (Module, Module)> = BTreeMap::new();
    for (a, b) in c.edges() {
        let l = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        if l >= a.len() || l >= b.len() {
            continue; // a module and its own submodule
        }
        let (ca, cb) = (a[..=l].to_vec(), b[..=l].to_vec());
        why.entry((ca.clone(), cb.clone()))
            .or_insert((a.clone(), b.clone()));
        g.entry(ca).or_default().insert(cb);
    }
    fn visit(
        m: &Module,
        g: &BTreeMap<Module, BTreeSet<Module>>,
        state: &mut BTreeMap<Module, u8>,
        path: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        match state.get(m) {
            Some(1) => {
                let i = path.iter().position(|p| p == m).unwrap();
                let mut cycle = path[i..].to_vec();
                cycle.push(m.clone());
                return Some(cycle);
            }
            Some(2) => return None,
            _ => {}
        }
        state.insert(m.clone(), 1);
        path.push(m.clone());
        for r in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(r, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(m.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    let keys: Vec<Module> = g.keys().cloned().collect();
    for m in &keys {
        if let Some(cy) = visit(m, &g, &mut state, &mut vec![]) {
            let steps: Vec<String> = cy
                .windows(2)
                .map(|w| {
                    let (a, b) = &why[&(w[0].clone(), w[1].clone())];
                    format!(
                        "{} → {} (in {} → {})",
                        w[0].join("::"),
                        w[1].join("::"),
                        a.join("::"),
                        b.join("::")
                    )
                })
                .collect();
            panic!("import cycle:\n{}", steps.join("\n"));
        }
    }
}

#[test]
fn the_reader_sees_super_paths_groups_and_reexports() {
    let mut out = vec![];
    let here: Module = vec!["engine".into(), "graph".into()];
    let ps = paths(
        "use super::{batch::{Rows, Batch}, gradients::X};\nuse crate::error::Result; // crate::demo\nfn f() { super::super::sigma::g() }",
        &here,
    );
    out.extend(ps);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert!(out.contains(&s(&["engine", "batch", "Rows"])), "{out:?}");
    assert!(out.contains(&s(&["engine", "batch", "Batch"])), "{out:?}");
    assert!(out.contains(&s(&["engine", "gradients", "X"])), "{out:?}");
    assert!(out.contains(&s(&["error", "Result"])), "{out:?}");
    assert!(out.contains(&s(&["sigma", "g"])), "{out:?}");
    assert!(
        !out.iter().any(|p| p.first().is_some_and(|x| x == "demo")),
        "{out:?}"
    );
    // the crate's own re-exports resolve to the defining module
    let c = read_crate();
    assert_eq!(
        c.resolve(&s(&["engine", "GraphEngine"])),
        s(&["engine", "graph"])
    );
}
