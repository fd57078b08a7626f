//! The open-file limit as an operator meets it: a gateway started under a low limit says
//! at start how many devices it can serve (transparent mode holds one broker connection,
//! an open file, per device) and where to look.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mqtt-sn-gateway");

#[test]
fn a_low_open_file_limit_is_logged_with_the_devices_it_allows() {
    let mut c = Command::new("sh");
    for (k, _) in std::env::vars() {
        if k.starts_with("MQTT_SN_") {
            c.env_remove(k);
        }
    }
    let script = format!("ulimit -n 100 && exec '{BIN}' --udp 127.0.0.1:0 --broker mqtt://127.0.0.1:1");
    let mut child = c
        .args(["-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sh runs");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let mut found = None;
    while Instant::now() < deadline && found.is_none() {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if line.contains("serves at most") {
                    found = Some(line.clone());
                }
                seen.push(line);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = found.unwrap_or_else(|| panic!("no open-file warning in:\n{}", seen.join("\n")));
    // 100 files less the 64 kept for everything else.
    assert!(line.contains("at most 36 devices"), "{line}");
    assert!(
        line.contains("LimitNOFILE") && line.contains("docs/scaling.md"),
        "{line}"
    );
    assert!(
        seen.iter()
            .any(|l| l.contains("open-file limit") && l.contains("soft=100")),
        "the limit itself is logged:\n{}",
        seen.join("\n")
    );
}
