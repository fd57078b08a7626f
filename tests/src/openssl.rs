//! `openssl s_client` as a DTLS 1.2 device: a DTLS implementation the project did not
//! write, carrying MQTT-SN messages (one write, one record) to the gateway's DTLS
//! listeners. Shared by the PSK and the certificate tests.

use std::net::SocketAddr;
use std::process::Stdio;

use sn_codec::{Connect, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::{encode, in_ci, Rx, WAIT};

/// Whether `openssl` can be run; a failure under CI when not.
pub fn have_openssl() -> bool {
    let ok = std::process::Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !in_ci(),
            "openssl is not installed: the DTLS tests need it under CI=true (apt-get install -y openssl)"
        );
        eprintln!("\nNOTE: openssl not found; this DTLS end-to-end test was NOT RUN.\n");
    }
    ok
}

/// One `openssl s_client -dtls1_2` process.
pub struct OpensslDevice {
    /// The process (a test kills it, or waits for it to end).
    pub child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

impl OpensslDevice {
    /// With a pre-shared key (TLS_PSK_WITH_AES_128_CCM_8).
    pub fn with_psk(to: SocketAddr, identity: &str, psk_hex: &str) -> OpensslDevice {
        Self::spawn(
            to,
            &["-cipher", "PSK-AES128-CCM8", "-psk_identity", identity, "-psk", psk_hex],
        )
    }

    /// `s_client -dtls1_2 -quiet -nocommands ARGS -connect TO`.
    pub fn spawn(to: SocketAddr, args: &[&str]) -> OpensslDevice {
        let mut child = Command::new("openssl")
            .args(["s_client", "-dtls1_2", "-quiet", "-nocommands"])
            .args(args)
            .arg("-connect")
            .arg(to.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("openssl s_client starts");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        OpensslDevice { child, stdin, stdout }
    }

    /// Sends one MQTT-SN message (one write: one record).
    pub async fn send(&mut self, p: &Packet<'_>) {
        self.stdin.write_all(&encode(p)).await.expect("write to s_client");
        self.stdin.flush().await.expect("flush s_client");
    }

    /// The next MQTT-SN message decrypted by s_client (one-octet length form).
    pub async fn recv(&mut self) -> Rx {
        let read = async {
            let mut len = [0u8; 1];
            self.stdout.read_exact(&mut len).await?;
            let mut rest = vec![0u8; usize::from(len[0]).saturating_sub(1)];
            self.stdout.read_exact(&mut rest).await?;
            let mut all = len.to_vec();
            all.extend_from_slice(&rest);
            Ok::<_, std::io::Error>(all)
        };
        let bytes = tokio::time::timeout(WAIT, read)
            .await
            .expect("an answer through s_client in time")
            .expect("s_client's output");
        Rx::from_packet(&Packet::decode(&bytes).expect("an MQTT-SN message"))
    }
}

/// A clean-session CONNECT with a 60 s keep-alive.
pub fn connect(client_id: &str) -> Packet<'_> {
    Packet::Connect(Connect {
        will: false,
        clean_session: true,
        duration: 60,
        client_id,
    })
}
