//! The shape of the code: no two modules import each other, directly or
//! through others. Checked on the source text: every `crate::` and `super::`
//! path outside comments and unit-test modules is an edge from the file's
//! module to the module it names, at the level of the crate's top modules
//! (`controller`, `provider`, `metrics`, ...) and of the modules inside
//! `provider` and `controller` (one per provider, one per controller).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/provider/scim/mod.rs` is `["provider", "scim"]`; lib.rs and main.rs are the root.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts == ["lib"] || parts == ["main"] {
        parts.clear();
    }
    parts
}

/// The code of a file without comments and without its unit-test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The module paths a file's code names: `crate::a::b`, `super::x`, and the
/// heads of `crate::{a, b::c}` groups.
fn references(module: &[String], code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for (base, prefix) in [("crate::", Vec::new()), ("super::", module[..module.len().saturating_sub(1)].to_vec())] {
        let mut rest = code;
        while let Some(at) = rest.find(base) {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + base.len()..];
            if before.is_some_and(is_ident) {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // The identifiers at depth 1 of the group.
                let mut depth = 1;
                let mut ident = String::new();
                let mut at_head = true;
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    if depth == 0 {
                        break;
                    }
                    if depth == 1 && is_ident(c) && at_head {
                        ident.push(c);
                    } else if !ident.is_empty() {
                        let mut path = prefix.clone();
                        path.push(std::mem::take(&mut ident));
                        found.push(path);
                        at_head = false;
                    }
                    if depth == 1 && c == ',' {
                        at_head = true;
                    }
                }
            } else {
                let mut path = prefix.clone();
                for segment in rest.split("::") {
                    let ident: String = segment.chars().take_while(|c| is_ident(*c)).collect();
                    if ident.is_empty() || ident.starts_with(char::is_uppercase) {
                        break;
                    }
                    let whole = ident.len() == segment.len();
                    path.push(ident);
                    if !whole {
                        break;
                    }
                }
                found.push(path);
            }
        }
    }
    found
}

/// The node a module path counts as: its top module, or the module inside
/// `provider` or `controller`.
fn node(path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    let top = path.first()?;
    if !modules.contains(top) {
        return None;
    }
    match (top.as_str(), path.get(1)) {
        ("provider" | "controller", Some(inner)) if modules.contains(&format!("{top}::{inner}")) => {
            Some(format!("{top}::{inner}"))
        }
        _ => Some(top.clone()),
    }
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut modules = BTreeSet::new();
    for file in &files {
        let module = module_of(&src, file);
        if let Some(top) = module.first() {
            modules.insert(top.clone());
            if let Some(inner) = module.get(1) {
                modules.insert(format!("{top}::{inner}"));
            }
        }
    }
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        let Some(from) = node(&module, &modules) else { continue };
        let text = std::fs::read_to_string(file).unwrap();
        for path in references(&module, &code(&text)) {
            let Some(to) = node(&path, &modules) else { continue };
            // A parent module and its own children are one unit.
            if to != from && !from.starts_with(&format!("{to}::")) && !to.starts_with(&format!("{from}::")) {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    edges
}

/// A cycle through `start`, if any (depth-first search).
fn cycle_from(start: &str, edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn walk(
        at: &str,
        start: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in edges.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(next, start, edges, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_owned()];
    walk(start, start, edges, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn no_module_imports_one_that_imports_it() {
    let edges = graph();
    assert!(edges.contains_key("controller::account"), "the graph sees the controllers: {edges:?}");
    assert!(edges.get("provider::kubernetes").is_some_and(|to| to.contains("ownership")), "{edges:?}");
    let cycles: Vec<String> = edges.keys().filter_map(|m| cycle_from(m, &edges)).map(|c| c.join(" -> ")).collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let src = vec!["provider".to_owned(), "scim".to_owned()];
    let refs = references(&src, "use crate::{metrics::Metrics, api::{A, B}};\nlet x = super::http::classify(y);");
    assert!(refs.contains(&vec!["metrics".to_owned()]), "{refs:?}");
    assert!(refs.contains(&vec!["api".to_owned()]), "{refs:?}");
    assert!(refs.contains(&vec!["provider".to_owned(), "http".to_owned(), "classify".to_owned()]), "{refs:?}");
    let edges = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert_eq!(cycle_from("a", &edges), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    assert_eq!(cycle_from("a", &BTreeMap::from([("a".to_owned(), BTreeSet::from(["b".to_owned()]))])), None);
}
