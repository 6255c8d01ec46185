//! The maps must match the territory: ARCHITECTURE.md's crate graph is
//! checked against what cargo itself reports.

use std::collections::{BTreeMap, BTreeSet};

/// ARCHITECTURE.md's dependency table: crate → the Skylark crates it depends on.
fn documented_graph() -> BTreeMap<String, BTreeSet<String>> {
    let doc = include_str!("../../../../ARCHITECTURE.md");
    let start = doc.find("| crate | depends on").expect("ARCHITECTURE.md has the dependency table");
    doc[start..]
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(|c| c.trim().trim_matches('`')).collect();
            let deps = cells[1]
                .split(',')
                .map(|d| d.trim().trim_matches('`').to_owned())
                .filter(|d| d.starts_with("skylark"))
                .collect();
            (cells[0].to_owned(), deps)
        })
        .collect()
}

/// What `cargo metadata` says: each workspace crate's normal (not dev or
/// build) dependencies on other workspace crates.
fn actual_graph() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(output.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&output.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("cargo metadata is JSON");
    let packages = metadata["packages"].as_array().expect("packages");
    let members: BTreeSet<String> = packages.iter().map(|p| p["name"].as_str().expect("name").to_owned()).collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().expect("name").to_owned())
                .filter(|d| members.contains(d))
                .collect();
            (p["name"].as_str().expect("name").to_owned(), deps)
        })
        .collect()
}

#[test]
fn the_architecture_crate_graph_is_the_real_one() {
    assert_eq!(documented_graph(), actual_graph(), "ARCHITECTURE.md's dependency table vs cargo metadata");
}
