//! `diffloom serve` (issue 14) driven over real HTTP and WebSocket connections: every route the frontend
//! calls, a prompt queued and followed to its image, bad requests, the queue with cancel and interrupt,
//! and the guard (token, same origin, files confined to their directories).

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use crate::util::{tiny_sd1, Dir};

/// A server on a free port of 127.0.0.1, its runtime kept alive with it.
struct Server {
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl Server {
    fn start(d: &Dir, token: Option<&str>) -> Server {
        std::fs::create_dir_all(d.join("models/checkpoints/SD1.5")).unwrap();
        if !d.join("models/checkpoints/SD1.5/tiny-sd1.safetensors").exists() {
            tiny_sd1(d, "models/checkpoints/SD1.5/tiny-sd1.safetensors");
        }
        std::fs::create_dir_all(d.join("front")).unwrap();
        d.write("front/index.html", "<!doctype html><title>ComfyUI</title>");
        d.write("front/assets/app.js", "console.log(1)");
        let mut folders = diffloom_core::Folders { input_dir: d.join("input"), ..Default::default() };
        folders.add_models_dir(&d.join("models"));
        std::fs::create_dir_all(d.join("input")).unwrap();
        std::fs::create_dir_all(d.join("output")).unwrap();
        let config = diffloom_server::Config {
            folders,
            output_dir: d.join("output"),
            graphs_dir: d.path().to_path_buf(),
            user_dir: d.join("user"),
            frontend_root: Some(d.join("front")),
            token: token.map(str::to_owned),
            device: tch::Device::Cpu,
            dtype: None,
            cache_bytes: 1 << 30,
            registry: Arc::new(diffloom_nodes::registry),
            max_body: 1 << 20,
            preview_method: "none".to_owned(),
            queue: None,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(diffloom_server::serve(config, listener));
        Server { addr, _runtime: runtime }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn agent(&self) -> ureq::Agent {
        ureq::Agent::config_builder().http_status_as_error(false).build().into()
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut r = self.agent().get(&self.url(path)).call().unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default())
    }

    fn json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    fn post(&self, path: &str, body: &str) -> (u16, String) {
        let mut r = self.agent().post(&self.url(path)).header("Content-Type", "application/json").send(body).unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default())
    }

    fn ws(&self, client: &str) -> WebSocket<MaybeTlsStream<TcpStream>> {
        let (mut ws, _) = tungstenite::connect(format!("ws://{}/ws?clientId={client}", self.addr)).unwrap();
        if let MaybeTlsStream::Plain(s) = ws.get_mut() {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        }
        ws
    }
}

/// Text messages until one of type `until` (inclusive), as (type, data); binary frames (previews) are
/// listed as ("binary", their length).
pub(crate) fn messages_until(ws: &mut WebSocket<MaybeTlsStream<TcpStream>>, until: &str) -> Vec<(String, Value)> {
    messages_and_frames(ws, until, &mut Vec::new())
}

pub(crate) fn messages_and_frames(ws: &mut WebSocket<MaybeTlsStream<TcpStream>>, until: &str, frames: &mut Vec<Vec<u8>>) -> Vec<(String, Value)> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::new();
    while Instant::now() < deadline {
        match ws.read().unwrap() {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                let kind = v["type"].as_str().unwrap().to_owned();
                let done = kind == until;
                out.push((kind, v["data"].clone()));
                if done {
                    return out;
                }
            }
            Message::Binary(b) => {
                out.push(("binary".to_owned(), json!(b.len())));
                frames.push(b.to_vec());
            }
            _ => continue,
        }
    }
    panic!("no {until} message; got {out:?}");
}

pub(crate) fn api_prompt() -> Value {
    serde_json::from_str(&std::fs::read_to_string(crate::util::repo().join("tests/data/comfy/api.json")).unwrap()).unwrap()
}

