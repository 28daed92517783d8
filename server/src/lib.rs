//! diffloom-server: `diffloom serve`, ComfyUI's HTTP and WebSocket API over diffloom's executor, so
//! that ComfyUI's own web frontend and API clients drive diffloom.
//!
//! The HTTP side runs on tokio (axum); node registries are not `Send`, so two plain threads own one
//! each: the validator (checks posted prompts, builds `object_info`) and the executor thread (runs the
//! queue with one cache across prompts). They meet in [`queue::Shared`]. With `--queue` the prompts
//! run on queue workers instead ([`remote`]): a dispatcher thread takes the executor thread's place.

#![forbid(unsafe_code)]

mod messages;
pub mod object_info;
pub mod queue;
pub mod remote;
mod routes;
mod security;
mod userdata;
pub mod worker;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, RwLock};

use diffloom_core::{Folders, Registry};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use crate::queue::{QueueState, Shared};

/// Builds the node registry (built-ins and plugins) for a thread that needs one.
pub type RegistryFactory = Arc<dyn Fn() -> Registry + Send + Sync>;

/// What the server needs.
#[derive(Clone)]
pub struct Config {
    pub folders: Folders,
    pub output_dir: PathBuf,
    /// Where relative paths in posted prompts resolve (and the RON graphs the sidebar lists).
    pub graphs_dir: PathBuf,
    /// Settings and user data (ComfyUI's `user/default`).
    pub user_dir: PathBuf,
    /// The ComfyUI frontend's static files (`comfyui_frontend_package/static`), if any.
    pub frontend_root: Option<PathBuf>,
    /// Required on every request when set (`--token`).
    pub token: Option<String>,
    pub device: tch::Device,
    pub dtype: Option<tch::Kind>,
    pub cache_bytes: usize,
    pub registry: RegistryFactory,
    /// Largest accepted upload or request body, in bytes.
    pub max_body: usize,
    /// Live previews unless a prompt's `extra_data.preview_method` says otherwise: "none" (ComfyUI's
    /// default), "latent2rgb", or "taesd"/"auto" (TAESD when `vae_approx` holds its decoder, else the
    /// projection).
    pub preview_method: String,
    /// `--queue`: run prompts on the workers of this queue instead of here.
    pub queue: Option<remote::QueueConfig>,
}

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
}

/// Starts the threads and serves on `listener` until the process ends.
pub async fn serve(config: Config, listener: TcpListener) -> std::io::Result<()> {
    let running = start_threads(config, listener.local_addr()?)?;
    let app = routes::router(running.shared.clone());
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await
}

/// Starts the validator and executor (or dispatcher) threads.
pub fn start_threads(mut config: Config, addr: SocketAddr) -> std::io::Result<Running> {
    // Prompts come over HTTP: every file name stays inside its folder.
    config.folders.confined = true;
    let (events, _) = broadcast::channel(1024);
    let (validate_tx, validate_rx) = std::sync::mpsc::channel();
    let remote = match config.queue.clone() {
        Some(q) => Some(Arc::new(remote::Remote::connect(q).map_err(std::io::Error::other)?)),
        None => None,
    };
    let shared = Arc::new(Shared {
        config,
        state: Mutex::new(QueueState::default()),
        wake: Condvar::new(),
        events,
        cancel: Arc::new(AtomicBool::new(false)),
        object_info: RwLock::new(Arc::new(serde_json::Value::Object(Default::default()))),
        validator: Mutex::new(validate_tx),
        remote: remote.clone(),
    });
    let s = shared.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("validator".into()).spawn(move || worker::validator(s, validate_rx, ready_tx))?;
    // object_info is built from the registry before the first request is answered.
    let _ = ready_rx.recv();
    let s = shared.clone();
    match remote {
        Some(r) => std::thread::Builder::new().name("dispatcher".into()).spawn(move || remote::dispatcher(s, r))?,
        None => std::thread::Builder::new().name("executor".into()).spawn(move || worker::executor(s))?,
    };
    Ok(Running { addr, shared })
}
