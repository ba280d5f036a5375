//! The README's "What to try", run as a newcomer would: every command of the section, in
//! order, against the shipped examples on the ports the README names (8080, 15010, 15101), with
//! `trellis up` lines started in the background (the previous mesh stopped first, with
//! SIGINT, as the README says). Each command must succeed, and the working tree must be left
//! as it was (`git status`): nothing the README asks for edits a tracked file.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::mesh::Up;
use support::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

/// The shell lines of the ```sh blocks of the section titled `title`.
fn commands(readme: &str, title: &str) -> Vec<String> {
    let start = readme.find(&format!("## {title}\n")).unwrap_or_else(|| panic!("README has no '## {title}'"));
    let rest = &readme[start + 4..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut out = Vec::new();
    let mut in_block = false;
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        let line = line.trim();
        if in_block && !line.is_empty() && !line.starts_with('#') {
            out.push(line.to_string());
        }
    }
    out
}

fn git_status(root: &Path) -> String {
    let out = Command::new("git").args(["status", "--porcelain"]).current_dir(root).output().expect("git");
    assert!(out.status.success(), "git status: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_what_to_try_runs_in_order_and_leaves_the_tree_clean() {
    mesh::demo_bin_present();
    let root = repo();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let before = git_status(&root);
    let trellis = trellis_bin();
    let state_home = tempfile::tempdir().expect("state home");

    // "With the demo mesh running": the Set up section's `trellis up`.
    let setup = commands(&readme, "Set up");
    let demo = setup
        .iter()
        .find_map(|l| l.split("&& ").find(|c| c.starts_with("target/release/trellis up ")))
        .expect("Set up runs `trellis up`")
        .to_string();
    let mut lines = vec![demo];
    // A placeholder path (`my-istio-manifests/`) stands for the reader's own files: not runnable.
    lines.extend(commands(&readme, "What to try").into_iter().filter(|l| !l.contains("my-istio-manifests")));
    assert!(lines.len() >= 10, "{lines:?}");

    let mut mesh: Option<Up> = None;
    let mut applied_all_green = false;
    for line in &lines {
        let cmd = line.replace("target/release/trellis", trellis);
        if let Some(args) = cmd.strip_prefix(&format!("{trellis} up ")) {
            // Stop the previous mesh (Ctrl-C), then start this one and wait until it is ready.
            if let Some(up) = mesh.take() {
                up.interrupt();
                drop(up);
            }
            let state = tempfile::TempDir::new_in(state_home.path()).expect("home");
            let mut up = Up::spawn_readme(state, &root, args.trim());
            up.wait_ready().await;
            println!("$ {line}\n(mesh ready)");
            mesh = Some(up);
            continue;
        }
        let home = mesh.as_ref().map(|m| m.state_home.path().to_path_buf()).unwrap_or_else(|| state_home.path().into());
        let out = Command::new("bash")
            .args(["-o", "pipefail", "-c", &cmd])
            .current_dir(&root)
            .env("XDG_STATE_HOME", &home)
            .output()
            .expect("bash");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("$ {line}\n{}", stdout.chars().take(600).collect::<String>());
        assert!(out.status.success(), "`{line}` failed ({}):\n{stdout}\n{stderr}", out.status);
        if applied_all_green && line.starts_with("curl") {
            assert!(stdout.contains("\"color\":\"green\""), "after the all-green step: {stdout}");
            applied_all_green = false;
        }
        if line.contains("apply -f") && line.contains("all-green") {
            applied_all_green = true;
        }
    }
    if let Some(up) = mesh.take() {
        up.interrupt();
        drop(up);
    }
    assert_eq!(git_status(&root), before, "the README's commands changed the working tree");
}
