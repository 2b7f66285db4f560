//! Assembles the test guests with GNU as/ld into flat images at their link
//! address; `ch-testguest` wraps them into ELF files at run time.

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let src = "guest/memconv.S";
    println!("cargo:rerun-if-changed={src}");
    let obj = out.join("memconv.o");
    let bin = out.join("memconv.bin");
    run(Command::new("as").args(["--64", "-o"]).arg(&obj).arg(src));
    run(Command::new("ld")
        .args([
            "-m",
            "elf_x86_64",
            "-static",
            "-nostdlib",
            "-e",
            "_start",
            "-Ttext=0x100000",
            "--oformat",
            "binary",
            "-o",
        ])
        .arg(&bin)
        .arg(&obj));
}
