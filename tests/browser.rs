//! The real ComfyUI frontend (PyPI `comfyui-frontend-package`, pinned) in headless Chromium (Debian's
//! `chromium` and `chromedriver`, installed by the set-up) against `diffloom serve`: the page loads with
//! no error, the node library holds diffloom's nodes (a Lua plugin's included), a RON graph opens from
//! the workflows sidebar's route, Queue runs it through the frontend's own prompt builder, progress
//! arrives and the image shows in the output node.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{repo, tiny_sd1, Dir};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn frontend_root() -> PathBuf {
    let out = Command::new(crate::parity::python())
        .args(["-c", "import comfyui_frontend_package as f, os; print(os.path.join(os.path.dirname(f.__file__), 'static'))"])
        .output()
        .unwrap();
    assert!(out.status.success(), "comfyui-frontend-package is missing: run scripts/setup.sh");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `script` (an async function body) in the page and returns its value.
async fn eval(c: &fantoccini::Client, script: &str) -> Value {
    let wrapped =
        format!("const done = arguments[arguments.length - 1]; (async () => {{ {script} }})().then(done, e => done({{error: String(e && e.stack || e)}}));");
    c.execute_async(&wrapped, vec![]).await.unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

async fn wait_for(c: &fantoccini::Client, what: &str, script: &str, seconds: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let v = eval(c, script).await;
        if v.get("error").is_none() && !v.is_null() && v != json!(false) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last: {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[test]
fn the_comfyui_frontend_opens_queues_and_shows_a_graph_run_by_diffloom() {
    assert!(
        std::path::Path::new("/usr/bin/chromedriver").exists(),
        "chromedriver is missing: run scripts/setup.sh (it installs Debian's chromium and chromium-driver)"
    );
    let d = Dir::new();
    std::fs::create_dir_all(d.join("models/checkpoints")).unwrap();
    tiny_sd1(&d, "models/checkpoints/tiny-sd1.safetensors");
    std::fs::create_dir_all(d.join("graphs")).unwrap();
    let ron = std::fs::read_to_string(repo().join("graphs/txt2img.ron"))
        .unwrap()
        .replace("../models/test/tiny-sd1.safetensors", "tiny-sd1.safetensors")
        .replace("\"steps\": 20", "\"steps\": 3")
        .replace("\"width\": 512", "\"width\": 64")
        .replace("\"height\": 512", "\"height\": 64");
    d.write("graphs/txt2img.ron", ron);

    let mut folders = diffloom_core::Folders { input_dir: d.join("input"), ..Default::default() };
    folders.add_models_dir(&d.join("models"));
    let plugins = repo().join("plugins/lua");
    let config = diffloom_server::Config {
        folders,
        output_dir: d.join("output"),
        graphs_dir: d.join("graphs"),
        user_dir: d.join("user"),
        frontend_root: Some(frontend_root()),
        token: None,
        device: tch::Device::Cpu,
        dtype: None,
        cache_bytes: 1 << 30,
        registry: Arc::new(move || {
            let mut r = diffloom_nodes::registry();
            let errors = diffloom_plugins::load_plugins(std::slice::from_ref(&plugins), &mut r);
            assert!(errors.is_empty(), "{errors:?}");
            r
        }),
        max_body: 100 << 20,
        preview_method: "none".to_owned(),
        queue: None,
    };
    for dir in ["input", "output"] {
        std::fs::create_dir_all(d.join(dir)).unwrap();
    }
    // A returning user: the first-run template browser stays closed,
    // and previews on (the frontend's preview method setting, sent with each prompt).
    d.write("user/comfy.settings.json", r#"{"Comfy.TutorialCompleted": true, "Comfy.Execution.PreviewMethod": "latent2rgb"}"#);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(diffloom_server::serve(config, listener));

    let port = free_port();
    let _driver = Kill(Command::new("/usr/bin/chromedriver").arg(format!("--port={port}")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let profile = d.join("chrome-profile");
    runtime.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": "/usr/bin/chromium", "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1400,900", format!("--user-data-dir={}", profile.display())]}),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let c = loop {
            match fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new()).capabilities(caps.clone()).connect(&format!("http://127.0.0.1:{port}")).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("chromedriver: {e}"),
            }
        };
        c.goto(&format!("http://{addr}/")).await.unwrap();
        // The app is up when its graph and the node definitions are.
        wait_for(&c, "the app", "return !!(window.app && window.app.graph && window.LiteGraph && Object.keys(LiteGraph.registered_node_types).length > 50);", 60).await;
        // The node library: built-ins and a Lua plugin's node, from /object_info.
        let types = eval(&c, "return ['KSampler', 'CheckpointLoaderSimple', 'ColorLevels', 'SamplerCustomAdvanced'].filter(t => !LiteGraph.registered_node_types[t]);").await;
        assert_eq!(types, json!([]), "node types the frontend does not know");
        // No error dialog or toast.
        let errors = eval(&c, "return [...document.querySelectorAll('.p-toast-message-error, .comfy-error-report, [role=dialog] .p-message-error')].map(e => e.innerText);").await;
        assert_eq!(errors, json!([]), "errors on the page");

        // Open the RON graph as the workflows sidebar does, then queue it with the frontend's own
        // prompt builder, following the progress and output events.
        let opened = eval(
            &c,
            "const r = await fetch('/api/userdata/workflows%2Ftxt2img.json'); const wf = await r.json();
             await app.loadGraphData(wf);
             window.__events = [];
             for (const t of ['execution_start', 'progress', 'executed', 'execution_success', 'execution_error', 'b_preview', 'b_preview_with_metadata']) {
                 app.api.addEventListener(t, e => window.__events.push([t, e.detail]));
             }
             return app.graph.nodes.map(n => n.type).sort();",
        )
        .await;
        let types: Vec<&str> = opened.as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        for t in ["CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage", "PrimitiveNode"] {
            assert!(types.contains(&t), "{t} missing from the opened graph: {types:?}");
        }
        let queued = eval(&c, "await app.queuePrompt(0, 1); return true;").await;
        assert_eq!(queued, json!(true), "{queued}");
        let events = wait_for(&c, "the run", "return window.__events.some(e => e[0] === 'execution_success' || e[0] === 'execution_error') && window.__events;", 120).await;
        let kinds: Vec<&str> = events.as_array().unwrap().iter().map(|e| e[0].as_str().unwrap()).collect();
        assert!(!kinds.contains(&"execution_error"), "{events}");
        assert_eq!(kinds.iter().filter(|k| **k == "progress").count(), 3, "{kinds:?}");
        // Live previews arrive as binary frames the frontend decodes (with metadata, as it asked).
        assert!(kinds.iter().filter(|k| k.starts_with("b_preview")).count() >= 3, "{kinds:?}");
        // The image shows in the SaveImage node, loaded from /view.
        let shown = wait_for(
            &c,
            "the image in the output node",
            "const n = app.graph.nodes.find(n => n.type === 'SaveImage'); return n && n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth > 0 && n.imgs[0].src;",
            30,
        )
        .await;
        assert!(shown.as_str().unwrap().contains("/view?"), "{shown}");
        if let Ok(path) = std::env::var("DIFFLOOM_SCREENSHOT") {
            eval(&c, "try { await app.extensionManager.command.execute('Comfy.Canvas.FitView'); } catch (e) {} await new Promise(r => setTimeout(r, 500)); return true;").await;
            std::fs::write(path, c.screenshot().await.unwrap()).unwrap();
        }
        // The PNG diffloom saved opens in the frontend as its workflow (dropped as a file): the same nodes
        // and values come back.
        let reopened = eval(
            &c,
            "const src = app.graph.nodes.find(n => n.type === 'SaveImage').imgs[0].src;
             const blob = await (await fetch(src)).blob();
             app.graph.clear();
             await app.handleFile(new File([blob], 'diffloom.png', {type: 'image/png'}));
             await new Promise(r => setTimeout(r, 500));
             const k = app.graph.nodes.find(n => n.type === 'KSampler');
             return {types: app.graph.nodes.map(n => n.type).sort(), steps: k && k.widgets.find(w => w.name === 'steps').value};",
        )
        .await;
        let types: Vec<&str> = reopened["types"].as_array().unwrap_or_else(|| panic!("{reopened}")).iter().map(|t| t.as_str().unwrap()).collect();
        for t in ["CheckpointLoaderSimple", "KSampler", "VAEDecode", "SaveImage"] {
            assert!(types.contains(&t), "{t} missing from the workflow read back from the PNG: {reopened}");
        }
        assert_eq!(reopened["steps"], 3, "{reopened}");
        c.close().await.unwrap();
    });
    assert_eq!(d.files("output").len(), 1, "one image written");
}
