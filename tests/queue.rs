//! Sweeps on a real Redis (Debian's redis-server, which scripts/setup.sh installs): jobs submitted
//! with `sweep --queue`, run by several `diffloom worker` processes, every output present exactly
//! once and equal to a plain run; a worker killed mid-job has its job taken over while slow live
//! workers keep theirs; a redelivered job is not written twice; malformed entries are dead-lettered
//! without stopping the worker; a password-protected server; `sweep status` and `sweep cancel`.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::{repo, stderr, stdout, Dir};

/// A `redis-server` on a free loopback port, persisting to its own folder; stopped when dropped.
struct Redis {
    child: Child,
    port: u16,
    password: Option<String>,
    /// TLS only (`rediss://`), with a certificate for localhost signed by `dir/ca.crt`.
    tls: bool,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start(password: Option<&str>) -> Redis {
        Redis::start_with(password, false)
    }

    fn start_with(password: Option<&str>, tls: bool) -> Redis {
        let server = Path::new("/usr/bin/redis-server");
        assert!(server.exists() || which("redis-server"), "redis-server is missing: run scripts/setup.sh (it installs Debian's redis-server)");
        let dir = tempfile::tempdir().expect("temp dir");
        if tls {
            make_certificates(dir.path());
        }
        let port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().unwrap().port();
        let child = Redis::spawn(port, password, tls, dir.path());
        let redis = Redis { child, port, password: password.map(str::to_owned), tls, dir };
        redis.wait_ready();
        redis
    }

