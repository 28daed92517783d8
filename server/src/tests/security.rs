use super::*;

#[test]
fn names_cannot_leave_their_directory() {
    let d = std::env::temp_dir().join(format!("diffloom-confine-{}", std::process::id()));
    std::fs::create_dir_all(d.join("out/sub")).unwrap();
    std::fs::write(d.join("secret.txt"), b"x").unwrap();
    let out = d.join("out");
    assert!(confine(&out, "sub", "a.png").is_some());
    assert!(confine(&out, "", "a.png").is_some());
    assert!(confine(&out, "..", "secret.txt").is_none());
    assert!(confine(&out, "", "../secret.txt").is_none());
    assert!(confine(&out, "/etc", "passwd").is_none());
    assert!(confine(&out, "", "/etc/passwd").is_none());
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(d.join("secret.txt"), out.join("link.txt")).unwrap();
        std::os::unix::fs::symlink(&d, out.join("up")).unwrap();
        assert!(confine(&out, "", "link.txt").is_none());
        assert!(confine(&out, "up", "secret.txt").is_none());
    }
    std::fs::remove_dir_all(&d).unwrap();
}
