//! Which of ComfyUI's built-in nodes diffloom has: the node list in `comfy/data/comfyui_nodes.tsv`
//! (written by `scripts/comfyui_nodes.py` from ComfyUI's sources, each node marked as applying to SD
//! 1.x/2.x workflows or not, with a reason) against a node registry. `diffloom nodes --coverage` prints
//! [`markdown`], which is also README.md's "ComfyUI node coverage" section.

use std::collections::{BTreeMap, HashSet};

use diffloom_core::registry::Registry;

/// The node list: `#` comment lines (one `# comfyui-version: X`), a header, then one node a line.
pub const DATA: &str = include_str!("../data/comfyui_nodes.tsv");

/// One of ComfyUI's nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComfyNode {
    /// The type name workflows carry (`class_type`).
    pub id: &'static str,
    /// The ComfyUI source file that registers it (`nodes.py`, `comfy_extras/nodes_mask.py`, …).
    pub file: &'static str,
    /// Its category in ComfyUI's "Add Node" menu (`sampling/custom_sampling/schedulers`).
    pub category: &'static str,
    /// Why it does not apply to SD 1.x/2.x workflows; `None` when it does.
    pub not_applicable: Option<&'static str>,
}

/// Where diffloom stands on one of ComfyUI's nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The registry has a node of this type.
    Supported,
    /// Applies to SD 1.x/2.x workflows; the registry lacks it.
    NotYet,
    /// Another model family, audio, video, 3D, a paid API, …: the reason.
    NotApplicable(&'static str),
}