    fn spawn(port: u16, password: Option<&str>, tls: bool, dir: &Path) -> Child {
        let mut cmd = Command::new("redis-server");
        if tls {
            cmd.args(["--port", "0", "--tls-port", &port.to_string(), "--tls-auth-clients", "no"]);
            cmd.arg("--tls-cert-file").arg(dir.join("server.crt")).arg("--tls-key-file").arg(dir.join("server.key"));
            cmd.arg("--tls-ca-cert-file").arg(dir.join("ca.crt"));
        } else {
            cmd.args(["--port", &port.to_string()]);
        }
        cmd.args(["--bind", "127.0.0.1", "--appendonly", "yes", "--save", ""]);
        cmd.arg("--dir").arg(dir);
        if let Some(pw) = password {
            cmd.args(["--requirepass", pw]);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start redis-server")
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not answer on port {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (SIGTERM: it writes its append-only file), waits `down`, starts it again on
    /// the same port and folder.
    fn restart(&mut self, down: Duration) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = Redis::spawn(self.port, self.password.as_deref(), self.tls, self.dir.path());
        self.wait_ready();
    }

    /// The queue URL for `stream`.
    fn url(&self, stream: &str) -> String {
        let (scheme, host) = if self.tls { ("rediss", "localhost") } else { ("redis", "127.0.0.1") };
        match &self.password {
            // A URL percent-encodes the password's special characters.
            Some(pw) => format!("{scheme}://:{}@{host}:{}/{stream}", pw.replace('#', "%23"), self.port),
            None => format!("{scheme}://{host}:{}/{stream}", self.port),
        }
    }

    /// `redis-cli ARGS`'s output.
    fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]);
        if let Some(pw) = &self.password {
            cmd.args(["--no-auth-warning", "-a", pw]);
        }
        if self.tls {
            cmd.arg("--tls").arg("--cacert").arg(self.dir.path().join("ca.crt"));
        }
        let out = cmd.args(args).output().expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA (`ca.crt`) and a certificate for localhost and 127.0.0.1 signed by it (`server.crt`,
/// `server.key`) in `dir`, made with openssl.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (Debian's openssl package)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=diffloom test CA"]);
    openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

fn which(name: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {name}")]).output().map(|o| o.status.success()).unwrap_or(false)
}

/// `diffloom worker` on `url` in `d`, one torch thread, as a child process.
fn worker(d: &Dir, url: &str, name: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_diffloom"))
        .args(["worker", "--queue", url, "--name", name, "-o", "out", "--threads", "1"])
        .args(extra)
        .current_dir(d.path())
        .env_remove("DIFFLOOM_LOG")
        .env("DIFFLOOM_CACHE_DIR", d.join(&format!(".cache-{name}")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a worker")
}

/// Waits for a worker, killing it after `secs`.
fn finish(mut child: Child, secs: u64) -> Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("worker output")
}

/// Stops a worker as Ctrl-C would (SIGINT: it finishes its job and exits), then collects it.
fn interrupt(child: Child) -> Output {
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    finish(child, 60)
}

fn graph() -> String {
    repo().join("graphs/txt2img.ron").to_str().unwrap().to_owned()
}

/// Submits a sweep of the tiny txt2img graph; returns its id.
fn submit(d: &Dir, url: &str, sets: &[&str], grids: &[&str]) -> String {
    let g = graph();
    let mut args = vec!["sweep", g.as_str(), "--queue", url];
    for s in sets {
        args.extend(["--set", s]);
    }
    for g in grids {
        args.extend(["--grid", g]);
    }
    let out = d.diffloom(&args);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let id = text.split_whitespace().nth(1).unwrap_or_default().trim_end_matches(':').to_owned();
    assert!(id.starts_with('s') && id.len() == 13, "{text}");
    id
}

/// `sweep status ID --queue URL [--wait]`.
fn status(d: &Dir, url: &str, id: &str, wait: bool) -> String {
    let mut args = vec!["sweep", "status", id, "--queue", url];
    if wait {
        args.push("--wait");
    }
    let out = d.diffloom(&args);
    format!("{}{}", stdout(&out), stderr(&out))
}

/// Waits until the sweep's status line says every job has ended.
fn wait_done(d: &Dir, url: &str, id: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = status(d, url, id, false);
        if s.contains(" 0 running, 0 pending") {
            return s;
        }
        assert!(Instant::now() < deadline, "the sweep did not finish: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The job folders under out/ID (hidden temporary folders of killed workers left out) and, for
/// each, its files.
fn outputs(d: &Dir, id: &str) -> Vec<(String, Vec<String>)> {
    d.files(&format!("out/{id}")).into_iter().filter(|n| !n.starts_with('.')).map(|n| (n.clone(), d.files(&format!("out/{id}/{n}")))).collect()
}

fn pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8().into_raw()
}

const SMALL: [&str; 3] = ["width=64", "height=64", "steps=2"];

#[test]
fn three_workers_render_a_sweep_once_each_job_as_a_plain_run() {
    let redis = Redis::start(None);
    let d = Dir::new();
    let url = redis.url("jobs");
    // 50 jobs: 25 seeds × 2 cfgs. Workers are started first, so they wait on an empty stream.
    let workers: Vec<Child> = (1..=3).map(|i| worker(&d, &url, &format!("w{i}"), &[])).collect();
    let id = submit(&d, &url, &SMALL, &["seed=1..25", "cfg=5,7.5"]);
    let s = status(&d, &url, &id, true);
    assert!(s.contains("50 jobs: 50 done, 0 running, 0 pending, 0 failed, 0 cancelled"), "{s}");
    let outs: Vec<Output> = workers.into_iter().map(interrupt).collect();
    for o in &outs {
        assert!(o.status.success(), "{}\n{}", stdout(o), stderr(o));
        assert!(!stderr(o).contains("no persistence"), "{}", stderr(o));
    }
    // Every job once, one image each.
    let jobs = outputs(&d, &id);
    assert_eq!(jobs.len(), 50, "{jobs:?}");
    for (i, (name, files)) in jobs.iter().enumerate() {
        assert_eq!(name, &format!("{i:05}"));
        assert_eq!(files, &["txt2img_00001_.png"], "job {name}");
    }
    // The work was shared: every worker ran jobs, and their done counts add up to 50.
    let done: Vec<usize> = outs.iter().map(|o| stdout(o).matches(": done in").count()).collect();
    assert_eq!(done.iter().sum::<usize>(), 50, "{done:?}");
    for (i, n) in done.iter().enumerate() {
        assert!(s.contains(&format!("worker w{}: {n} done, 0 failed", i + 1)), "{s}");
    }
    // Job 7 is seed 4 (the first grid varies slowest), cfg 7.5: the same image as a plain run.
    let g = graph();
    let plain = d.diffloom(&["run", &g, "-o", "plain", "--set", "width=64", "--set", "height=64", "--set", "steps=2", "--set", "seed=4", "--set", "cfg=7.5"]);
    assert!(plain.status.success(), "{}", stderr(&plain));
    assert_eq!(pixels(&d.join(&format!("out/{id}/00007/txt2img_00001_.png"))), pixels(&d.join("plain/txt2img_00001_.png")));
    assert_ne!(pixels(&d.join(&format!("out/{id}/00006/txt2img_00001_.png"))), pixels(&d.join("plain/txt2img_00001_.png")));
    // Finished entries are gone from the stream; nothing was dead-lettered.
    assert_eq!(redis.cli(&["XLEN", "jobs"]).trim(), "0");
    assert_eq!(redis.cli(&["XLEN", "jobs:dead"]).trim(), "0");
}

#[test]
fn a_killed_workers_job_is_taken_over_and_slow_live_workers_keep_theirs() {
    let redis = Redis::start(None);
    let d = Dir::new();
    let url = redis.url("jobs");
    // Jobs of about 1.5 s on one thread, longer than the claim timeout: only the
    // heartbeat keeps a live worker's job from being taken over.
    let id = submit(&d, &url, &["width=192", "height=192", "steps=30"], &["seed=1..4"]);
    let timeout = ["--claim-timeout", "0.4"];
    let a = worker(&d, &url, "a", &timeout);
    let b = worker(&d, &url, "b", &timeout);
    // Kill `a` while it runs a job.
    let deadline = Instant::now() + Duration::from_secs(60);
    let killed = loop {
        let running = redis.cli(&["HGETALL", &format!("jobs:sweep:{id}:running")]);
        let lines: Vec<&str> = running.lines().collect();
        if let Some(pos) = lines.iter().position(|l| l.starts_with("a ")) {
            // Past the model loading, into the job.
            std::thread::sleep(Duration::from_millis(300));
            break lines[pos - 1].to_owned();
        }
        assert!(Instant::now() < deadline, "worker a never ran a job");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut a = a;
    a.kill().expect("SIGKILL worker a");
    let a = a.wait_with_output().expect("a's output");
    let s = wait_done(&d, &url, &id, 120);
    let b = interrupt(b);
    assert!(s.contains("4 jobs: 4 done, 0 running, 0 pending, 0 failed"), "{s}\n{}", stdout(&b));
    let jobs = outputs(&d, &id);
    assert_eq!(jobs.len(), 4, "{jobs:?}");
    assert!(jobs.iter().all(|(_, files)| files == &["txt2img_00001_.png"]), "{jobs:?}");
    // `b` took over exactly the killed job, and `a` finished it never.
    let (a_out, b_out) = (stdout(&a), stdout(&b));
    assert_eq!(b_out.matches("took over entry").count(), 1, "{b_out}");
    assert!(b_out.contains(&format!("job {killed} of {id}")), "job {killed}: {b_out}");
    assert!(!a_out.contains(&format!("job {killed} of {id} (")), "{a_out}");
    assert!(s.contains("worker b: "), "{s}");
    assert_eq!(redis.cli(&["XLEN", "jobs"]).trim(), "0");
}

#[test]
fn redelivered_jobs_are_not_written_twice_and_bad_entries_are_dead_lettered() {
    let redis = Redis::start(Some("s3cr#t"));
    let d = Dir::new();
    let url = redis.url("q");
    let bad_url = format!("redis://:wrong@127.0.0.1:{}/q", redis.port);
    let refused = d.diffloom(&["sweep", "status", "sabc", "--queue", &bad_url]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("redis://:***@127.0.0.1") && !stderr(&refused).contains("wrong"), "{}", stderr(&refused));

    // Poison entries before a good sweep: each is dead-lettered with its error, and the worker goes on.
    let id = submit(&d, &url, &SMALL, &["seed=1..3"]);
    redis.cli(&["XADD", "q", "*", "v", "2", "sweep", &id, "index", "9", "job", "{not json"]);
    redis.cli(&["XADD", "q", "*", "v", "9", "job", "{}"]);
    redis.cli(&["XADD", "q", "*", "hello", "world"]);
    let job = serde_json::json!({
        "sweep": id, "index": 1, "total": 3, "graph": "(nodes: {\"x\": (type: \"NoSuchNode\")})",
        "graph_name": "bad.ron", "graph_dir": ".", "sets": [], "plugins": {},
    });
    redis.cli(&["XADD", "q", "*", "v", "2", "sweep", &id, "index", "1", "job", &job.to_string()]);
    let plugin = serde_json::json!({
        "sweep": id, "index": 2, "total": 3, "graph": std::fs::read_to_string(graph()).unwrap(),
        "graph_name": "txt2img.ron", "graph_dir": repo().join("graphs"), "sets": [["width", "64"], ["height", "64"], ["steps", "2"]],
        "plugins": {"mine.lua": "0000"},
    });
    redis.cli(&["XADD", "q", "*", "v", "2", "sweep", &id, "index", "2", "job", &plugin.to_string()]);
    let w = worker(&d, &url, "w", &["--max-jobs", "8"]);
    let s = wait_done(&d, &url, &id, 60);
    let out = finish(w, 30);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("stopped after 8 jobs"), "{}", stdout(&out));
    let dead = redis.cli(&["XRANGE", "q:dead", "-", "+"]);
    assert_eq!(redis.cli(&["XLEN", "q:dead"]).trim(), "5", "{dead}");
    for error in ["not valid JSON", "format version \"9\"", "no field \"v\"", "NoSuchNode", "plugin mine.lua is not loaded here"] {
        assert!(dead.contains(error), "{error}: {dead}");
    }
    // The bad copies of jobs 1 and 2 came after the good ones had run: a done job stays done.
    assert!(s.contains("3 jobs: 3 done, 0 running, 0 pending, 0 failed"), "{s}");
    let first = outputs(&d, &id);
    assert_eq!(first.len(), 3, "{first:?}");
    let modified = |n: &str| std::fs::metadata(d.join(&format!("out/{id}/{n}/txt2img_00001_.png"))).unwrap().modified().unwrap();
    let before = modified("00001");

    // The same jobs delivered again (their records lost): found done, not written again.
    redis.cli(&["DEL", &format!("q:sweep:{id}:results")]);
    assert_eq!(submit(&d, &url, &SMALL, &["seed=1..3"]), id);
    let w = worker(&d, &url, "w2", &["--max-jobs", "3"]);
    let out = finish(w, 60);
    assert_eq!(stdout(&out).matches(": already done").count(), 3, "{}", stdout(&out));
    assert_eq!(outputs(&d, &id), first);
    assert_eq!(modified("00001"), before);
    let s = status(&d, &url, &id, false);
    assert!(s.contains("3 jobs: 3 done, 0 running, 0 pending, 0 failed"), "{s}");
    // Submitting a finished sweep again queues nothing.
    let again = d.diffloom(&["sweep", &graph(), "--queue", &url, "--set", "width=64", "--set", "height=64", "--set", "steps=2", "--grid", "seed=1..3"]);
    assert!(stdout(&again).contains("0 jobs queued") && stdout(&again).contains("did 3 jobs"), "{}", stdout(&again));
}

#[test]
fn status_counts_failures_and_cancel_drops_what_is_queued() {
    let redis = Redis::start(None);
    let d = Dir::new();
    let url = redis.url("jobs");
    let missing = d.diffloom(&["sweep", "status", "s000000000000", "--queue", &url]);
    assert!(!missing.status.success() && stderr(&missing).contains("no sweep s000000000000"), "{}", stderr(&missing));
    // Job 1 of 3 fails on the worker: its checkpoint was valid when submitted, then broke.
    let tiny = repo().join("models/test/tiny-sd1.safetensors");
    std::fs::copy(&tiny, d.join("good.safetensors")).unwrap();
    std::fs::copy(&tiny, d.join("bad.safetensors")).unwrap();
    let (good, bad) = (d.join("good.safetensors"), d.join("bad.safetensors"));
    d.write("rows.csv", format!("ckpt,seed\n{},1\n{},2\n{},3\n", good.display(), bad.display(), good.display()));
    let g = graph();
    let rows = d.join("rows.csv");
    let mut args = vec!["sweep", g.as_str(), "--queue", &url, "--rows", rows.to_str().unwrap()];
    for s in SMALL {
        args.extend(["--set", s]);
    }
    let sub = d.diffloom(&args);
    assert!(sub.status.success(), "{}", stderr(&sub));
    let id = stdout(&sub).split_whitespace().nth(1).unwrap().trim_end_matches(':').to_owned();
    std::fs::write(&bad, b"not a safetensors file").unwrap();
    let out = finish(worker(&d, &url, "w", &["--max-jobs", "3"]), 60);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = status(&d, &url, &id, false);
    assert!(s.contains("3 jobs: 2 done, 0 running, 0 pending, 1 failed, 0 cancelled"), "{s}");
    assert!(s.contains("worker w: 2 done, 1 failed"), "{s}");
    assert!(s.contains("job 1 failed on w: ") && s.contains("bad.safetensors"), "{s}");
    assert_eq!(outputs(&d, &id).iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["00000", "00002"]);
    assert_eq!(redis.cli(&["XLEN", "jobs:dead"]).trim(), "1");
    let waited = d.diffloom(&["sweep", "status", &id, "--queue", &url, "--wait"]);
    assert_eq!(waited.status.code(), Some(1), "a sweep with failures ends in failure");

    // A confined worker takes model names inside its folders, and refuses paths outside them.
    std::fs::create_dir_all(d.join("models/checkpoints")).unwrap();
    std::fs::copy(&tiny, d.join("models/checkpoints/tiny.safetensors")).unwrap();
    d.write("names.csv", format!("ckpt\ntiny.safetensors\n{}\n", tiny.display()));
    let names = d.join("names.csv");
    let mut args = vec!["sweep", g.as_str(), "--queue", &url, "--rows", names.to_str().unwrap()];
    for s in SMALL {
        args.extend(["--set", s]);
    }
    let sub = d.diffloom(&args);
    assert!(sub.status.success(), "{}", stderr(&sub));
    let id = stdout(&sub).split_whitespace().nth(1).unwrap().trim_end_matches(':').to_owned();
    let out = finish(worker(&d, &url, "c", &["--max-jobs", "2", "--confine", "--models", "models"]), 60);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = status(&d, &url, &id, false);
    assert!(s.contains("2 jobs: 1 done, 0 running, 0 pending, 1 failed"), "{s}\n{}", stdout(&out));
    assert!(s.contains("job 1 failed on c: ") && s.contains("not found; searched"), "{s}");

    // Cancel: queued jobs are dropped, a worker started afterwards runs none of them.
    let id2 = submit(&d, &url, &SMALL, &["seed=10..14"]);
    let s = status(&d, &url, &id2, false);
    assert!(s.contains("5 jobs: 0 done, 0 running, 5 pending"), "{s}");
    let cancel = d.diffloom(&["sweep", "cancel", &id2, "--queue", &url]);
    assert!(cancel.status.success() && stdout(&cancel).contains("5 queued jobs dropped"), "{}{}", stdout(&cancel), stderr(&cancel));
    let s = status(&d, &url, &id2, false);
    assert!(s.contains("5 jobs: 0 done, 0 running, 0 pending, 0 failed, 5 cancelled (cancel requested)"), "{s}");
    assert_eq!(redis.cli(&["XLEN", "jobs"]).trim(), "0");
    assert!(outputs(&d, &id2).is_empty());

    // A server that would lose the queue on a restart is warned about.
    redis.cli(&["CONFIG", "SET", "appendonly", "no"]);
    let out = finish(worker(&d, &url, "p", &["--max-jobs", "0"]), 30);
    assert!(out.status.success() && stderr(&out).contains("no persistence"), "{}", stderr(&out));
}

#[test]
fn jobs_delivered_too_often_are_dead_lettered_and_a_redis_restart_is_survived() {
    let mut redis = Redis::start(None);
    let d = Dir::new();
    let url = redis.url("jobs");
    // A consumer that takes a job and never finishes it (a worker that died at once).
    let id = submit(&d, &url, &SMALL, &["seed=1..2"]);
    let taken = redis.cli(&["XREADGROUP", "GROUP", "diffloom", "ghost", "COUNT", "1", "STREAMS", "jobs", ">"]);
    assert!(taken.contains("\"index\"") || taken.contains("index"), "{taken}");
    // No retries: the reclaimed job was delivered twice, once too often.
    let out = finish(worker(&d, &url, "w", &["--max-retries", "0", "--claim-timeout", "0.3", "--max-jobs", "2"]), 60);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = status(&d, &url, &id, false);
    assert!(s.contains("2 jobs: 1 done, 0 running, 0 pending, 1 failed"), "{s}\n{}", stdout(&out));
    assert!(s.contains("job 0 failed on w: ") && s.contains("delivered 2 times without finishing"), "{s}");
    let dead = redis.cli(&["XRANGE", "jobs:dead", "-", "+"]);
    assert!(dead.contains("delivered 2 times") && dead.contains("deliveries\n2"), "{dead}");

    // The server restarts mid-sweep: the worker reconnects and the sweep completes, each job once.
    let id = submit(&d, &url, &["width=128", "height=128", "steps=8"], &["seed=1..8"]);
    let w = worker(&d, &url, "r", &["--claim-timeout", "1"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = |s: &str| s.split(" jobs: ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
    while done(&status(&d, &url, &id, false)) < 2 {
        assert!(Instant::now() < deadline, "no progress: {}", status(&d, &url, &id, false));
        std::thread::sleep(Duration::from_millis(100));
    }
    redis.restart(Duration::from_millis(1500));
    let s = wait_done(&d, &url, &id, 90);
    let out = interrupt(w);
    assert!(s.contains("8 jobs: 8 done, 0 running, 0 pending, 0 failed"), "{s}\n{}\n{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("reconnected"), "{}", stderr(&out));
    let jobs = outputs(&d, &id);
    assert_eq!(jobs.len(), 8, "{jobs:?}");
    assert!(jobs.iter().all(|(_, files)| files == &["txt2img_00001_.png"]), "{jobs:?}");
}

#[test]
fn a_tls_server_with_a_password_works_with_a_private_ca() {
    let redis = Redis::start_with(Some("pw"), true);
    let d = Dir::new();
    let url = redis.url("jobs");
    assert!(url.starts_with("rediss://:pw@localhost:"), "{url}");
    let ca = redis.dir.path().join("ca.crt");
    let diffloom = |args: &[&str], ca: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffloom"));
        cmd.args(args).current_dir(d.path()).env_remove("DIFFLOOM_LOG").env("DIFFLOOM_CACHE_DIR", d.join(".cache"));
        match ca {
            Some(ca) => cmd.env("DIFFLOOM_REDIS_CA", ca),
            None => cmd.env_remove("DIFFLOOM_REDIS_CA"),
        };
        cmd.output().expect("run diffloom")
    };
    // The test CA is no public root: refused without it.
    let refused = diffloom(&["sweep", "status", "s000000000000", "--queue", &url], None);
    assert!(!refused.status.success() && stderr(&refused).contains("certificate"), "{}", stderr(&refused));
    let g = graph();
    let sub = diffloom(&["sweep", &g, "--queue", &url, "--set", "width=64", "--set", "height=64", "--set", "steps=2", "--grid", "seed=1..2"], Some(&ca));
    assert!(sub.status.success(), "{}", stderr(&sub));
    let id = stdout(&sub).split_whitespace().nth(1).unwrap().trim_end_matches(':').to_owned();
    let out = diffloom(&["worker", "--queue", &url, "--name", "t", "-o", "out", "--threads", "1", "--max-jobs", "2"], Some(&ca));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let s = diffloom(&["sweep", "status", &id, "--queue", &url], Some(&ca));
    assert!(stdout(&s).contains("2 jobs: 2 done, 0 running, 0 pending, 0 failed"), "{}{}", stdout(&s), stderr(&s));
    assert_eq!(outputs(&d, &id).len(), 2);
}

#[test]
fn a_second_ctrl_c_gives_the_job_back_and_cancel_stops_a_running_job() {
    let redis = Redis::start(None);
    let d = Dir::new();
    let url = redis.url("jobs");
    // Jobs of many seconds: both stops come mid-job.
    let id = submit(&d, &url, &["width=256", "height=256", "steps=200"], &["seed=1..2"]);
    let running = || redis.cli(&["HLEN", &format!("jobs:sweep:{id}:running")]).trim() == "1";
    let wait_running = || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !running() {
            assert!(Instant::now() < deadline, "no job started");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let w = worker(&d, &url, "w1", &["--claim-timeout", "1"]);
    wait_running();
    let pid = w.id().to_string();
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    std::thread::sleep(Duration::from_millis(300));
    let out = interrupt(w);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("given back to the queue"), "{}\n{}", stdout(&out), stderr(&out));
    let s = status(&d, &url, &id, false);
    assert!(s.contains("2 jobs: 0 done, 0 running, 2 pending"), "{s}");
    assert_eq!(redis.cli(&["XLEN", "jobs"]).trim(), "2");
    assert!(redis.cli(&["XPENDING", "jobs", "diffloom"]).starts_with('0'), "nothing is left pending");

    let w = worker(&d, &url, "w2", &["--claim-timeout", "1"]);
    wait_running();
    let cancel = d.diffloom(&["sweep", "cancel", &id, "--queue", &url]);
    assert!(stdout(&cancel).contains("1 queued jobs dropped"), "{}{}", stdout(&cancel), stderr(&cancel));
    let s = wait_done(&d, &url, &id, 30);
    let out = interrupt(w);
    assert!(s.contains("2 jobs: 0 done, 0 running, 0 pending, 0 failed, 2 cancelled"), "{s}");
    assert!(stdout(&out).contains("stopped, the sweep was cancelled"), "{}", stdout(&out));
    assert!(outputs(&d, &id).is_empty());
    assert_eq!(redis.cli(&["XLEN", "jobs"]).trim(), "0");
}

/// A child process killed when dropped (a failed assertion leaves no worker or server behind).
struct Kill(Option<Child>);

impl Kill {
    fn take(mut self) -> Child {
        self.0.take().expect("taken once")
    }
}

impl Drop for Kill {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `diffloom serve --queue URL` on a free loopback port in `d` (outputs in `served/`); its address.
fn serve_on_queue(d: &Dir, url: &str) -> (Kill, String) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_diffloom"))
        .args(["serve", "--port", "0", "--queue", url, "--models", "models", "-o", "served", "--graphs", "."])
        .current_dir(d.path())
        .env_remove("DIFFLOOM_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start diffloom serve");
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let child = Kill(Some(child));
    let addr = loop {
        let line = lines.next().expect("serve ended before it listened").unwrap();
        if let Some(a) = line.strip_prefix("diffloom serve: http://") {
            break a.to_owned();
        }
    };
    // Keep reading its log so that it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}

/// Waits until `check` holds, for at most 10 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_served_prompt_runs_on_a_worker_and_its_progress_and_image_come_back() {
    use crate::server::{api_prompt, messages_and_frames, messages_until};
    use serde_json::{json, Value};
    let d = Dir::new();
    std::fs::create_dir_all(d.join("models/checkpoints/SD1.5")).unwrap();
    crate::util::tiny_sd1(&d, "models/checkpoints/SD1.5/tiny-sd1.safetensors");
    std::fs::create_dir_all(d.join("empty")).unwrap();
    let redis = Redis::start(None);
    let url = redis.url("q");
    let w = Kill(Some(worker(&d, &url, "w1", &["--models", "models", "--claim-timeout", "2", "--no-disk-cache"])));
    let (_server, addr) = serve_on_queue(&d, &url);
    let http: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let post = |path: &str, body: Value| {
        let mut r = http.post(&format!("http://{addr}{path}")).header("Content-Type", "application/json").send(body.to_string()).unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default())
    };
    let queue_prompt = |prompt: Value| {
        let (status, body) = post("/prompt", json!({"prompt": prompt, "client_id": "canvas"}));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["prompt_id"].as_str().unwrap().to_owned()
    };
    let get_json = |path: &str| -> Value {
        serde_json::from_str(&http.get(&format!("http://{addr}{path}")).call().unwrap().body_mut().read_to_string().unwrap()).unwrap()
    };
    let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/ws?clientId=canvas")).unwrap();
    messages_until(&mut ws, "status");
    ws.send(tungstenite::Message::Text(json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}}).to_string().into())).unwrap();
    messages_until(&mut ws, "feature_flags");

    // The prompt runs on the worker; the canvas sees what a local run shows: start, progress with a
    // live preview per step, each node, and the image, served here from the bytes the worker sent.
    let (status, body) = post("/prompt", json!({"prompt": api_prompt(), "client_id": "canvas", "extra_data": {"preview_method": "latent2rgb"}}));
    assert_eq!(status, 200, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["prompt_id"].as_str().unwrap().to_owned();
    let mut frames = Vec::new();
    let events = messages_and_frames(&mut ws, "execution_success", &mut frames);
    assert_eq!(frames.len(), 4, "one preview per step");
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).filter(|k| !matches!(*k, "status" | "progress_state" | "binary")).collect();
    assert_eq!(kinds[..2], ["execution_start", "execution_cached"], "{kinds:?}");
    let executing: Vec<&str> = events.iter().filter(|(k, _)| k == "executing").map(|(_, d)| d["node"].as_str().unwrap()).collect();
    assert_eq!(executing, ["4", "5", "6", "7", "3", "8", "9"]);
    let progress: Vec<u64> = events.iter().filter(|(k, _)| k == "progress").map(|(_, d)| d["value"].as_u64().unwrap()).collect();
    assert_eq!(progress, [1, 2, 3, 4]);
    let executed = &events.iter().find(|(k, _)| k == "executed").unwrap().1;
    assert_eq!((executed["node"].as_str(), executed["prompt_id"].as_str()), (Some("9"), Some(id.as_str())));
    let image = &executed["output"]["images"][0];
    let (name, sub) = (image["filename"].as_str().unwrap(), image["subfolder"].as_str().unwrap());
    let (sweep, job) = sub.split_once('/').unwrap();
    assert!(sweep.starts_with('p') && job == "00000", "{sub}");
    let mut r = http.get(&format!("http://{addr}/view?filename={name}&subfolder={sub}&type=output")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let served = r.body_mut().read_to_vec().unwrap();
    // The worker's own copy, and a plain run of the same workflow, are the same image.
    assert_eq!(served, std::fs::read(d.join(&format!("out/{sub}/{name}"))).unwrap());
    d.write("api.json", api_prompt().to_string());
    let o = d.diffloom(&["run", "api.json", "--models", "models", "-o", "cli"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(image::load_from_memory(&served).unwrap().to_rgb8().into_raw(), pixels(&d.join("cli/wf_00001_.png")));
    let history = get_json(&format!("/history/{id}"));
    assert_eq!(history[&id]["status"]["status_str"], "success");
    assert_eq!(history[&id]["outputs"]["9"]["images"][0]["subfolder"], sub);
    // Read to its end, the events stream goes, and the job's records expire.
    eventually("the events stream stays", || redis.cli(&["EXISTS", &format!("q:sweep:{sweep}:events")]).trim() == "0");
    let ttl: i64 = redis.cli(&["TTL", &format!("q:sweep:{sweep}")]).trim().parse().unwrap();
    assert!(ttl > 0, "{ttl}");
    // An id already queued is refused.
    let mut long = api_prompt();
    long["3"]["inputs"]["steps"] = json!(5000);
    let long_id = queue_prompt(long.clone());
    let (status, body) = post("/prompt", json!({"prompt": long, "prompt_id": long_id}));
    assert_eq!(status, 400, "{body}");

    // Interrupt reaches the worker: the long prompt stops within a second of it.
    messages_until(&mut ws, "progress");
    assert_eq!(get_json("/queue")["queue_running"][0][1], long_id.as_str());
    post("/interrupt", json!({}));
    let events = messages_until(&mut ws, "execution_interrupted");
    let stopped = &events.last().unwrap().1;
    assert_eq!((stopped["prompt_id"].as_str(), stopped["node_id"].as_str()), (Some(long_id.as_str()), Some("3")));
    let last = events.iter().rfind(|(k, _)| k == "progress").unwrap().1["value"].as_u64().unwrap();
    assert!(last < 5000, "stopped after {last} of 5000 steps");
    assert_eq!(get_json(&format!("/history/{long_id}"))[&long_id]["status"]["status_str"], "error");

    // With no worker, prompts wait on the queue.
    let out = interrupt(w.take());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hostile = queue_prompt(api_prompt());
    eventually("the prompt did not reach the queue", || redis.cli(&["XLEN", "q"]).trim() == "1");
    assert_eq!(get_json("/queue")["queue_pending"][0][1], hostile.as_str());
    // A worker that sends files outside the server's folders, or entries that are no events, gets
    // nothing written there; the rest of what it says is relayed.
    let entry = redis.cli(&["XRANGE", "q", "-", "+"]);
    let lines: Vec<&str> = entry.lines().collect();
    let sweep = lines.windows(2).find(|w| w[0] == "sweep").map(|w| w[1].to_owned()).unwrap();
    redis.cli(&["XTRIM", "q", "MAXLEN", "0"]);
    let stream = format!("q:sweep:{sweep}:events");
    let add = |data: Value, bytes: &str| redis.cli(&["XADD", &stream, "*", "data", &data.to_string(), "bytes", bytes]);
    add(json!({"type": "start", "worker": "mallory"}), "");
    redis.cli(&["XADD", &stream, "*", "hello", "world"]);
    add(json!({"type": "from_a_newer_worker"}), "");
    for path in ["../../escaped.png", "/tmp/diffloom-absolute.png", "a/../../../escaped2.png"] {
        add(json!({"type": "file", "kind": "output", "path": path}), "evil");
    }
    add(json!({"type": "file", "kind": "input", "path": "planted.png"}), "evil");
    add(json!({"type": "file", "kind": "output", "path": "sub/ok.png"}), "fine");
    add(json!({"type": "executed", "node": "save", "ui": {"images": [{"filename": "ok.png", "subfolder": "sub", "type": "output"}]}}), "");
    add(json!({"type": "end", "status": "success"}), "");
    let events = messages_until(&mut ws, "execution_success");
    assert_eq!(events.last().unwrap().1["prompt_id"], hostile.as_str());
    let shown = &events.iter().find(|(k, _)| k == "executed").unwrap().1["output"]["images"][0];
    assert_eq!(shown["subfolder"], format!("{sweep}/00000/sub"));
    assert_eq!(std::fs::read(d.join(&format!("served/{sweep}/00000/sub/ok.png"))).unwrap(), b"fine");
    assert!(!Path::new("/tmp/diffloom-absolute.png").exists());
    for planted in ["escaped.png", "escaped2.png", "served/escaped.png", "served/escaped2.png", "input/planted.png", "served/planted.png"] {
        assert!(!d.join(planted).exists(), "{planted}");
    }

    // Deleting a waiting prompt drops it from the queue too, without a trace.
    let waiting = queue_prompt(api_prompt());
    eventually("the prompt did not reach the queue", || redis.cli(&["XLEN", "q"]).trim() == "1");
    post("/queue", json!({"delete": [waiting]}));
    assert_eq!(redis.cli(&["XLEN", "q"]).trim(), "0");
    assert_eq!(get_json("/queue"), json!({"queue_running": [], "queue_pending": []}));
    assert_eq!(get_json(&format!("/history/{waiting}")), json!({}));

    // A worker without the checkpoint refuses the job; the canvas gets the error naming it.
    let w2 = Kill(Some(worker(&d, &url, "w2", &["--models", "empty", "--no-disk-cache"])));
    let failing = queue_prompt(api_prompt());
    let events = messages_until(&mut ws, "execution_error");
    let error = &events.last().unwrap().1;
    assert_eq!(error["prompt_id"], failing.as_str());
    assert!(error["exception_message"].as_str().unwrap().contains("tiny-sd1.safetensors"), "{error}");
    assert_eq!(get_json(&format!("/history/{failing}"))[&failing]["status"]["status_str"], "error");
    eventually("the job was not dead-lettered", || redis.cli(&["XLEN", "q:dead"]).trim() == "1");
    interrupt(w2.take());
}

#[test]
fn jobs_sharing_a_checkpoint_are_queued_together() {
    let d = Dir::new();
    let redis = Redis::start(None);
    let url = redis.url("q");
    let model = repo().join("models/test/tiny-sd1.safetensors");
    std::fs::copy(&model, d.join("other.safetensors")).unwrap();
    let ckpts = format!("ckpt={},{}", model.display(), d.join("other.safetensors").display());
    // seed varies slowest: jobs 0, 2, 4 use the first checkpoint, 1, 3, 5 the second.
    submit(&d, &url, &SMALL, &["seed=1..3", &ckpts]);
    let listing = redis.cli(&["XRANGE", "q", "-", "+"]);
    let lines: Vec<&str> = listing.lines().collect();
    let order: Vec<&str> = lines.windows(2).filter(|w| w[0] == "index").map(|w| w[1]).collect();
    assert_eq!(order, ["0", "2", "4", "1", "3", "5"]);
}

#[test]
fn sweep_fetch_gathers_what_workers_wrote_to_their_own_disks() {
    let (d, d1, d2) = (Dir::new(), Dir::new(), Dir::new());
    let redis = Redis::start(None);
    let url = redis.url("q");
    let g = graph();
    let mut args = vec!["sweep", g.as_str(), "--queue", url.as_str(), "--collect", "--grid", "seed=1..6"];
    for s in SMALL {
        args.extend(["--set", s]);
    }
    let out = d.diffloom(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).split_whitespace().nth(1).unwrap().trim_end_matches(':').to_owned();
    // Fetching while the workers run, until every job has ended.
    let fetcher = Kill(Some(
        Command::new(env!("CARGO_BIN_EXE_diffloom"))
            .args(["sweep", "fetch", &id, "--queue", &url, "-o", "gathered", "--wait"])
            .current_dir(d.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let (w1, w2) = (Kill(Some(worker(&d1, &url, "w1", &["--max-jobs", "3"]))), Kill(Some(worker(&d2, &url, "w2", &["--max-jobs", "3"]))));
    let fetched = finish(fetcher.take(), 120);
    assert!(fetched.status.success(), "{}", stderr(&fetched));
    assert!(stdout(&fetched).contains("fetched 6 files"), "{}", stdout(&fetched));
    assert!(finish(w1.take(), 60).status.success());
    assert!(finish(w2.take(), 60).status.success());
    // Every job's image, as the worker that ran it wrote it, and nothing left on the queue.
    let gathered = d.files(&format!("gathered/{id}"));
    assert_eq!(gathered, ["00000", "00001", "00002", "00003", "00004", "00005"]);
    let (mut from1, mut from2) = (0, 0);
    for job in &gathered {
        let rel = format!("{id}/{job}/txt2img_00001_.png");
        let ours = std::fs::read(d.join(&format!("gathered/{rel}"))).unwrap();
        let theirs = match (std::fs::read(d1.join(&format!("out/{rel}"))), std::fs::read(d2.join(&format!("out/{rel}")))) {
            (Ok(t), Err(_)) => {
                from1 += 1;
                t
            }
            (Err(_), Ok(t)) => {
                from2 += 1;
                t
            }
            (a, b) => panic!("job {job}: on worker 1 {}, on worker 2 {}", a.is_ok(), b.is_ok()),
        };
        assert_eq!(ours, theirs);
    }
    assert_eq!((from1, from2), (3, 3), "each worker ran 3 jobs on its own disk");
    assert_eq!(redis.cli(&["EXISTS", &format!("q:sweep:{id}:files")]).trim(), "0");
    let again = d.diffloom(&["sweep", "fetch", &id, "--queue", &url, "-o", "gathered"]);
    assert!(stdout(&again).contains("fetched 0 files"), "{}", stdout(&again));

    // Entries that cannot be files of this sweep are reported and dropped; nothing lands outside the
    // job folders, and the good entry behind them is fetched.
    let files = format!("q:sweep:{id}:files");
    for (index, path) in
        [("0", "../escaped.png"), ("0", "/tmp/diffloom-fetch-absolute.png"), ("1", "a/../../../escaped2.png"), ("-1", "x.png"), ("6", "x.png"), ("0", "")]
    {
        redis.cli(&["XADD", &files, "*", "index", index, "path", path, "bytes", "evil"]);
    }
    redis.cli(&["XADD", &files, "*", "index", "2", "path", "no-bytes.png"]);
    redis.cli(&["XADD", &files, "*", "hello", "world"]);
    redis.cli(&["XADD", &files, "*", "index", "2", "path", "extra/late.png", "bytes", "fine"]);
    let hostile = d.diffloom(&["sweep", "fetch", &id, "--queue", &url, "-o", "gathered"]);
    assert!(hostile.status.success(), "{}", stderr(&hostile));
    assert!(stdout(&hostile).contains("fetched 1 files") && stdout(&hostile).contains("8 entries skipped"), "{}", stdout(&hostile));
    assert_eq!(std::fs::read(d.join(&format!("gathered/{id}/00002/extra/late.png"))).unwrap(), b"fine");
    assert!(!Path::new("/tmp/diffloom-fetch-absolute.png").exists());
    for planted in ["escaped.png", "escaped2.png", "gathered/escaped.png", "gathered/escaped2.png", &format!("gathered/{id}/escaped.png")] {
        assert!(!d.join(planted).exists(), "{planted}");
    }
    assert_eq!(d.files(&format!("gathered/{id}")).len(), 6, "no job folder beyond the sweep's");
    assert_eq!(redis.cli(&["XLEN", &files]).trim(), "0");
    let unknown = d.diffloom(&["sweep", "fetch", "s000000000000", "--queue", &url]);
    assert!(!unknown.status.success() && stderr(&unknown).contains("no sweep s000000000000"), "{}", stderr(&unknown));
}
