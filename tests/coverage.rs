//! README.md's "ComfyUI node coverage" section against the registry, and the node list it comes from
//! (comfy/data/comfyui_nodes.tsv).

use std::collections::HashSet;

use diffloom_comfy::coverage::{self, Status};

use crate::util::{repo, stdout, Dir};

const START: &str = "<!-- coverage:start -->\n";
const END: &str = "<!-- coverage:end -->";

#[test]
fn readme_coverage_section_matches_the_registry() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let (Some(a), Some(b)) = (readme.find(START), readme.find(END)) else {
        panic!("README.md lacks the `<!-- coverage:start -->` / `<!-- coverage:end -->` lines of its ComfyUI node coverage section");
    };
    let section = &readme[a + START.len()..b];
    let expected = coverage::markdown(&diffloom_nodes::registry());
    if section != expected {
        let differs = section.lines().zip(expected.lines()).position(|(x, y)| x != y).unwrap_or(section.lines().count().min(expected.lines().count()));
        panic!(
            "README.md's ComfyUI node coverage section differs from the registry (first at line {} of the section):\n  \
             README:   {:?}\n  registry: {:?}\nRegenerate it with scripts/coverage.sh (it puts the output of \
             `diffloom nodes --coverage` between the markers).",
            differs + 1,
            section.lines().nth(differs).unwrap_or("(end)"),
            expected.lines().nth(differs).unwrap_or("(end)")
        );
    }
}

#[test]
fn the_cli_prints_the_coverage() {
    let out = Dir::new().diffloom(&["nodes", "--coverage"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), coverage::markdown(&diffloom_nodes::registry()));
}

#[test]
fn registry_nodes_comfyui_has_are_supported_and_applicable() {
    let registry = diffloom_nodes::registry();
    let nodes = coverage::comfyui_nodes();
    let mut shared = 0;
    for node in &nodes {
        if registry.get(node.id).is_none() {
            continue;
        }
        shared += 1;
        assert_eq!(coverage::status(node, &registry), Status::Supported, "{}", node.id);
        assert_eq!(
            node.not_applicable, None,
            "{} is built in, so it applies to SD 1.x/2.x workflows: fix its classification in scripts/comfyui_nodes.py \
             (and comfy/data/comfyui_nodes.tsv)",
            node.id
        );
    }
    let table = coverage::markdown(&registry);
    assert!(table.contains(&format!("**{shared} supported**")), "{table}");
    // A node the list lacks is listed as such, not lost.
    let extra: Vec<String> = registry.entries().map(|e| e.schema.name.clone()).filter(|n| !nodes.iter().any(|c| c.id == n)).collect();
    for name in extra {
        assert!(table.contains(&name), "{name} missing from the coverage table");
    }
}

#[test]
fn the_node_list_is_well_formed() {
    let (version, nodes) = coverage::parse(coverage::DATA).unwrap();
    assert_eq!(version, coverage::comfyui_version());
    assert!(nodes.len() > 500, "{} nodes", nodes.len());
    let mut seen = HashSet::new();
    let duplicates: Vec<&str> = nodes.iter().map(|n| n.id).filter(|id| !seen.insert(*id)).collect();
    assert!(duplicates.is_empty(), "node ids listed twice in comfy/data/comfyui_nodes.tsv: {duplicates:?}");
    for id in ["KSampler", "CheckpointLoaderSimple", "LoraLoader", "ControlNetApplyAdvanced", "Morphology"] {
        let n = nodes.iter().find(|n| n.id == id).unwrap();
        assert_eq!(n.not_applicable, None, "{id}");
    }
    let flux = nodes.iter().find(|n| n.id == "FluxGuidance").unwrap();
    assert_eq!((flux.file, flux.not_applicable), ("comfy_extras/nodes_flux.py", Some("Flux")));
    // Malformed lines are refused with their number.
    assert!(coverage::parse("# comfyui-version: 1\nid\tfile\tcategory\tapplicable\treason\nA\tx\tc\tno\t\n").unwrap_err().contains("line 3"));
    assert!(coverage::parse("id\tfile\tcategory\tapplicable\treason\n").unwrap_err().contains("comfyui-version"));
}
