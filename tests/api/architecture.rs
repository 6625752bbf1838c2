//! The house rules of issue 21 that the compiler cannot check: only the store crate
//! (`crates/store`) writes the store's tables. (That the store imports nothing above it, the
//! compiler does check: `courier` depends on `courier-store`, never the other way.)

/// The tables the store owns (its migrations create others for the modules above, which those
/// modules write themselves).
const STORE_TABLES: &[&str] = &[
    "resources",
    "resource_versions",
    "idx_token",
    "idx_ref",
    "idx_date",
    "idx_string",
    "data_keys",
    "write_probe",
    "audit_events",
    "audit_refs",
    "audit_tokens",
];

/// Writes to the store's tables in `text`: `INSERT INTO t`, `UPDATE t`, `DELETE FROM t`, where
/// `t` is a store table, or a `{name}` filled in by `format!` in a file that also names a store
/// table in a string literal.
fn store_table_writes(file: &str, text: &str) -> Vec<String> {
    let names_a_store_table = STORE_TABLES
        .iter()
        .any(|t| text.contains(&format!("\"{t}\"")));
    let mut found = vec![];
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        let lower = code.to_ascii_lowercase();
        for verb in ["insert into ", "update ", "delete from ", "replace into "] {
            let mut from = 0;
            while let Some(at) = lower[from..].find(verb) {
                let rest = &lower[from + at + verb.len()..];
                let table: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || "_{}".contains(*c))
                    .collect();
                let interpolated = table.starts_with('{');
                if STORE_TABLES.contains(&table.as_str()) || (interpolated && names_a_store_table) {
                    found.push(format!("{file}:{}: {}", n + 1, line.trim()));
                }
                from += at + verb.len();
            }
        }
    }
    found
}

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn only_the_store_writes_the_stores_tables() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![];
    for dir in ["src", "crates/fhir-codec/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 50, "the application's sources were not found");
    let mut found = vec![];
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        found.extend(store_table_writes(
            &f.strip_prefix(root).unwrap().display().to_string(),
            &text,
        ));
    }
    assert!(
        found.is_empty(),
        "outside crates/store, these write the store's tables (add a Store method, or an erase hook):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_finds_what_it_looks_for() {
    let caught = store_table_writes(
        "x.rs",
        "c.execute(\"DELETE FROM idx_ref WHERE rid = ?\", b)?;",
    );
    assert_eq!(caught.len(), 1, "{caught:?}");
    let caught = store_table_writes(
        "x.rs",
        "for t in [\"idx_token\", \"idx_date\"] { c.execute(&format!(\"DELETE FROM {t} WHERE rid = ?\"), b)?; }",
    );
    assert_eq!(caught.len(), 1, "{caught:?}");
    assert!(store_table_writes(
        "x.rs",
        "c.execute(\"DELETE FROM receipts WHERE comm_id = ?\", b)?;"
    )
    .is_empty());
    assert!(
        store_table_writes(
            "x.rs",
            "c.execute(\"UPDATE resources SET x = 1\", b)?; // x"
        )
        .len()
            == 1
    );
    assert!(store_table_writes("x.rs", "// DELETE FROM resources in a comment").is_empty());
}
