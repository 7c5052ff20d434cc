//! The Python package (`python/`) from the workspace's one test command: makes a virtual environment under the
//! target directory (once), installs the package with its dev tools from PyPI (pip builds the extension module
//! `shmgrpc._core`, the crate `crates/shmgrpc-python`, with cargo through maturin, into this workspace's target
//! directory), and runs `ruff format --check`, `ruff check`, `mypy` and the pytest suite (unit tests, interop both
//! ways with this crate's `shmgrpc` binary, hostile references against both servers, `kill -9` of either side).
//! Needs `python3` (3.11 or later) with `venv`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(what: &str, cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn venv() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-venv");
    if !dir.join("bin/python").exists() {
        run("python3 -m venv", Command::new("python3").args(["-m", "venv"]).arg(&dir));
    }
    dir
}

#[test]
fn python_package_lint_types_and_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap();
    let python = root.join("python");
    let venv = venv();
    let bin = |name: &str| venv.join("bin").join(name);
    run(
        "pip install",
        Command::new(bin("python"))
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "-e"])
            .arg(format!("{}[dev]", python.display())),
    );
    run("ruff format --check", Command::new(bin("ruff")).args(["format", "--check", "."]).current_dir(&python));
    run("ruff check", Command::new(bin("ruff")).args(["check", "."]).current_dir(&python));
    run("mypy", Command::new(bin("mypy")).current_dir(&python));
    run(
        "pytest",
        Command::new(bin("pytest"))
            .args(["-q", "-p", "no:cacheprovider", "tests"])
            .current_dir(&python)
            .env("SHMGRPC_BIN", env!("CARGO_BIN_EXE_shmgrpc")),
    );
}
