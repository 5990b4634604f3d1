//! The house rules the compiler does not keep: in every library crate of the workspace, the
//! top-level modules depend on each other without a cycle (a module that needs another's
//! type and is needed by it back is one concept in two files, or a type in the wrong one).
//! Dependencies are read from the source: every `crate::MODULE` outside comments and outside
//! a module's own `#[cfg(test)]` tests. The crate roots (`lib.rs`, `main.rs`) are left out:
//! they gather the modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library crates, by folder from the workspace root.
const CRATES: [&str; 6] = [
    "proto",
    "runtime",
    "agent",
    "agent/api",
    "relay",
    "consumer",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Every `.rs` file under `dir`, with the top-level module it belongs to.
fn files(src: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files(src, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(src).expect("under src");
            let first = rel.components().next().expect("a file name");
            let module = Path::new(first.as_os_str())
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            if rel.components().count() == 1 && (module == "lib" || module == "main") {
                continue;
            }
            out.push((module, path));
        }
    }
}

/// A file's code: without its comments (a `//` outside a string literal ends a line's code)
/// and without its unit tests (`#[cfg(test)] mod tests`).
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim_start().starts_with("#[cfg(test)]")
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        let (mut in_string, mut escaped, mut end) = (false, false, line.len());
        let bytes = line.as_bytes();
        for (k, b) in bytes.iter().enumerate() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if in_string => escaped = true,
                b'"' => in_string = !in_string,
                b'/' if !in_string && bytes.get(k + 1) == Some(&b'/') => {
                    end = k;
                    break;
                }
                _ => {}
            }
        }
        code.push_str(&line[..end]);
        code.push('\n');
    }
    code
}

/// The modules a file names as `crate::MODULE` or `crate::{MODULE, …}` in its code
/// ([`code_of`]), over lines too.
fn named_modules(text: &str) -> BTreeSet<String> {
    let code = code_of(text);
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        // `pwsync_crate::…` and the like end in "crate::" only by accident of spelling.
        if code[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = code[i + "crate::".len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            // The first name of each item of the group, at its top level.
            let (mut depth, mut item_start) = (0usize, true);
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        item_start = false;
                        out.insert(ident(&group[k..]));
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

/// The module graph of one crate: module → the modules it names.
fn graph(krate: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = workspace_root().join(krate).join("src");
    let mut all = Vec::new();
    files(&src, &src, &mut all);
    let modules: BTreeSet<String> = all.iter().map(|(m, _)| m.clone()).collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, path) in &all {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let deps = g.entry(module.clone()).or_default();
        for named in named_modules(&text) {
            if named != *module && modules.contains(&named) {
                deps.insert(named);
            }
        }
    }
    g
}

/// One cycle of `g`, as the path around it, if there is one.
fn a_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        at: &str,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(at.to_string(), Mark::Open);
        path.push(at.to_string());
        for next in g.get(at).into_iter().flatten() {
            match marks.get(next) {
                Some(Mark::Open) => {
                    let from = path.iter().position(|m| m == next).unwrap_or(0);
                    let mut cycle = path[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(Mark::Done) => {}
                None => {
                    if let Some(c) = visit(g, next, marks, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        marks.insert(at.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for start in g.keys() {
        if !marks.contains_key(start) {
            if let Some(c) = visit(g, start, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_cycle_finder_finds_a_cycle_and_names_it() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("config", vec!["scope"]),
        ("scope", vec!["glob"]),
        ("glob", vec!["config"]),
        ("leaf", vec![]),
    ]
    .into_iter()
    .map(|(m, d)| (m.to_string(), d.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        a_cycle(&g),
        Some(
            vec!["config", "scope", "glob", "config"]
                .into_iter()
                .map(String::from)
                .collect()
        )
    );
    let mut acyclic = g.clone();
    acyclic.insert("glob".into(), BTreeSet::new());
    assert_eq!(a_cycle(&acyclic), None);
    // What counts as naming a module: code, not comments, not another crate's path, not tests.
    let named = named_modules(
        "use crate::scope::Scope;\n/// see [`crate::config`]\nlet x = pwsync_crate::y; // crate::z\nf(crate::policy::P);\nuse crate::{broker, inspect::Thing};\nlet u = \"ldap://host\"; f(crate::gateway::g);\nuse crate::{\n    audit,\n    targets::{a, b},\n};\n#[cfg(test)]\nfn only_in_tests() { crate::pipeline::x() }\n#[cfg(test)]\nmod tests {\nuse crate::state;\n",
    );
    assert_eq!(
        named,
        ["audit", "broker", "gateway", "inspect", "pipeline", "policy", "scope", "targets"]
            .into_iter()
            .map(String::from)
            .collect()
    );
}

#[test]
fn no_crate_has_a_cycle_among_its_modules() {
    for krate in CRATES {
        let g = graph(krate);
        assert!(
            g.len() > 1 || krate == "agent/api",
            "{krate}: no modules found"
        );
        if let Some(cycle) = a_cycle(&g) {
            panic!(
                "{krate}: its modules depend on each other in a cycle: {}\n\
                 (move the shared type to the module that owns the concept, or pass what is \
                 needed in; see ARCHITECTURE.md)",
                cycle.join(" → ")
            );
        }
    }
}
