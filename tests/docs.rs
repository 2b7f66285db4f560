//! The docs run as written: every `sh` block of README.md and
//! docs/user-guide.md, in order, in one bash shell per document, against
//! the binaries this build made. Three rewrites only: `cargo build` is
//! already done, `target/release` is this build's binary directory, and
//! `/tmp/` is a directory of this test (so runs cannot collide).

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The `sh` blocks of a markdown file, except the one that runs this suite.
fn shell_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                if !block.contains("scripts/test.sh") {
                    blocks.push(std::mem::take(block));
                }
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

fn script(markdown: &str, bin_dir: &Path, tmp: &Path) -> String {
    let bin = bin_dir.display().to_string();
    let mut text = String::from("set -euo pipefail\n");
    for block in shell_blocks(markdown) {
        // `/tmp/` first: the binaries' own path may lie under /tmp (a
        // checkout there) and must not be rewritten with it.
        let block = block
            .replace("cargo build --release --workspace && ", "")
            .replace("cargo build --release --workspace\n", "")
            .replace("/tmp/", &format!("{}/", tmp.display()))
            .replace("$PWD/target/release", &bin)
            .replace("./target/release", &bin);
        text.push_str(&block);
    }
    text
}

/// Runs `script` in bash in its own process group (killed at the end,
/// whatever the script left behind); returns (success, stdout, stderr).
fn run(script: &str, dir: &TempDir, timeout: Duration) -> (bool, String, String) {
    let path = dir.path("doc.sh");
    std::fs::write(&path, script).unwrap();
    let stdout = dir.path("doc.out");
    let stderr = dir.path("doc.err");
    let mut child = Command::new("bash")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: signals the process group this test created.
    unsafe { libc::kill(-child.id().cast_signed(), libc::SIGKILL) };
    let _ = child.wait();
    let read = |p| std::fs::read_to_string(p).unwrap_or_default();
    let (out, err) = (read(&stdout), read(&stderr));
    assert!(status.is_some(), "timed out:\n{out}\n{err}");
    (status.unwrap().success(), out, err)
}

fn bin_dir() -> &'static Path {
    Path::new(CLOUD_HYPERVISOR).parent().unwrap()
}

/// Runs the shell blocks of the document `name` (its Markdown `doc`) in
/// `dir`, within `timeout`; fails with the script and its output unless
/// it succeeds, else returns its stdout and stderr.
fn runs_as_written(name: &str, doc: &str, dir: &TempDir, timeout: Duration) -> (String, String) {
    let tmp = dir.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let text = script(doc, bin_dir(), &tmp);
    let (ok, out, err) = run(&text, dir, timeout);
    assert!(ok, "{name} failed:\n{text}\nstdout:\n{out}\nstderr:\n{err}");
    (out, err)
}

#[test]
fn the_readme_runs_as_written() {
    let dir = kvm_test!("doc-readme");
    let (out, _) = runs_as_written("README", include_str!("../README.md"), &dir, TIMEOUT * 2);
    // The first block's guest powered off after its ops; the second's
    // device was given exactly the guest's shared pages.
    assert!(out.contains("memconv: done 3 ok 1 failed"), "{out}");
    assert!(out.contains("\"bdf\":\"0000:00:01.0\""), "{out}");
    assert!(
        out.contains("[[16777216,4096],[16785408,8192]]"),
        "the device's maps: {out}"
    );
    assert!(out.contains("\"num_pci_segments\":1"), "{out}");
}

#[test]
fn the_user_guide_runs_as_written() {
    let dir = kvm_test!("doc-guide");
    let guide = include_str!("../docs/user-guide.md");
    let (out, err) = runs_as_written("user guide", guide, &dir, TIMEOUT * 3);
    // Section 1's guest, section 2's device maps, the DMA guest, section
    // 4's events, section 8's lifecycle states.
    for expected in [
        "memconv: done",
        "msix interrupts 2",
        "\"source\":\"memory\"",
        "\"event\":\"conversion\"",
        "Created\nRunning\n",
    ] {
        assert!(
            out.contains(expected),
            "{expected:?} missing:\n{out}\n{err}"
        );
    }
}

#[test]
fn shell_blocks_are_found_and_the_suite_itself_is_left_out() {
    let blocks =
        shell_blocks("a\n```sh\necho 1\n```\n```text\nno\n```\n```sh\n./scripts/test.sh\n```\n");
    assert_eq!(blocks, ["echo 1\n"]);
    let text = script(
        "```sh\ncargo build --release --workspace && ./target/release/x /tmp/a\n```\n",
        Path::new("/b"),
        Path::new("/t"),
    );
    assert_eq!(text, "set -euo pipefail\n/b/x /t/a\n");
}
