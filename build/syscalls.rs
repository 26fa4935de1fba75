//! The system call names of the target architecture, for naming a call the sandbox's filter
//! refused (`src/sandbox/filter.rs`): parsed from the kernel's `asm/unistd_64.h` (x86_64,
//! linux-libc-dev) into `OUT_DIR/syscall_names.rs`. Another architecture gets an empty table
//! (a refused call is then named by its number only).

use std::path::PathBuf;

pub fn generate() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("syscall_names.rs");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let header = (arch == "x86_64")
        .then(|| {
            [
                "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
                "/usr/include/asm/unistd_64.h",
            ]
            .into_iter()
            .find_map(|p| std::fs::read_to_string(p).ok().map(|t| (p, t)))
        })
        .flatten();
    let mut names: Vec<(i64, String)> = Vec::new();
    if let Some((path, text)) = header {
        println!("cargo:rerun-if-changed={path}");
        for line in text.lines() {
            let mut w = line.split_whitespace();
            if let (Some("#define"), Some(name), Some(nr)) = (w.next(), w.next(), w.next()) {
                if let (Some(name), Ok(nr)) = (name.strip_prefix("__NR_"), nr.parse::<i64>()) {
                    names.push((nr, name.to_owned()));
                }
            }
        }
    }
    names.sort();
    let mut src = String::from("/// `(number, name)` of every system call, by number.\npub const SYSCALL_NAMES: &[(i64, &str)] = &[\n");
    for (nr, name) in &names {
        src.push_str(&format!("    ({nr}, {name:?}),\n"));
    }
    src.push_str("];\n");
    std::fs::write(&out, src).expect("write syscall_names.rs");
}