#[test]
fn routes_answer_as_comfyui_answers_them() {
    let d = Dir::new();
    let s = Server::start(&d, None);
    let (status, html) = s.get("/");
    assert_eq!((status, html.contains("<title>ComfyUI")), (200, true));
    let r = s.agent().get(&s.url("/assets/app.js")).call().unwrap();
    assert!(r.headers().get("content-type").unwrap().to_str().unwrap().contains("javascript"));
    for prefix in ["", "/api"] {
        let info = s.json(&format!("{prefix}/object_info"));
        let k = &info["KSampler"];
        assert_eq!(k["input"]["required"]["seed"][0], "INT");
        assert_eq!(k["input"]["required"]["seed"][1]["control_after_generate"], true);
        assert_eq!(k["input_order"]["required"][0], "model");
        assert_eq!(k["output"], json!(["LATENT"]));
        assert_eq!(k["category"], "sampling");
        assert_eq!(info["CheckpointLoaderSimple"]["display_name"], "Load Checkpoint");
        assert!(info["ColorLevels"].is_null(), "no plugins in this registry");
        // File inputs list their folder's files, as ComfyUI's combos do.
        assert_eq!(info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0], json!(["SD1.5/tiny-sd1.safetensors"]));
        assert_eq!(info["LoadImage"]["input"]["required"]["image"][1]["image_upload"], true);
    }
    assert_eq!(s.json("/api/object_info/VAEDecode")["VAEDecode"]["output"], json!(["IMAGE"]));
    assert_eq!(s.json("/api/extensions"), json!([]));
    assert_eq!(s.json("/api/users"), json!({"storage": "server", "migrated": true}));
    assert!(s.json("/api/models").as_array().unwrap().contains(&json!("checkpoints")));
    assert_eq!(s.json("/api/models/checkpoints"), json!(["SD1.5/tiny-sd1.safetensors"]));
    assert!(s.json("/api/system_stats")["system"]["ram_total"].as_u64().unwrap() > 0);
    assert!(s.json("/api/features")["max_upload_size"].is_number());
    assert_eq!(s.json("/api/prompt")["exec_info"]["queue_remaining"], 0);
    std::fs::create_dir_all(d.join("models/embeddings")).unwrap();
    d.write("models/embeddings/EasyNegative.safetensors", "x");
    assert_eq!(s.json("/api/embeddings"), json!(["EasyNegative"]));
    let folders = s.json("/api/experiment/models");
    assert!(
        folders.as_array().unwrap().iter().any(|f| f["name"] == "checkpoints" && f["folders"][0].as_str().unwrap().ends_with("models/checkpoints")),
        "{folders}"
    );
    assert_eq!(s.json("/api/experiment/models/checkpoints"), json!([{"name": "SD1.5/tiny-sd1.safetensors", "pathIndex": 0}]));
    assert_eq!(s.json("/api/jobs"), json!({"jobs": [], "pagination": {"offset": 0, "limit": 0, "total": 0, "has_more": false}}));
    assert_eq!(s.get("/api/jobs/nope").0, 404);
    assert_eq!(s.post("/api/free", r#"{"unload_models": true}"#).0, 200);
    assert_eq!(s.json("/api/workflow_templates"), json!({}));
    assert_eq!(s.json("/api/queue"), json!({"queue_running": [], "queue_pending": []}));
    // Settings persist in the user directory.
    assert_eq!(s.post("/api/settings/Comfy.ColorPalette", "\"dark\"").0, 200);
    assert_eq!(s.post("/api/settings", r#"{"Comfy.Locale": "en"}"#).0, 200);
    assert_eq!(s.json("/api/settings/Comfy.ColorPalette"), "dark");
    let saved: Value = serde_json::from_slice(&std::fs::read(d.join("user/comfy.settings.json")).unwrap()).unwrap();
    assert_eq!(saved, json!({"Comfy.ColorPalette": "dark", "Comfy.Locale": "en"}));
}

#[test]
fn a_queued_prompt_reports_progress_and_its_image_is_served() {
    let d = Dir::new();
    let s = Server::start(&d, None);
    let mut ws = s.ws("tester");
    let greeting = messages_until(&mut ws, "status");
    assert_eq!(greeting[0].1["sid"], "tester");
    // The feature-flag exchange: this client takes previews with metadata.
    ws.send(Message::Text(json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}}).to_string().into())).unwrap();
    let flags = messages_until(&mut ws, "feature_flags");
    assert_eq!(flags.last().unwrap().1["supports_preview_metadata"], true);
    // Previews as the frontend asks for them (its preview method setting, in extra_data).
    let (status, body) = s.post("/prompt", &json!({"prompt": api_prompt(), "client_id": "tester", "extra_data": {"preview_method": "latent2rgb"}}).to_string());
    assert_eq!(status, 200, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["prompt_id"].as_str().unwrap().to_owned();
    let mut frames = Vec::new();
    let events = messages_and_frames(&mut ws, "execution_success", &mut frames);
    // One live preview per step: binary type 4, its metadata naming node and prompt, then a JPEG at the
    // latent's resolution (64×48 pixels → 8×6).
    assert_eq!(frames.len(), 4);
    for f in &frames {
        assert_eq!(f[..4], 4u32.to_be_bytes());
        let len = u32::from_be_bytes(f[4..8].try_into().unwrap()) as usize;
        let meta: Value = serde_json::from_slice(&f[8..8 + len]).unwrap();
        assert_eq!((meta["node_id"].as_str(), meta["prompt_id"].as_str(), meta["image_type"].as_str()), (Some("3"), Some(id.as_str()), Some("image/jpeg")));
        let preview = image::load_from_memory(&f[8 + len..]).unwrap();
        assert_eq!((preview.width(), preview.height()), (8, 6));
    }
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).filter(|k| *k != "status" && *k != "progress_state" && *k != "binary").collect();
    assert_eq!(kinds[..2], ["execution_start", "execution_cached"], "{kinds:?}");
    let executing: Vec<&str> = events.iter().filter(|(k, _)| k == "executing").map(|(_, d)| d["node"].as_str().unwrap()).collect();
    assert_eq!(executing, ["4", "5", "6", "7", "3", "8", "9"]);
    let progress: Vec<(u64, u64)> =
        events.iter().filter(|(k, _)| k == "progress").map(|(_, d)| (d["value"].as_u64().unwrap(), d["max"].as_u64().unwrap())).collect();
    assert_eq!(progress, [(1, 4), (2, 4), (3, 4), (4, 4)]);
    let executed = events.iter().find(|(k, _)| k == "executed").unwrap();
    assert_eq!(executed.1["node"], "9");
    let image = &executed.1["output"]["images"][0];
    assert_eq!(image["type"], "output");
    // The image served by /view is the one the CLI renders for the same workflow.
    let r = s.agent().get(&s.url(&format!("/view?filename={}&subfolder=&type=output", image["filename"].as_str().unwrap()))).call().unwrap();
    assert_eq!(r.headers().get("content-type").unwrap(), "image/png");
    let served = image::load_from_memory(&r.into_body().read_to_vec().unwrap()).unwrap().to_rgb8();
    d.write("api.json", api_prompt().to_string());
    let o = d.diffloom(&["run", "api.json", "--models", "models", "-o", "cli"]);
    assert!(o.status.success(), "{}", crate::util::stderr(&o));
    let cli = image::open(d.join("cli/wf_00001_.png")).unwrap().to_rgb8();
    assert_eq!(served.into_raw(), cli.into_raw());
    // History holds the outputs and the status; the same prompt again runs nothing (as in ComfyUI, the
    // save node's result is cached too).
    let history = s.json(&format!("/history/{id}"));
    assert_eq!(history[&id]["status"]["status_str"], "success");
    let jobs = s.json("/api/jobs?status=completed");
    assert_eq!(jobs["jobs"][0]["id"], id.as_str());
    assert_eq!(jobs["jobs"][0]["preview_output"]["filename"], image["filename"]);
    assert_eq!(s.json(&format!("/api/jobs/{id}"))["outputs"]["9"]["images"][0]["filename"], image["filename"]);
    assert_eq!(history[&id]["outputs"]["9"]["images"][0]["filename"], image["filename"]);
    s.post("/prompt", &json!({"prompt": api_prompt(), "client_id": "tester"}).to_string());
    let events = messages_until(&mut ws, "execution_success");
    let cached = events.iter().find(|(k, _)| k == "execution_cached").unwrap();
    assert_eq!(cached.1["nodes"], json!(["9"]));
    assert!(events.iter().all(|(k, d)| k != "executing" || d["node"].is_null()), "{events:?}");

    // With TAESD's decoder in vae_approx, the "taesd" preview method shows its images (8× the latent).
    crate::parity::run_reference("taesd_reference.py", &[d.path()]);
    std::fs::create_dir_all(d.join("models/vae_approx")).unwrap();
    std::fs::copy(d.join("taesd_decoder.safetensors"), d.join("models/vae_approx/taesd_decoder.safetensors")).unwrap();
    let mut p = api_prompt();
    p["3"]["inputs"]["seed"] = json!(43);
    s.post("/prompt", &json!({"prompt": p, "client_id": "tester", "extra_data": {"preview_method": "taesd"}}).to_string());
    let mut frames = Vec::new();
    messages_and_frames(&mut ws, "execution_success", &mut frames);
    assert_eq!(frames.len(), 4);
    for f in &frames {
        let len = u32::from_be_bytes(f[4..8].try_into().unwrap()) as usize;
        let preview = image::load_from_memory(&f[8 + len..]).unwrap();
        assert_eq!((preview.width(), preview.height()), (64, 48));
    }
}

