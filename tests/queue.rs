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
    redis.cli(&["XADD", "q", "*", "v", "1", "sweep", &id, "index", "9", "job", "{not json"]);
    redis.cli(&["XADD", "q", "*", "v", "2", "job", "{}"]);
    redis.cli(&["XADD", "q", "*", "hello", "world"]);
    let job = serde_json::json!({
        "sweep": id, "index": 1, "total": 3, "graph": "(nodes: {\"x\": (type: \"NoSuchNode\")})",
        "graph_name": "bad.ron", "graph_dir": ".", "sets": [], "plugins": {},
    });
    redis.cli(&["XADD", "q", "*", "v", "1", "sweep", &id, "index", "1", "job", &job.to_string()]);
    let plugin = serde_json::json!({
        "sweep": id, "index": 2, "total": 3, "graph": std::fs::read_to_string(graph()).unwrap(),
        "graph_name": "txt2img.ron", "graph_dir": repo().join("graphs"), "sets": [["width", "64"], ["height", "64"], ["steps", "2"]],
        "plugins": {"mine.lua": "0000"},
    });
    redis.cli(&["XADD", "q", "*", "v", "1", "sweep", &id, "index", "2", "job", &plugin.to_string()]);
    let w = worker(&d, &url, "w", &["--max-jobs", "8"]);
    let s = wait_done(&d, &url, &id, 60);
    let out = finish(w, 30);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("stopped after 8 jobs"), "{}", stdout(&out));
    let dead = redis.cli(&["XRANGE", "q:dead", "-", "+"]);
    assert_eq!(redis.cli(&["XLEN", "q:dead"]).trim(), "5", "{dead}");
    for error in ["not valid JSON", "format version \"2\"", "no field \"v\"", "NoSuchNode", "plugin mine.lua is not loaded here"] {
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
