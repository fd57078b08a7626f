//! A device on a serial port, on a Linux host: the firmware client (`UartClient`) exactly
//! as a microcontroller runs it, for trying a gateway's serial setup without one.
//!
//! ```text
//! cargo run -p sn-codec --features uart --example serial_device -- /dev/ttyUSB0 [BAUD] [CLIENT_ID]
//! ```
//!
//! It configures the port with `stty` (raw, 8N1, default 115200 baud), connects with COBS
//! framing, subscribes to `sn/<client id>/cmd`, publishes a counter to
//! `sn/<client id>/count` with QoS 1 every 5 seconds, and prints what it receives and
//! what happens. Watch it at the broker with
//! `mosquitto_sub -v -t 'sn/#'`, and send it something with
//! `mosquitto_pub -t sn/<client id>/cmd -m hello`.
//!
//! Two USB-serial adapters wired to each other (TX to RX), one for the gateway and one for
//! this program, test the whole serial path; so does a pair of linked pseudo terminals
//! (`socat -d -d pty,raw,echo=0 pty,raw,echo=0`).
//!
//! The port here is a `std::fs::File` read by a thread, behind the `embedded-hal-nb` traits
//! that a HAL's UART driver implements on a microcontroller.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sn_codec::client::uart::embedded_hal_nb::nb;
use sn_codec::client::uart::embedded_hal_nb::serial::{ErrorKind, ErrorType, Read, Write};
use sn_codec::client::uart::{Incoming, UartClient};
use sn_codec::client::{Config, Event, State};
use sn_codec::framing::FramingKind;
use sn_codec::{QoS, TopicFilter};

/// A tty as a non-blocking UART: a thread reads it into a channel.
struct HostUart {
    rx: mpsc::Receiver<u8>,
    tx: File,
}

impl HostUart {
    fn open(path: &str, baud: u32) -> std::io::Result<HostUart> {
        let status = Command::new("stty")
            .args([
                "-F",
                path,
                &baud.to_string(),
                "raw",
                "-echo",
                "cs8",
                "-cstopb",
                "-parenb",
            ])
            .status()?;
        if !status.success() {
            return Err(std::io::Error::other(format!("stty could not configure {path}")));
        }
        let tx = OpenOptions::new().read(true).write(true).open(path)?;
        let mut reader = tx.try_clone()?;
        let (bytes, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                for &b in &buf[..n] {
                    if bytes.send(b).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(HostUart { rx, tx })
    }
}

impl ErrorType for HostUart {
    type Error = ErrorKind;
}

impl Read<u8> for HostUart {
    fn read(&mut self) -> nb::Result<u8, ErrorKind> {
        match self.rx.try_recv() {
            Ok(b) => Ok(b),
            Err(mpsc::TryRecvError::Empty) => Err(nb::Error::WouldBlock),
            Err(mpsc::TryRecvError::Disconnected) => Err(nb::Error::Other(ErrorKind::Other)),
        }
    }
}

impl Write<u8> for HostUart {
    fn write(&mut self, byte: u8) -> nb::Result<(), ErrorKind> {
        self.tx
            .write_all(&[byte])
            .map_err(|_| nb::Error::Other(ErrorKind::Other))
    }

    fn flush(&mut self) -> nb::Result<(), ErrorKind> {
        self.tx.flush().map_err(|_| nb::Error::Other(ErrorKind::Other))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: serial_device PORT [BAUD] [CLIENT_ID]");
        std::process::exit(2);
    };
    let baud = args.get(1).and_then(|b| b.parse().ok()).unwrap_or(115_200);
    // The engine borrows its strings for 'a: leak them, as firmware has them in flash.
    let client_id: &'static str = Box::leak(args.get(2).cloned().unwrap_or("serial-device".into()).into_boxed_str());
    let cmd_topic: &'static str = Box::leak(format!("sn/{client_id}/cmd").into_boxed_str());
    let count_topic: &'static str = Box::leak(format!("sn/{client_id}/count").into_boxed_str());

    let uart = match HostUart::open(path, baud) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("cannot open {path}: {e}");
            std::process::exit(1);
        }
    };
    let config = Config {
        keep_alive: 60,
        t_retry: 5_000,
        ..Config::new(client_id)
    };
    let mut mqtt: UartClient<'static, HostUart> = UartClient::new(uart, FramingKind::Cobs, config);
    let start = Instant::now();
    let now_ms = || u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);

    let mut count_id = None; // topic id of `count_topic`, once registered
    let mut counter = 0u32;
    let mut next_publish = 0;
    let mut next_connect = 0;
    loop {
        let now = now_ms();
        if mqtt.client().state() == State::Disconnected && now >= next_connect {
            println!("connecting as {client_id} on {path} ({baud} baud, cobs)");
            let _ = mqtt.client_mut().connect(now);
            next_connect = now + 10_000;
        }
        let result = mqtt.poll(now, |client, incoming| match incoming {
            Incoming::Message(msg) => {
                let topic = client.topic_name(&msg.topic).unwrap_or("?");
                println!("received on {topic}: {}", String::from_utf8_lossy(msg.payload));
            }
            Incoming::Event(event) => {
                println!("event: {event:?}");
                match event {
                    Event::Connected => {
                        let _ = client.register(now, count_topic);
                    }
                    Event::Registered { topic_id, .. } => {
                        count_id = Some(topic_id);
                        let _ = client.subscribe(now, TopicFilter::Name(cmd_topic), QoS::AtLeastOnce);
                    }
                    Event::GatewayLost | Event::Disconnected => count_id = None,
                    _ => {}
                }
            }
        });
        if let Err(e) = result {
            eprintln!("{e}");
        }
        if let Some(id) = count_id {
            if now >= next_publish && !mqtt.client().is_busy() {
                counter += 1;
                let payload = counter.to_string();
                let topic = sn_codec::TopicRef::Normal(id);
                if mqtt
                    .client_mut()
                    .publish(now, topic, payload.as_bytes(), QoS::AtLeastOnce, false)
                    .is_ok()
                {
                    println!("publishing {payload} to {count_topic}");
                    next_publish = now + 5_000;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