#[test]
fn an_unmodified_comfyui_api_client_from_pypi_gets_the_image() {
    let d = Dir::new();
    let s = Server::start(&d, None);
    d.write("api.json", api_prompt().to_string());
    crate::parity::run_reference("comfy_api_client.py", &[Path::new(&s.url("")), &d.join("api.json"), Path::new("Save Image"), &d.join("client.png")]);
    let o = d.diffloom(&["run", "api.json", "--models", "models", "-o", "cli"]);
    assert!(o.status.success(), "{}", crate::util::stderr(&o));
    let got = image::open(d.join("client.png")).unwrap().to_rgb8().into_raw();
    let want = image::open(d.join("cli/wf_00001_.png")).unwrap().to_rgb8().into_raw();
    assert_eq!(got, want);
}

#[test]
fn bad_requests_get_comfyui_errors_and_the_server_lives_on() {
    let d = Dir::new();
    let s = Server::start(&d, None);
    let mut bad = api_prompt();
    bad["3"]["inputs"]["steps"] = json!(100000);
    bad["3"]["inputs"]["sampler_name"] = json!("eulr");
    let (status, body) = s.post("/api/prompt", &json!({"prompt": bad}).to_string());
    assert_eq!(status, 400);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
    let errors = body["node_errors"]["3"]["errors"].as_array().unwrap();
    let kinds: Vec<(&str, &str)> = errors.iter().map(|e| (e["type"].as_str().unwrap(), e["extra_info"]["input_name"].as_str().unwrap())).collect();
    assert_eq!(kinds, [("value_bigger_than_max", "steps"), ("value_not_in_list", "sampler_name")]);
    assert_eq!(body["node_errors"]["3"]["class_type"], "KSampler");
    let mut unknown = api_prompt();
    unknown["3"]["class_type"] = json!("KSamplerFancy");
    let (status, body) = s.post("/api/prompt", &json!({"prompt": unknown}).to_string());
    assert_eq!(status, 400);
    assert!(body.contains("KSamplerFancy"), "{body}");
    assert_eq!(s.post("/api/prompt", "{not json").0, 400);
    let (status, body) = s.post("/api/prompt", "{}");
    assert_eq!(status, 400);
    assert!(body.contains("no_prompt"));
    // An oversized body is refused with 413; the server may close the connection before the client has
    // sent it all, which the client sees as a broken pipe instead.
    let huge = format!("{{\"prompt\": \"{}\"}}", "x".repeat(2 << 20));
    match s.agent().post(&s.url("/api/prompt")).header("Content-Type", "application/json").send(&huge) {
        Ok(r) => assert_eq!(r.status().as_u16(), 413),
        Err(ureq::Error::Io(e)) => assert!(matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset), "{e}"),
        Err(e) => panic!("{e}"),
    }
    assert_eq!(s.post("/api/queue", "[1, 2]").0, 400);
    assert_eq!(s.get("/api/object_info").0, 200, "still serving");
}

