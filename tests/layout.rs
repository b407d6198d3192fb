//! The workspace's shape, as the architecture asks for it: no two modules of a crate that import
//! each other (directly or round a longer loop), and a thin `moe` binary (argument parsing,
//! configuration, logging and the calls) that reaches the engine only through `moe-cluster`,
//! the measurements through `moe-bench`, and nothing else of the workspace but `moe-demo` and
//! `moe-proto` (`moe-http` is allowed too).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A file's module path inside its crate: `src/a/b.rs` and `src/a/b/mod.rs` are `[a, b]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The code of a file without its tests and comments.
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The modules `code` (in module `me`) names through `crate::…` or `super::…` paths: the longest
/// prefix of each path that is a module of the crate, unless it is `me` or one of its parents.
fn imports(code: &str, me: &[String], modules: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let mut found = BTreeSet::new();
    let bytes = code.as_bytes();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start).map(|i| i + from) {
            from = i + start.len();
            if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b':') {
                continue;
            }
            let path: String =
                code[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
            let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            let mut base: Vec<String> = Vec::new();
            if segs[0] == "super" {
                base = me[..me.len().saturating_sub(1)].to_vec();
                segs.remove(0);
                while segs.first() == Some(&"super") {
                    base.pop();
                    segs.remove(0);
                }
            } else {
                segs.remove(0);
            }
            let mut best = None;
            for s in segs {
                base.push(s.to_string());
                if modules.contains(&base) {
                    best = Some(base.clone());
                }
            }
            if let Some(m) = best.filter(|m| m.as_slice() != me && !me.starts_with(m)) {
                found.insert(m);
            }
        }
    }
    found
}

/// Every import loop among the modules of the crate in `src`, each as its modules in order.
fn circles(src: &Path) -> Vec<Vec<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(src, f)).collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in &files {
        let me = module_of(src, f);
        let code = code_of(&std::fs::read_to_string(f).expect("read"));
        edges.entry(me.clone()).or_default().extend(imports(&code, &me, &modules));
    }
    // Depth-first search; a back edge closes a loop.
    fn visit(
        u: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
        out: &mut Vec<Vec<String>>,
    ) {
        state.insert(u.clone(), 1);
        stack.push(u.clone());
        for v in edges.get(u).into_iter().flatten() {
            match state.get(v) {
                Some(1) => {
                    let at = stack.iter().position(|m| m == v).unwrap_or(0);
                    out.push(stack[at..].iter().map(|m| m.join("/")).collect());
                }
                None => visit(v, edges, state, stack, out),
                _ => {}
            }
        }
        stack.pop();
        state.insert(u.clone(), 2);
    }
    let (mut state, mut stack, mut out) = (BTreeMap::new(), Vec::new(), Vec::new());
    for u in edges.keys() {
        if !state.contains_key(u) {
            visit(u, &edges, &mut state, &mut stack, &mut out);
        }
    }
    out
}

#[test]
fn no_modules_import_each_other() {
    let mut found = Vec::new();
    for e in std::fs::read_dir(root().join("crates")).expect("crates").flatten() {
        for c in circles(&e.path().join("src")) {
            found.push(format!("{}: {}", e.file_name().to_string_lossy(), c.join(" -> ")));
        }
    }
    assert!(found.is_empty(), "modules that import each other: {found:#?}");
}

#[test]
fn the_checker_sees_a_circle() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("b")).expect("mkdir");
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\n").expect("write");
    std::fs::write(src.join("a.rs"), "use crate::b::c::Thing;\n").expect("write");
    std::fs::write(src.join("b/mod.rs"), "mod c;\n").expect("write");
    std::fs::write(src.join("b/c.rs"), "fn f() { super::super::a::g() }\n// crate::a::h\n").expect("write");
    assert_eq!(circles(&src), vec![vec!["a".to_string(), "b/c".to_string()]]);
    // Without the call there is no loop (a comment does not count).
    std::fs::write(src.join("b/c.rs"), "fn f() {}\n// crate::a::h\n").expect("write");
    assert!(circles(&src).is_empty());
}

#[test]
fn the_binary_is_thin() {
    let cli = root().join("crates/moe-cli");
    let mut files = Vec::new();
    rust_files(&cli.join("src"), &mut files);
    let lines: usize = files.iter().map(|f| std::fs::read_to_string(f).expect("read").lines().count()).sum();
    assert!(lines < 1500, "moe-cli has {lines} lines");
    let manifest = std::fs::read_to_string(cli.join("Cargo.toml")).expect("Cargo.toml");
    let deps = manifest.split("[dependencies]").nth(1).and_then(|s| s.split("\n[").next()).expect("[dependencies]");
    let allowed = ["moe-cluster", "moe-bench", "moe-http", "moe-demo", "moe-proto"];
    for line in deps.lines().filter(|l| l.starts_with("moe-")) {
        let name = line.split(['.', ' ', '=']).next().unwrap_or(line);
        assert!(allowed.contains(&name), "moe-cli depends on {name}");
    }
    for f in &files {
        let code = code_of(&std::fs::read_to_string(f).expect("read"));
        for internal in ["moe_compute", "moe_model", "moe_dispatch", "moe_router", "moe_worker", "moe_lora"] {
            assert!(!code.contains(internal), "{} names {internal}", f.display());
        }
    }
}
