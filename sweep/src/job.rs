//! What one job of a sweep carries, and where its outputs go.
//!
//! A job's files land in `<output>/<sweep id>/<job index, 5 digits>/`. They are written into a
//! temporary folder beside it and renamed into place when the job has finished, so a job that runs
//! twice (a redelivered queue entry, a re-run sweep) produces its files once, and a crashed run leaves
//! no half-written folder under the final name.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One parameter set of a sweep, with everything a worker needs to run it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The sweep's id (see [`sweep_id`]).
    pub sweep: String,
    /// 0-based position in the sweep.
    pub index: usize,
    pub total: usize,
    /// The graph file's text (RON, or a ComfyUI workflow's JSON).
    pub graph: String,
    /// The graph file's name (its extension tells the format; messages name it).
    pub graph_name: String,
    /// The folder the graph was read from: relative model and image paths in it resolve there (on a
    /// shared mount); names resolve in each worker's models folders.
    pub graph_dir: String,
    /// The job's parameters, applied as `--set` applies them.
    pub sets: Vec<(String, String)>,
    /// Plugin file name → BLAKE3 of its source, as the submitter has them: a worker whose plugin
    /// differs refuses the job rather than render something else.
    pub plugins: BTreeMap<String, String>,
    /// Set when whoever queued the job follows it as it runs (`serve --queue`): the worker reports it
    /// in [`crate::events`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow: Option<Follow>,
    /// The worker also puts the job's files on the queue, for `diffloom sweep fetch` to gather from
    /// workers that write to their own disks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub collect: bool,
}

/// How a followed job is reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Follow {
    /// Live previews of the samplers' latents (ComfyUI's latent-to-RGB projection).
    pub previews: bool,
}

/// A sweep's id: `s` and 12 hex digits of a BLAKE3 over the graph and every job's parameters, so the
/// same sweep submitted again is the same sweep (its finished jobs are not redone).
pub fn sweep_id(graph: &str, jobs: &[Vec<(String, String)>]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(graph.as_bytes());
    for job in jobs {
        h.update(b"\x00job");
        for (k, v) in job {
            h.update(format!("\x00{}\x00{k}{}\x00{v}", k.len(), v.len()).as_bytes());
        }
    }
    format!("s{}", &h.finalize().to_hex()[..12])
}

impl Job {
    /// `<root>/<sweep>/<index>`: where the job's outputs end up.
    pub fn output_dir(&self, root: &Path) -> PathBuf {
        root.join(&self.sweep).join(format!("{:05}", self.index))
    }

    /// The parameters as `name=value` text, for messages.
    pub fn describe(&self) -> String {
        self.sets.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
    }
}

/// Every file under a finished job's folder `dir`, as ('/'-separated path relative to it, contents),
/// sorted by path (symbolic links left out).
pub fn job_files(dir: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>, depth: usize) -> io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            // Symbolic links are not followed: a job's files are what its nodes wrote.
            let kind = entry.file_type()?;
            if kind.is_dir() && depth < 16 {
                walk(root, &path, out, depth + 1)?;
            } else if kind.is_file() {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let name = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
                out.push((name, fs::read(&path)?));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out, 0)?;
    out.sort();
    Ok(out)
}

/// A job's outputs being written: a temporary folder, renamed to the job's folder by [`commit`].
///
/// [`commit`]: Publish::commit
pub struct Publish {
    tmp: PathBuf,
    target: PathBuf,
}

impl Publish {
    /// Starts writing `job`'s outputs under `root`; None when they exist already (the job was done).
    pub fn begin(root: &Path, job: &Job) -> io::Result<Option<Publish>> {
        let target = job.output_dir(root);
        if target.exists() {
            return Ok(None);
        }
        let parent = target.parent().expect("a job folder has a parent");
        fs::create_dir_all(parent)?;
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = parent.join(format!(".{:05}.{}.{n}.tmp", job.index, std::process::id()));
        fs::create_dir_all(&tmp)?;
        Ok(Some(Publish { tmp, target }))
    }

    /// The folder output nodes write into until the commit.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Moves the outputs into the job's folder. `Ok(false)`: another run finished the job first; its
    /// files stay and these are dropped.
    pub fn commit(self) -> io::Result<bool> {
        match fs::rename(&self.tmp, &self.target) {
            Ok(()) => Ok(true),
            Err(_) if self.target.exists() => {
                let _ = fs::remove_dir_all(&self.tmp);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Drops what was written (the job failed or was cancelled).
    pub fn abandon(self) {
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(index: usize) -> Job {
        Job {
            sweep: sweep_id("g", &[vec![("seed".into(), "1".into())]]),
            index,
            total: 2,
            graph: "g".into(),
            graph_name: "g.ron".into(),
            graph_dir: ".".into(),
            sets: vec![("seed".into(), "1".into())],
            plugins: BTreeMap::new(),
            follow: None,
            collect: false,
        }
    }

    #[test]
    fn ids_depend_on_the_graph_and_every_parameter() {
        let a = sweep_id("g", &[vec![("seed".into(), "1".into())]]);
        assert_eq!(a.len(), 13);
        assert_eq!(a, sweep_id("g", &[vec![("seed".into(), "1".into())]]));
        assert_ne!(a, sweep_id("h", &[vec![("seed".into(), "1".into())]]));
        assert_ne!(a, sweep_id("g", &[vec![("seed".into(), "2".into())]]));
        assert_ne!(sweep_id("g", &[vec![("a".into(), "bc".into())]]), sweep_id("g", &[vec![("ab".into(), "c".into())]]));
    }

    #[test]
    fn a_job_run_twice_produces_its_files_once() {
        let d = tempfile::tempdir().unwrap();
        let (first, second) = (Publish::begin(d.path(), &job(0)).unwrap().unwrap(), Publish::begin(d.path(), &job(0)).unwrap().unwrap());
        fs::write(first.dir().join("a.png"), b"first").unwrap();
        fs::write(second.dir().join("a.png"), b"second").unwrap();
        assert!(first.commit().unwrap());
        assert!(!second.commit().unwrap(), "the second delivery finds the job done");
        let dir = job(0).output_dir(d.path());
        assert_eq!(fs::read(dir.join("a.png")).unwrap(), b"first");
        assert!(Publish::begin(d.path(), &job(0)).unwrap().is_none());
        // Nothing but the job's folder is left.
        let left: Vec<_> = fs::read_dir(dir.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["00000"]);
        let p = Publish::begin(d.path(), &job(1)).unwrap().unwrap();
        p.abandon();
        assert_eq!(fs::read_dir(dir.parent().unwrap()).unwrap().count(), 1);
    }
}