#[test]
fn queued_prompts_can_be_cancelled_and_the_running_one_interrupted() {
    let d = Dir::new();
    let s = Server::start(&d, None);
    let mut ws = s.ws("q");
    messages_until(&mut ws, "status");
    let slow = |seed: u64| {
        let mut p = api_prompt();
        p["3"]["inputs"]["seed"] = json!(seed);
        p["3"]["inputs"]["steps"] = json!(400);
        p["5"]["inputs"]["width"] = json!(256);
        p["5"]["inputs"]["height"] = json!(256);
        let (status, body) = s.post("/prompt", &json!({"prompt": p, "client_id": "q"}).to_string());
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["prompt_id"].as_str().unwrap().to_owned()
    };
    let (first, second, third) = (slow(1), slow(2), slow(3));
    // The first is running once progress arrives; the third is cancelled while it waits.
    messages_until(&mut ws, "progress");
    let queue = s.json("/api/queue");
    assert_eq!(queue["queue_running"][0][1], first);
    assert_eq!(queue["queue_pending"].as_array().unwrap().len(), 2);
    assert_eq!(s.post("/api/queue", &json!({"delete": [third]}).to_string()).0, 200);
    assert_eq!(s.json("/api/queue")["queue_pending"][0][1], second);
    // Interrupting another prompt's id leaves the running one alone; its own id stops it.
    assert_eq!(s.post("/api/interrupt", &json!({"prompt_id": third}).to_string()).0, 200);
    assert_eq!(s.post("/api/interrupt", &json!({"prompt_id": first}).to_string()).0, 200);
    let events = messages_until(&mut ws, "execution_interrupted");
    assert_eq!(events.last().unwrap().1["prompt_id"], first);
    messages_until(&mut ws, "progress");
    assert_eq!(s.post("/api/interrupt", "").0, 200);
    let events = messages_until(&mut ws, "execution_interrupted");
    assert_eq!(events.last().unwrap().1["prompt_id"], second);
    let history = s.json("/api/history");
    assert_eq!(history[&first]["status"]["status_str"], "error");
    assert!(history.get(&third).is_none(), "the cancelled prompt never ran");
    assert_eq!(s.post("/api/history", &json!({"clear": true}).to_string()).0, 200);
    assert_eq!(s.json("/api/history"), json!({}));
}

