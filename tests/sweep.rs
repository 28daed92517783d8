//! `diffloom sweep`: grids and CSV rows expanded into jobs, each job's image equal to a plain run
//! with the same parameters, outputs per job, a re-run skipping finished jobs, and bad parameters
//! refused before anything runs.

use crate::util::{repo, stderr, stdout, Dir};

fn pixels(path: &std::path::Path) -> Vec<u8> {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8().into_raw()
}

const SMALL: [&str; 6] = ["--set", "width=64", "--set", "height=64", "--set", "steps=2"];

#[test]
fn a_sweep_renders_every_job_once_as_plain_runs_would() {
    let d = Dir::new();
    let graph = repo().join("graphs/txt2img.ron");
    let graph = graph.to_str().unwrap();
    let sweep = |extra: &[&str]| {
        let mut args = vec!["sweep", graph, "-o", "out"];
        args.extend_from_slice(&SMALL);
        args.extend_from_slice(extra);
        d.diffloom(&args)
    };
    let out = sweep(&["--grid", "seed=1..3", "--grid", "cfg=5,7.5"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("6 jobs") && text.contains("6 ran, 0 already done, 0 failed"), "{text}");
    let id = text.split_whitespace().nth(1).unwrap().trim_end_matches(':').to_owned();
    assert!(id.starts_with('s') && id.len() == 13, "{id}");
    let jobs = d.files(&format!("out/{id}"));
    assert_eq!(jobs, ["00000", "00001", "00002", "00003", "00004", "00005"]);
    // Job 3 is seed 2 (the first grid varies slowest), cfg 7.5: the same image as a plain run.
    let plain = {
        let mut args = vec!["run", graph, "-o", "plain", "--set", "seed=2", "--set", "cfg=7.5"];
        args.extend_from_slice(&SMALL);
        d.diffloom(&args)
    };
    assert!(plain.status.success(), "{}", stderr(&plain));
    let job3 = d.files(&format!("out/{id}/00003"));
    assert_eq!(job3, ["txt2img_00001_.png"]);
    assert_eq!(pixels(&d.join(&format!("out/{id}/00003/txt2img_00001_.png"))), pixels(&d.join("plain/txt2img_00001_.png")));
    assert_ne!(pixels(&d.join(&format!("out/{id}/00002/txt2img_00001_.png"))), pixels(&d.join(&format!("out/{id}/00003/txt2img_00001_.png"))));

    // The same sweep again: every job is done, nothing is written twice.
    let again = sweep(&["--grid", "seed=1..3", "--grid", "cfg=5,7.5"]);
    assert!(stdout(&again).contains("0 ran, 6 already done"), "{}", stdout(&again));
    assert_eq!(d.files(&format!("out/{id}/00003")), ["txt2img_00001_.png"]);

    // CSV rows, each combined with the grid.
    d.write("rows.csv", "prompt,seed\n\"a cat, sitting\",4\na dog,5\n");
    let rows = sweep(&["--rows", "rows.csv", "--grid", "cfg=6,8"]);
    assert!(rows.status.success(), "{}", stderr(&rows));
    assert!(stdout(&rows).contains("4 ran"), "{}", stdout(&rows));

    // A parameter the graph lacks is refused, naming the job, before anything runs.
    let bad = sweep(&["--grid", "sed=1..2"]);
    assert!(!bad.status.success());
    let err = stderr(&bad);
    assert!(err.contains("2 of 2 jobs are invalid") && err.contains("sed") && err.contains("job 0"), "{err}");
    let bad = sweep(&["--grid", "seed=5..1"]);
    assert!(!bad.status.success() && stderr(&bad).contains("--grid \"seed=5..1\""), "{}", stderr(&bad));
}
