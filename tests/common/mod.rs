//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// `../shared` beside the repository, when present. In CI (`BILLION_REQUIRE_SHARED=1`) its absence fails
/// the test instead of skipping it.
pub fn shared(sub: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("shared").join(sub);
    if dir.exists() {
        return Some(dir);
    }
    if std::env::var("BILLION_REQUIRE_SHARED").is_ok_and(|v| v == "1") {
        panic!("{} is required (BILLION_REQUIRE_SHARED=1) but missing", dir.display());
    }
    eprintln!("skipping: {} not found", dir.display());
    None
}

pub fn billion(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_billion")).args(args).output().expect("run billion")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
