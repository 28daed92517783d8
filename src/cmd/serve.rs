//! `diffloom serve`: ComfyUI's API and web frontend over diffloom (the `diffloom-server` crate).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use diffloom_core::Folders;

use crate::session;

pub struct Settings {
    pub listen: IpAddr,
    pub port: u16,
    pub folders: Folders,
    pub graphs: PathBuf,
    pub output_dir: PathBuf,
    pub user_dir: PathBuf,
    pub front_end_root: Option<PathBuf>,
    pub token: Option<String>,
    pub cache_bytes: usize,
    pub dtype: Option<tch::Kind>,
    pub preview_method: String,
    pub queue: Option<diffloom_server::remote::QueueConfig>,
}

/// The frontend package's static files: `$DIFFLOOM_FRONTEND_ROOT`, else the comfyui-frontend-package
/// in the `.venv` of the first ancestor of the executable that has one.
fn default_frontend() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DIFFLOOM_FRONTEND_ROOT") {
        return Some(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().ok()?;
    for dir in exe.ancestors().skip(1) {
        let lib = dir.join(".venv/lib");
        let Ok(entries) = std::fs::read_dir(&lib) else { continue };
        for e in entries.flatten() {
            let static_dir = e.path().join("site-packages/comfyui_frontend_package/static");
            if static_dir.join("index.html").is_file() {
                return Some(static_dir);
            }
        }
    }
    None
}

pub fn serve(s: Settings, device: Option<String>) -> Result<ExitCode> {
    if !s.listen.is_loopback() && s.token.is_none() {
        bail!("--listen {}: serving beyond this machine requires --token SECRET (every request must carry it)", s.listen);
    }
    let frontend = s.front_end_root.or_else(default_frontend);
    match &frontend {
        Some(f) if !f.join("index.html").is_file() => bail!("--front-end-root {}: no index.html there", f.display()),
        Some(_) => {}
        None => eprintln!("warning: no ComfyUI frontend found (scripts/setup.sh installs it); serving the API only"),
    }
    std::fs::create_dir_all(&s.output_dir).with_context(|| format!("{}: cannot create the output directory", s.output_dir.display()))?;
    std::fs::create_dir_all(&s.folders.input_dir).with_context(|| format!("{}: cannot create the input directory", s.folders.input_dir.display()))?;
    let config = diffloom_server::Config {
        folders: s.folders,
        output_dir: s.output_dir,
        graphs_dir: s.graphs,
        user_dir: s.user_dir,
        frontend_root: frontend,
        token: s.token,
        device: session::device(device.as_deref())?,
        dtype: s.dtype,
        cache_bytes: s.cache_bytes,
        registry: Arc::new(session::registry),
        max_body: 100 << 20,
        preview_method: s.preview_method,
        queue: s.queue,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((s.listen, s.port)).await.with_context(|| format!("cannot listen on {}:{}", s.listen, s.port))?;
        eprintln!("diffloom serve: http://{}", listener.local_addr()?);
        diffloom_server::serve(config, listener).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