/// Parses [`DATA`]-shaped text: the ComfyUI version and the nodes, or the first malformed line.
pub fn parse(text: &'static str) -> Result<(&'static str, Vec<ComfyNode>), String> {
    let mut version = None;
    let mut nodes = Vec::new();
    let mut header = false;
    for (n, line) in text.lines().enumerate() {
        let at = |msg: &str| format!("comfyui_nodes.tsv line {}: {msg}", n + 1);
        if let Some(comment) = line.strip_prefix('#') {
            if let Some(v) = comment.trim().strip_prefix("comfyui-version:") {
                version = Some(v.trim());
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        if !header {
            if line != "id\tfile\tcategory\tapplicable\treason" {
                return Err(at("expected the header id, file, category, applicable, reason"));
            }
            header = true;
            continue;
        }
        let fields: Vec<&'static str> = line.split('\t').collect();
        let [id, file, category, applicable, reason] = fields[..] else {
            return Err(at(&format!("{} fields, expected 5", fields.len())));
        };
        let not_applicable = match (applicable, reason) {
            ("yes", "") => None,
            ("no", r) if !r.is_empty() => Some(r),
            _ => return Err(at("applicable must be yes (no reason) or no (with a reason)")),
        };
        if id.is_empty() {
            return Err(at("empty node id"));
        }
        nodes.push(ComfyNode { id, file, category, not_applicable });
    }
    let version = version.ok_or("comfyui_nodes.tsv: no `# comfyui-version:` line")?;
    Ok((version, nodes))
}

/// ComfyUI's nodes as listed in [`DATA`], in ComfyUI's registration order.
pub fn comfyui_nodes() -> Vec<ComfyNode> {
    // invariant: DATA is compiled in and the tests parse it (tests/coverage.rs)
    parse(DATA).expect("comfy/data/comfyui_nodes.tsv is well-formed").1
}

/// The ComfyUI version the node list was taken from.
pub fn comfyui_version() -> &'static str {
    // invariant: as in comfyui_nodes
    parse(DATA).expect("comfy/data/comfyui_nodes.tsv is well-formed").0
}

/// Where the registry stands on `node`: a node the registry has is supported even where the list calls
/// it not applicable.
pub fn status(node: &ComfyNode, registry: &Registry) -> Status {
    match (registry.get(node.id).is_some(), node.not_applicable) {
        (true, _) => Status::Supported,
        (false, None) => Status::NotYet,
        (false, Some(reason)) => Status::NotApplicable(reason),
    }
}

/// The table's group of a ComfyUI category: its first part (`sampling`, `latent`, `_for_testing`, …),
/// its first two under `advanced`.
fn group(category: &str) -> String {
    let mut parts = category.split('/');
    let first = parts.next().unwrap_or_default();
    match (first, parts.next()) {
        ("advanced", Some(second)) => format!("advanced/{second}"),
        ("", _) => "(no category)".to_owned(),
        _ => first.to_owned(),
    }
}

/// Groups in the table: the plain ones alphabetically, then `advanced/…`, then `_for_testing` and the like.
fn group_key(group: &str) -> (u8, String) {
    let rank = if group.starts_with('_') || group.starts_with('(') {
        2
    } else if group.starts_with("advanced") {
        1
    } else {
        0
    };
    (rank, group.to_owned())
}

fn names(list: &[&str]) -> String {
    if list.is_empty() {
        return "—".to_owned();
    }
    list.join(", ")
}

fn sorted(mut list: Vec<&str>) -> Vec<&str> {
    list.sort_by_key(|s| (s.to_lowercase(), s.to_string()));
    list
}

/// The coverage of ComfyUI's nodes by `registry` as Markdown: the counts, a table of the nodes that
/// apply to SD 1.x/2.x (and every supported one) by category, and the others by reason, folded.
pub fn markdown(registry: &Registry) -> String {
    let version = comfyui_version();
    let nodes = comfyui_nodes();
    let statuses: Vec<(&ComfyNode, Status)> = nodes.iter().map(|n| (n, status(n, registry))).collect();
    let supported = statuses.iter().filter(|(_, s)| *s == Status::Supported).count();
    let not_yet = statuses.iter().filter(|(_, s)| *s == Status::NotYet).count();
    let not_applicable = statuses.len() - supported - not_yet;

    // group → (supported, not yet)
    let mut table: BTreeMap<(u8, String), (Vec<&str>, Vec<&str>)> = BTreeMap::new();
    // reason → nodes
    let mut others: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (node, s) in &statuses {
        match s {
            Status::Supported => table.entry(group_key(&group(node.category))).or_default().0.push(node.id),
            Status::NotYet => table.entry(group_key(&group(node.category))).or_default().1.push(node.id),
            Status::NotApplicable(reason) => others.entry(reason).or_default().push(node.id),
        }
    }

    let mut out = String::new();
    out.push_str(&format!(
        "ComfyUI {version} has {} built-in nodes. **{supported} supported**, **{not_yet} not yet** (they apply to \
         SD 1.x/2.x workflows; diffloom lacks them), **{not_applicable} not applicable** (other model families, \
         audio, video, 3D, training, paid API nodes).\n\n",
        nodes.len()
    ));
    out.push_str("| category | supported | not yet |\n| --- | --- | --- |\n");
    for ((_, group), (yes, no)) in table {
        let (yes, no) = (sorted(yes), sorted(no));
        out.push_str(&format!("| {group} ({} of {}) | {} | {} |\n", yes.len(), yes.len() + no.len(), names(&yes), names(&no)));
    }
    let mut reasons: Vec<(&str, Vec<&str>)> = others.into_iter().collect();
    reasons.sort_by_key(|(reason, list)| (std::cmp::Reverse(list.len()), reason.to_lowercase()));
    out.push_str(&format!("\n<details><summary>Not applicable to SD 1.x/2.x workflows ({not_applicable}), by reason</summary>\n\n"));
    for (reason, list) in reasons {
        out.push_str(&format!("- **{reason}** ({}): {}\n", list.len(), names(&sorted(list))));
    }
    out.push_str("\n</details>\n");
    let known: HashSet<&str> = nodes.iter().map(|n| n.id).collect();
    let extra: Vec<&str> = registry.entries().map(|e| e.schema.name.as_str()).filter(|n| !known.contains(n)).collect();
    if !extra.is_empty() {
        out.push_str(&format!("\nAlso in diffloom, not in ComfyUI {version}: {}.\n", sorted(extra).join(", ")));
    }
    out
}
