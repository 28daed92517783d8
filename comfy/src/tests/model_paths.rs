use super::*;

#[test]
fn sections_base_paths_multiline_and_defaults() {
    let text = "comfyui:\n    base_path: /srv/ComfyUI/\n    is_default: true\n    checkpoints: models/checkpoints/\n    loras: |\n        models/loras/\n        /abs/loras\n\
                a111:\n    base_path: ../webui\n    embeddings: embeddings\n    controlnet: models/ControlNet\nempty:\n";
    let entries = parse(Path::new("/etc/comfy/extra_model_paths.yaml"), text).unwrap();
    let e = |f: &str, d: &str, def: bool| (f.to_owned(), PathBuf::from(d), def);
    assert_eq!(
        entries,
        vec![
            e("checkpoints", "/srv/ComfyUI/models/checkpoints", true),
            e("loras", "/srv/ComfyUI/models/loras", true),
            e("loras", "/abs/loras", true),
            e("embeddings", "/etc/webui/embeddings", false),
            e("controlnet", "/etc/webui/models/ControlNet", false),
        ]
    );
    let mut folders = Folders::default();
    folders.add("checkpoints", "/first".into());
    apply(&mut folders, entries);
    let ck: Vec<&Path> = folders.dirs("checkpoints").collect();
    assert_eq!(ck, [Path::new("/srv/ComfyUI/models/checkpoints"), Path::new("/first")]);
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    let e = parse(Path::new("x.yaml"), "comfyui:\n  checkpoints: [1, 2]\n").unwrap_err().to_string();
    assert!(e.contains("x.yaml") && e.contains("checkpoints"), "{e}");
    assert!(parse(Path::new("x.yaml"), "- a\n- b\n").is_err());
}