#[test]
fn files_stay_in_their_directories_and_the_token_guards_every_route() {
    let d = Dir::new();
    d.write("secret.txt", "secret");
    d.write("output/page.html", "<script>alert(1)</script>");
    let s = Server::start(&d, None);
    for bad in ["filename=../secret.txt", "filename=secret.txt&subfolder=..", "filename=/etc/passwd", "filename=x.png&type=elsewhere"] {
        let (status, body) = s.get(&format!("/view?{bad}"));
        assert!(status == 403 || status == 400, "{bad}: {status} {body}");
        assert!(!body.contains("secret"));
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(d.join("secret.txt"), d.join("output/link.png")).unwrap();
        assert_eq!(s.get("/view?filename=link.png").0, 403);
    }
    // HTML from a user directory is never served inline.
    let r = s.agent().get(&s.url("/view?filename=page.html")).call().unwrap();
    assert_eq!(r.headers().get("content-type").unwrap(), "application/octet-stream");
    assert!(r.headers().get("content-disposition").unwrap().to_str().unwrap().starts_with("attachment"));
    // Uploads: images only, names kept inside the input directory, an existing file never replaced.
    let upload = |name: &str, bytes: &[u8], sub: &str| -> (u16, String) {
        let boundary = "XyZ";
        let mut body = Vec::new();
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"subfolder\"\r\n\r\n{sub}\r\n").as_bytes());
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        // 0: the server closed the connection before the body was sent (an oversized upload).
        match s.agent().post(&s.url("/api/upload/image")).header("Content-Type", format!("multipart/form-data; boundary={boundary}")).send(&body[..]) {
            Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    };
    let png = std::fs::read(d.png("p.png", 4, 4, 1)).unwrap();
    let (status, body) = upload("a.png", &png, "clipspace");
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({"name": "a.png", "subfolder": "clipspace", "type": "input"}));
    assert_eq!(std::fs::read(d.join("input/clipspace/a.png")).unwrap(), png);
    let other = std::fs::read(d.png("q.png", 4, 4, 2)).unwrap();
    let (_, body) = upload("a.png", &other, "clipspace");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["name"], "a (1).png");
    assert_eq!(std::fs::read(d.join("input/clipspace/a.png")).unwrap(), png, "never overwritten");
    // A mask upload puts the mask's alpha into the original image (ComfyUI's /upload/mask).
    let mask = {
        let img = image::RgbaImage::from_fn(4, 4, |x, y| image::Rgba([0, 0, 0, if x < 2 { 0 } else { 255 - y as u8 }]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let boundary = "MaSk";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"original_ref\"\r\n\r\n{}\r\n",
            json!({"filename": "a.png", "subfolder": "clipspace", "type": "input"})
        )
        .as_bytes(),
    );
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"subfolder\"\r\n\r\nclipspace\r\n").as_bytes());
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a-mask.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(&mask);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut r = s.agent().post(&s.url("/upload/mask")).header("Content-Type", format!("multipart/form-data; boundary={boundary}")).send(&body[..]).unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.body_mut().read_to_string().unwrap());
    let merged = image::open(d.join("input/clipspace/a-mask.png")).unwrap().to_rgba8();
    let original = image::open(d.join("input/clipspace/a.png")).unwrap().to_rgba8();
    for (x, y, p) in merged.enumerate_pixels() {
        let o = original.get_pixel(x, y);
        assert_eq!(p.0, [o[0], o[1], o[2], if x < 2 { 0 } else { 255 - y as u8 }]);
    }
    assert_eq!(upload("../../evil.png", &png, "").0, 403);
    assert_eq!(upload("x.png", &png, "../..").0, 403);
    assert_eq!(upload("x.html", b"<script>", "").0, 400);
    // Uploads over the size limit (1 MiB here) are refused (or the connection closed before the end).
    let big = vec![0u8; 2 << 20];
    let (status, body) = upload("big.png", &big, "");
    assert!(status == 413 || status == 0, "an oversized upload got {status}: {body}");
    assert!(!d.join("input/big.png").exists());
    assert!(!d.join("evil.png").exists() && !Path::new("/tmp/evil.png").exists());
    // In prompts, file names stay inside their folders: an absolute checkpoint path (of a file that
    // exists), an image name that climbs out of the input folder, a save prefix through a symbolic link.
    let run = |prompt: Value| -> Value {
        let (status, body) = s.post("/prompt", &json!({"prompt": prompt}).to_string());
        assert_eq!(status, 200, "{body}");
        let id = serde_json::from_str::<Value>(&body).unwrap()["prompt_id"].as_str().unwrap().to_owned();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let h = s.json(&format!("/history/{id}"));
            if let Some(entry) = h.get(&id) {
                return entry.clone();
            }
            assert!(Instant::now() < deadline, "prompt {id} never finished");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let failure = |entry: &Value| {
        entry["status"]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m[0] == "execution_error")
            .map(|m| m[1]["exception_message"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let mut absolute = api_prompt();
    absolute["4"]["inputs"]["ckpt_name"] = json!(d.join("models/checkpoints/SD1.5/tiny-sd1.safetensors").display().to_string());
    let e = failure(&run(absolute));
    assert!(e.contains("ckpt_name") && e.contains("not found"), "{e}");
    let climb = json!({"1": {"class_type": "LoadImage", "inputs": {"image": "../p.png"}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}});
    let e = failure(&run(climb));
    assert!(e.contains("p.png") && e.contains("not found"), "{e}");
    #[cfg(unix)]
    {
        std::fs::create_dir_all(d.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(d.join("elsewhere"), d.join("output/out")).unwrap();
        d.png("input/ok.png", 8, 8, 1);
        let through = json!({"1": {"class_type": "LoadImage", "inputs": {"image": "ok.png"}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "out/x"}}});
        let e = failure(&run(through));
        assert!(e.contains("leads outside the output folder"), "{e}");
        assert_eq!(std::fs::read_dir(d.join("elsewhere")).unwrap().count(), 0, "nothing written outside");
    }

    // Cross-site requests are refused.
    let r = s.agent().post(&s.url("/api/prompt")).header("Origin", "http://evil.example").send("{}").unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // With a token: nothing without it; a bearer header or the cookie that /?token= sets.
    let d2 = Dir::new();
    let t = Server::start(&d2, Some("s3cret"));
    assert_eq!(t.get("/api/object_info").0, 401);
    assert_eq!(t.get("/").0, 401);
    assert!(tungstenite::connect(format!("ws://{}/ws", t.addr)).is_err());
    let r = t.agent().get(&t.url("/api/queue")).header("Authorization", "Bearer s3cret").call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = t.agent().get(&t.url("/?token=s3cret")).call().unwrap();
    let cookie = r.headers().get("set-cookie").unwrap().to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let r = t.agent().get(&t.url("/api/queue")).header("Cookie", cookie.split(';').next().unwrap()).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(t.agent().get(&t.url("/api/queue")).header("Authorization", "Bearer wrong").call().unwrap().status().as_u16(), 401);
}

#[test]
fn the_workflow_sidebar_reads_and_writes_ron_graphs() {
    let d = Dir::new();
    let s = Server::start(&d, None);
    let ron = std::fs::read_to_string(crate::util::repo().join("graphs/txt2img.ron"))
        .unwrap()
        .replace("../models/test/tiny-sd1.safetensors", "SD1.5/tiny-sd1.safetensors");
    d.write("txt2img.ron", &ron);
    d.write("sub/other.ron", "(version: 2, nodes: {})");
    let listed = s.json("/api/userdata?dir=workflows&recurse=true&split=false&full_info=true");
    let paths: Vec<&str> = listed.as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["sub/other.json", "txt2img.json"]);
    assert!(listed[1]["size"].as_u64().unwrap() > 0);
    // Opening converts to UI JSON; the canvas moves a node and saves; the RON keeps ids, parameters,
    // the moved position, and the file's comments (as a graph note).
    let mut ui = s.json("/api/userdata/workflows%2Ftxt2img.json");
    let sampler = ui["nodes"].as_array_mut().unwrap().iter_mut().find(|n| n["type"] == "KSampler").unwrap();
    assert_eq!(sampler["properties"]["diffloom id"], "sampler");
    sampler["pos"] = json!([1234.0, 56.0]);
    let (status, body) = s.post("/api/userdata/workflows%2Ftxt2img.json?overwrite=true&full_info=true", &ui.to_string());
    assert_eq!(status, 200, "{body}");
    let (_, saved) = diffloom_core::graph::file::read(&d.join("txt2img.ron")).unwrap();
    let node = saved.nodes.get("sampler").unwrap();
    assert_eq!(node.canvas.pos, Some((1234.0, 56.0)));
    assert_eq!(saved.params.get("prompt"), diffloom_core::graph::file::parse(Path::new("x"), &ron).unwrap().params.get("prompt"));
    assert!(saved.notes.as_deref().unwrap_or("").contains("Text to image: the standard ComfyUI workflow"), "{:?}", saved.notes);
    // The saved graph runs from the CLI.
    let o = d.diffloom(&["run", "txt2img.ron", "--models", "models", "--set", "width=64", "--set", "height=64", "--set", "steps=2"]);
    assert!(o.status.success(), "{}", crate::util::stderr(&o));
    // Never over an existing graph when told not to; never outside the graphs directory.
    assert_eq!(s.post("/api/userdata/workflows%2Ftxt2img.json?overwrite=false", &ui.to_string()).0, 409);
    assert_eq!(s.post("/api/userdata/workflows%2F..%2F..%2Fescape.json", &ui.to_string()).0, 403);
    assert_eq!(s.get("/api/userdata/..%2Fsecret").0, 403);
    // Deleting from the canvas moves the graph to .trash/.
    let r = s.agent().delete(&s.url("/api/userdata/workflows%2Fsub%2Fother.json")).call().unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert!(!d.join("sub/other.ron").exists());
    assert_eq!(std::fs::read_dir(d.join(".trash")).unwrap().count(), 1);
    // Example graphs are templates.
    let index = s.json("/templates/index.json");
    assert_eq!(index[0]["templates"][0]["name"], "txt2img");
    assert!(s.json("/templates/txt2img.json")["nodes"].as_array().unwrap().len() > 5);
    // Other user data lives in the user directory.
    assert_eq!(s.post("/api/userdata/comfy.templates.json", "[]").0, 200);
    assert_eq!(s.json("/api/userdata/comfy.templates.json"), json!([]));
}

#[test]
fn the_serve_command_listens_on_loopback_and_refuses_other_addresses_without_a_token() {
    let d = Dir::new();
    let o = d.diffloom(&["serve", "--listen", "0.0.0.0", "--port", "0"]);
    assert!(!o.status.success() && crate::util::stderr(&o).contains("requires --token"), "{}", crate::util::stderr(&o));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_diffloom"))
        .args(["serve", "--port", &port.to_string(), "--graphs", "."])
        .current_dir(d.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let deadline = Instant::now() + Duration::from_secs(60);
    let stats = loop {
        match agent.get(&format!("http://127.0.0.1:{port}/api/system_stats")).call() {
            Ok(mut r) => break r.body_mut().read_to_string().unwrap(),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("diffloom serve did not answer: {e}"),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(stats.contains("comfyui_version"), "{stats}");
    assert_eq!(agent.get(&format!("http://127.0.0.1:{port}/api/users")).call().map(|r| r.status().as_u16()).ok(), None, "the server is gone");
}
