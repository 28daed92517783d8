use super::*;

#[test]
fn names_stay_inside_their_folder() {
    assert_eq!(folder_relative("SD1.5\\dreamshaper_8.safetensors"), Path::new("SD1.5/dreamshaper_8.safetensors"));
    assert_eq!(folder_relative("../../etc/passwd"), Path::new("etc/passwd"));
    assert_eq!(folder_relative("/abs/x.pt"), Path::new("abs/x.pt"));
}

#[test]
fn models_then_working_dir_then_graph_dir() {
    let root = std::env::temp_dir().join(format!("diffloom-paths-{}", std::process::id()));
    let (a, b, g) = (root.join("a"), root.join("b"), root.join("g"));
    for d in [&a, &b, &g] {
        std::fs::create_dir_all(d.join("checkpoints/SD1.5")).unwrap();
    }
    std::fs::write(b.join("checkpoints/SD1.5/m.safetensors"), b"x").unwrap();
    std::fs::write(g.join("beside.safetensors"), b"x").unwrap();
    let mut folders = Folders::default();
    folders.add_models_dir(&a);
    folders.add_models_dir(&b);
    let loc = Locator { graph_dir: &g, folders: &folders, output_dir: &root };
    assert_eq!(loc.model("checkpoints", "ckpt_name", "SD1.5\\m.safetensors").unwrap(), b.join("checkpoints/SD1.5/m.safetensors"));
    assert_eq!(loc.model("checkpoints", "ckpt_name", "beside.safetensors").unwrap(), g.join("beside.safetensors"));
    let err = loc.model("checkpoints", "ckpt_name", "missing.safetensors").unwrap_err().to_string();
    assert!(err.contains("ckpt_name") && err.contains("missing.safetensors"), "{err}");
    assert!(err.contains(&a.join("checkpoints").display().to_string()) && err.contains(&b.join("checkpoints").display().to_string()), "{err}");
    assert!(err.contains("working directory") && err.contains(&g.display().to_string()), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn image_annotations_pick_the_directory() {
    let root = std::env::temp_dir().join(format!("diffloom-images-{}", std::process::id()));
    let folders = Folders { input_dir: root.join("in"), temp_dir: root.join("tmp"), models: Vec::new(), confined: false, content_keys: false };
    let out = root.join("out");
    std::fs::create_dir_all(folders.input_dir.join("clipspace")).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(folders.input_dir.join("clipspace/m.png"), b"x").unwrap();
    std::fs::write(out.join("o.png"), b"x").unwrap();
    let loc = Locator { graph_dir: &root, folders: &folders, output_dir: &out };
    assert_eq!(loc.image("image", "clipspace/m.png [input]").unwrap(), folders.input_dir.join("clipspace/m.png"));
    assert_eq!(loc.image("image", "clipspace/m.png").unwrap(), folders.input_dir.join("clipspace/m.png"));
    assert_eq!(loc.image("image", "o.png [output]").unwrap(), out.join("o.png"));
    assert!(loc.image("image", "o.png").is_err());
    std::fs::remove_dir_all(&root).unwrap();
}
