//! The `rbdback` command line as an operator meets it: every subcommand's `--help`, refused
//! unknown or malformed options (exit code 2, a message naming the option), `--version`, and
//! the man pages and completions generated at build time.

use std::process::{Command, Output};

fn rbdback(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rbdback"))
        .args(args)
        .env_remove("RBDBACK_LOG_FORMAT")
        .env_remove("RUST_LOG")
        .output()
        .expect("run rbdback")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Each subcommand and words its help must carry (its options, as docs/ describe them).
const HELP: &[(&str, &[&str])] = &[
    (
        "serve",
        &[
            "--domid",
            "--kind",
            "--backend-domid",
            "--stay",
            "blkfront",
            "--no-sandbox",
            "--sandbox-user",
            "--sandbox-uid-base",
            "Landlock",
        ],
    ),
    (
        "supervise",
        &[
            "--kind",
            "--backend-domid",
            "rbdback serve --domid N",
            "--no-sandbox",
            "--sandbox-uid-base",
            "SIGSYS",
        ],
    ),
    (
        "csi",
        &[
            "--node-id",
            "--endpoint",
            "unix:///var/lib/kubelet/plugins/rbd.csi.ceph.com/csi.sock",
            "--driver-name",
            "--state-dir",
            "--ceph-conf",
            "--clusters",
            "--no-supervise",
            "--metrics-listen",
        ],
    ),
    (
        "demo",
        &[
            "--ceph-conf",
            "--requests",
            "--qd",
            "--queues",
            "--writes",
            "--span-mib",
            "--bench-image",
            "--bs-kib",
            "--seq",
            "--in-process",
            "--no-sandbox",
        ],
    ),
    (
        "ring-demo",
        &["--abi", "x86_32-abi", "--order", "--requests"],
    ),
    ("soak", &["--minutes", "--fault-every"]),
    (
        "engine-bench",
        &[
            "--image",
            "--ceph-conf",
            "--engine",
            "librbd",
            "--rw",
            "randwrite",
            "--bs",
            "--qd",
            "--seconds",
            "--span-mib",
        ],
    ),
    ("completions", &["bash", "zsh", "fish"]),
    ("man", &["--out-dir"]),
];

#[test]
fn every_subcommand_has_help_with_its_options() {
    for (sub, words) in HELP {
        let o = rbdback(&[sub, "--help"]);
        assert!(o.status.success(), "{sub} --help: {o:?}");
        let text = stdout(&o);
        for w in *words {
            assert!(text.contains(w), "{sub} --help lacks {w:?}:\n{text}");
        }
        assert!(text.contains("--log-format"), "{sub} --help: {text}");
    }
}

#[test]
fn top_level_help_lists_every_subcommand() {
    let o = rbdback(&["--help"]);
    assert!(o.status.success());
    let text = stdout(&o);
    for (sub, _) in HELP {
        assert!(
            text.contains(&format!("  {sub} ")),
            "--help lacks {sub}:\n{text}"
        );
    }
}

/// issue 15: the broker is no operator's command (no help line, no man page); a sandbox
/// user of root is refused by name.
#[test]
fn the_sandbox_options_are_checked_and_the_broker_is_hidden() {
    let o = rbdback(&["--help"]);
    assert!(!stdout(&o).contains("serve-broker"), "{}", stdout(&o));
    let o = rbdback(&["man", "serve-broker"]);
    assert_eq!(o.status.code(), Some(2));
    let dir = std::env::temp_dir().join(format!("rbdback-cli-sandbox-{}", std::process::id()));
    for (user, why) in [("0", "cannot be root"), ("x", "\"x\" is not a number")] {
        let o = rbdback(&[
            "--run-dir",
            dir.to_str().unwrap(),
            "serve",
            "--domid",
            "3",
            "--sandbox-user",
            user,
        ]);
        assert_eq!(o.status.code(), Some(1), "{o:?}");
        let err = stderr(&o);
        assert!(err.contains("--sandbox-user") && err.contains(why), "{err}");
    }
    let o = rbdback(&[
        "serve",
        "--domid",
        "3",
        "--no-sandbox",
        "--sandbox-user",
        "5",
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_subcommand_is_refused_with_usage() {
    let o = rbdback(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("Usage: rbdback"), "{}", stderr(&o));
}

#[test]
fn unknown_option_is_refused_naming_it() {
    for (args, bad) in [
        (&["serve", "--domid", "3", "--bogus"][..], "--bogus"),
        (&["supervise", "--kidn", "vbd"], "--kidn"),
        (
            &["csi", "--node-id", "n1", "--no-superviser"],
            "--no-superviser",
        ),
        (
            &["engine-bench", "--image", "rbd/x", "--depth", "4"],
            "--depth",
        ),
        (&["serve", "--domid", "3", "extra"], "extra"),
        (&["frobnicate"], "frobnicate"),
    ] {
        let o = rbdback(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        let err = stderr(&o);
        assert!(
            err.contains(&format!("unexpected argument '{bad}'"))
                || err.contains(&format!("unrecognized subcommand '{bad}'")),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn malformed_values_are_refused() {
    for (args, names) in [
        (&["serve", "--domid", "seven"][..], "--domid"),
        (&["serve", "--domid", "70000"], "--domid"),
        (&["serve"], "--domid"),
        (&["supervise", "--backend-domid", "-1"], "-1"),
        (&["csi"], "--node-id"),
        (&["ring-demo", "--order", "5"], "--order"),
        (&["ring-demo", "--abi", "arm"], "--abi"),
        (
            &["engine-bench", "--image", "rbd/x", "--engine", "krbd"],
            "--engine",
        ),
        (&["demo", "--writes", "101"], "--writes"),
        (&["demo", "--seq"], "--bench-image"),
        (&["--log-format", "xml", "supervise"], "--log-format"),
        (&["completions", "tcsh"], "tcsh"),
        (
            &["supervise", "--metrics-listen", "localhost"],
            "--metrics-listen",
        ),
        (&["status", "--domid", "x"], "--domid"),
    ] {
        let o = rbdback(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        assert!(stderr(&o).contains(names), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn version_is_the_crate_version() {
    let o = rbdback(&["--version"]);
    assert!(o.status.success());
    assert_eq!(
        stdout(&o).trim(),
        format!("rbdback {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn completions_cover_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let o = rbdback(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {o:?}");
        let text = stdout(&o);
        for (sub, _) in HELP {
            assert!(text.contains(sub), "{shell} completion lacks {sub}");
        }
        assert!(text.contains("backend-domid"), "{shell}: no options");
    }
}

#[test]
fn man_pages_exist_for_every_subcommand() {
    let o = rbdback(&["man"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains(".TH rbdback 8"), "{}", stdout(&o));
    let dir = std::env::temp_dir().join(format!("rbdback-man-{}", std::process::id()));
    let o = rbdback(&["man", "--out-dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    for (sub, _) in HELP {
        let page = std::fs::read_to_string(dir.join(format!("rbdback-{sub}.8"))).unwrap();
        assert!(
            page.contains(&format!(".TH rbdback-{sub} 8")),
            "{sub}: {page}"
        );
        let one = rbdback(&["man", sub]);
        assert_eq!(stdout(&one), page, "man {sub}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let o = rbdback(&["man", "nosuch"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("rbdback-serve.8"), "{}", stderr(&o));
}

#[test]
fn status_without_serve_processes_lists_nothing() {
    let dir = std::env::temp_dir().join(format!("rbdback-cli-status-{}", std::process::id()));
    let o = rbdback(&["--run-dir", dir.to_str().unwrap(), "status", "--json"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o).trim(), "[]");
    let o = rbdback(&["--run-dir", dir.to_str().unwrap(), "status"]);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).starts_with("DOMID"), "{}", stdout(&o));
}

#[cfg(feature = "test-utils")]
#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let o = rbdback(&["ring-demo", "--requests", "100"]);
    assert!(o.status.success(), "{o:?}");
    let err = stderr(&o);
    assert!(err.contains("ring demo"), "{err}");
    assert!(!err.contains('\x1b'), "ANSI escape in {err:?}");
}

#[cfg(feature = "test-utils")]
#[test]
fn json_logs_are_one_object_per_line() {
    let o = rbdback(&["--log-format", "json", "ring-demo", "--requests", "100"]);
    assert!(o.status.success(), "{o:?}");
    let err = stderr(&o);
    let mut n = 0;
    for line in err.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        assert_eq!(v["level"], "INFO", "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
        n += 1;
    }
    assert!(n >= 1, "no log line in {err:?}");
}
