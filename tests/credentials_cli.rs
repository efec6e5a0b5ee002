//! `iomt-edge credentials add/remove/list` as a user runs them: the file they write (mode, format
//! mosquitto_passwd's own tools read), passwords never on the command line, and bad input that
//! leaves the file as it was. The other direction (mosquitto's broker taking a file this writes)
//! is in tests/external_auth.rs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::output_with_stdin;
use iomt_edge::transport::credentials::Credentials;

/// Runs `iomt-edge credentials ARGS` in `dir` with `stdin` on standard input.
fn credentials(dir: &Path, args: &[&str], stdin: &str) -> Output {
    output_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
            .current_dir(dir)
            .arg("credentials")
            .args(args),
        stdin.as_bytes(),
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn add_list_rotate_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data/credentials");
    std::fs::create_dir(dir.path().join("data")).unwrap();

    // From standard input, into the default file, at the default iteration count.
    let o = credentials(dir.path(), &["add", "ward7-bed3-monitor"], "first-pass\n");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("added `ward7-bed3-monitor`"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stdout(&o), "", "nothing on stdout without --generate");
    assert_eq!(mode(&file), 0o600);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("ward7-bed3-monitor:$7$210000$"), "{text}");
    let c = Credentials::load(&file).unwrap();
    assert!(c.verify("ward7-bed3-monitor", b"first-pass"));
    assert!(!c.verify("ward7-bed3-monitor", b"first-pass\n"));

    // From a password file, a second account, fewer iterations.
    let pw = dir.path().join("pw");
    write_private(&pw, "edge-pass\n");
    let o = credentials(
        dir.path(),
        &[
            "add",
            "edge",
            "--password-file",
            "pw",
            "--iterations",
            "1000",
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));

    let o = credentials(dir.path(), &["list"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    let list = stdout(&o);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert_eq!(lines[0], "ward7-bed3-monitor\t210000 iterations");
    assert!(
        lines[1].starts_with("edge\t1000 iterations (below the default 210000"),
        "{list}"
    );
    assert!(!list.contains("$7$"), "list shows no hash: {list}");

    // Rotation: the entry is replaced in place, the old password stops working.
    let o = credentials(
        dir.path(),
        &[
            "add",
            "ward7-bed3-monitor",
            "--generate",
            "--iterations",
            "1000",
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("replaced"), "{}", stderr(&o));
    let generated = stdout(&o);
    let generated = generated.trim_end();
    assert!(generated.len() >= 24, "{generated:?}");
    assert!(!stderr(&o).contains(generated), "printed once, on stdout");
    let c = Credentials::load(&file).unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(
        c.names().collect::<Vec<_>>(),
        ["ward7-bed3-monitor", "edge"]
    );
    assert!(c.verify("ward7-bed3-monitor", generated.as_bytes()));
    assert!(!c.verify("ward7-bed3-monitor", b"first-pass"));
    assert!(c.verify("edge", b"edge-pass"));
    assert_eq!(mode(&file), 0o600);

    let o = credentials(dir.path(), &["remove", "edge"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    let c = Credentials::load(&file).unwrap();
    assert_eq!(c.names().collect::<Vec<_>>(), ["ward7-bed3-monitor"]);
    assert!(!c.contains("edge"));
    // No temporary file left behind.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["credentials"]);
}

#[test]
fn bad_input_is_refused_and_leaves_the_file_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("creds");
    let o = credentials(
        dir.path(),
        &["add", "bed-1", "--file", "creds", "--iterations", "1000"],
        "pass\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let before = std::fs::read(&file).unwrap();
    let pw_open = dir.path().join("pw-open");
    std::fs::write(&pw_open, "pass\n").unwrap();
    std::fs::set_permissions(&pw_open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let pw_empty = dir.path().join("pw-empty");
    write_private(&pw_empty, "\n");

    for (args, stdin, want) in [
        (
            &["add", "ward/7", "--file", "creds"][..],
            "pass\n",
            "`ward/7`: the account name holds '/'",
        ),
        (&["add", "a b", "--file", "creds"], "pass\n", "holds ' '"),
        (&["add", "bed+", "--file", "creds"], "pass\n", "holds '+'"),
        (&["add", "", "--file", "creds"], "pass\n", "is empty"),
        (
            &["add", "bed-2", "--file", "creds"],
            "\n",
            "the password is empty",
        ),
        (
            &["add", "bed-2", "--file", "creds"],
            "",
            "the password is empty",
        ),
        (
            &[
                "add",
                "bed-2",
                "--file",
                "creds",
                "--password-file",
                "pw-open",
            ],
            "",
            "pw-open: mode 0644",
        ),
        (
            &[
                "add",
                "bed-2",
                "--file",
                "creds",
                "--password-file",
                "pw-empty",
            ],
            "",
            "the password is empty",
        ),
        (
            &["add", "bed-2", "--file", "creds", "--password-file", "nope"],
            "",
            "nope: No such file",
        ),
        (
            &["add", "bed-2", "--file", "creds", "--iterations", "0"],
            "pass\n",
            "--iterations",
        ),
        (
            &["remove", "bed-9", "--file", "creds"],
            "",
            "creds: no account `bed-9`",
        ),
    ] {
        let o = credentials(dir.path(), args, stdin);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
        assert_eq!(std::fs::read(&file).unwrap(), before, "{args:?} changed it");
    }

    // A credentials file others can read is refused, for every command, and kept as it is.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    for args in [
        &["add", "bed-2", "--file", "creds"][..],
        &["remove", "bed-1", "--file", "creds"],
        &["list", "--file", "creds"],
    ] {
        let o = credentials(dir.path(), args, "pass\n");
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(
            stderr(&o).contains("creds: mode 0640") && stderr(&o).contains("0600"),
            "{args:?}: {}",
            stderr(&o)
        );
        assert_eq!(std::fs::read(&file).unwrap(), before);
        assert_eq!(mode(&file), 0o640);
    }

    // A malformed line is named by number, without its text, and the file is not rewritten.
    let broken = dir.path().join("broken");
    let text = format!(
        "{}bed-2:$7$1000$c2FsdA==$bm90IGEgaGFzaA==\n",
        String::from_utf8(before.clone()).unwrap()
    );
    write_private(&broken, &text);
    let o = credentials(dir.path(), &["add", "bed-3", "--file", "broken"], "pass\n");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("broken:2: `bed-2`: the hash is 10 bytes, not 64"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("bm90IGEgaGFzaA"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&broken).unwrap(), text);

    // A duplicate name is refused too.
    let dup = dir.path().join("dup");
    let line = String::from_utf8(before).unwrap();
    write_private(&dup, &format!("{line}{line}"));
    let o = credentials(dir.path(), &["list", "--file", "dup"], "");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("dup:2: `bed-1` is already on line 1"),
        "{}",
        stderr(&o)
    );
}

/// The format is mosquitto's: a file mosquitto_passwd wrote verifies here, with mosquitto's own
/// iteration count, and a file written here, edited by mosquitto_passwd, still verifies.
#[test]
fn mosquitto_passwd_files_verify_and_keep_working_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    let status = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&file)
        .args(["from-mosquitto", "its-password"])
        .status()
        .expect("mosquitto_passwd is installed (scripts/test.sh installs mosquitto)");
    assert!(status.success());
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let c = Credentials::load(&file).unwrap();
    assert!(c.verify("from-mosquitto", b"its-password"));
    assert!(!c.verify("from-mosquitto", b"its-passwore"));
    let o = credentials(dir.path(), &["list", "--file", "passwd"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    // mosquitto_passwd's own count is far below OWASP's, and the list says so.
    assert!(
        stdout(&o).contains("below the default 210000"),
        "{}",
        stdout(&o)
    );

    // Ours added to its file; then mosquitto_passwd adds another to ours: all three verify.
    let o = credentials(
        dir.path(),
        &[
            "add",
            "from-edge",
            "--file",
            "passwd",
            "--iterations",
            "1000",
        ],
        "edge-password\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let status = Command::new("mosquitto_passwd")
        .arg("-b")
        .arg(&file)
        .args(["second-mosquitto", "another"])
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = Credentials::load(&file).unwrap();
    assert_eq!(c.len(), 3);
    assert!(c.verify("from-mosquitto", b"its-password"));
    assert!(c.verify("from-edge", b"edge-password"));
    assert!(c.verify("second-mosquitto", b"another"));
}
