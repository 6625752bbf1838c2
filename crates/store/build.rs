//! Embeds the FHIR profiles (SearchParameters, …) so the binary runs from any directory.
//! Adding a search parameter is adding a JSON file under `fhir-profiles/`.
use std::io::Write;

fn main() {
    // The profiles and migrations live at the repository root (two levels up).
    println!("cargo:rerun-if-changed=../../fhir-profiles");
    // `embed_migrations!` (src/store/db.rs) reads these directories when the crate compiles; a
    // build script that names its inputs turns off cargo's own "any file changed" check, so a new
    // migration would otherwise be missing from an incremental build.
    println!("cargo:rerun-if-changed=../../migrations");
    // At run time, not `env!`: a build-script binary shared through one target directory by two
    // checkouts (worktrees) would otherwise read the other checkout's profiles.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = std::path::Path::new(&manifest).join("../../fhir-profiles");
    let mut files = Vec::new();
    collect(&root, &mut files);
    files.sort();
    let out = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("profiles.rs");
    let mut f = std::fs::File::create(out).unwrap();
    writeln!(f, "pub static PROFILES: &[(&str, &str)] = &[").unwrap();
    for p in files {
        let rel = p.strip_prefix(&root).unwrap().display().to_string();
        writeln!(
            f,
            "    ({rel:?}, include_str!({:?})),",
            p.display().to_string()
        )
        .unwrap();
    }
    writeln!(f, "];").unwrap();
}

fn collect(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    println!("cargo:rerun-if-changed={}", dir.display());
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
}
