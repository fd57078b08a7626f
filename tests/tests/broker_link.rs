//! The broker link under stress: a broker that refuses or is down (every connection's
//! entry is freed; devices get the right CONNACK), and a device bursting QoS 0 faster
//! than its broker connection drains (nothing dropped silently).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{
    free_port, init_logging, test_engine_config, Mosquitto, Observer, QoS, ReturnCode, Rx, SnClient, TopicRef,
    PREDEFINED_ID, PREDEFINED_TOPIC, QUIET, WAIT,
};
use gateway::broker::mqtt::BrokerConfig;
use gateway::config::Settings;
use gateway::runtime::Running;

/// Starts the gateway against `broker`, with `tweak` applied to the settings.
async fn gateway_to(broker: SocketAddr, tweak: impl FnOnce(&mut Settings)) -> (Running, SocketAddr) {
    init_logging();
    let mut settings = Settings {
        engine: test_engine_config(),
        udp: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
        broker: BrokerConfig {
            host: broker.ip().to_string(),
            port: broker.port(),
            connect_timeout_secs: 5,
            ..BrokerConfig::default()
        },
        embedded_broker: None,
        stats_interval: None,
        ..Settings::default()
    };
    tweak(&mut settings);
    let running = gateway::runtime::start(settings).await.expect("the gateway starts");
    let addr = running.udp_addrs[0];
    (running, addr)
}

/// A mosquitto that refuses every client without the right credentials
/// (`allow_anonymous false`, a password file with user `dev`, password `secret`).
struct RefusingMosquitto {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for RefusingMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn refusing_mosquitto() -> Option<RefusingMosquitto> {
    let bin = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    let Some(bin) = bin else {
        assert!(std::env::var("CI").is_err(), "mosquitto is not installed");
        eprintln!("NOTE: mosquitto not found: this test was NOT RUN");
        return None;
    };
    for attempt in 0..5 {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("e2e-refusing-{}-{port}-{attempt}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let passwd = dir.join("passwd");
        let made = Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&passwd)
            .args(["dev", "secret"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        // Without mosquitto_passwd, allow_anonymous false alone refuses anonymous clients.
        let password_line = if made {
            format!("password_file {}\n", passwd.display())
        } else {
            String::new()
        };
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous false\n{password_line}persistence false\n"),
        )
        .expect("conf");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("runs mosquitto");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut m = RefusingMosquitto { child, addr, dir };
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = m.child.try_wait() {
                break;
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Some(m);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("mosquitto (refusing) did not start");
}

/// Waits until `refused` CONNECTs were refused (the snapshot is fresh), and the gateway
/// holds no broker connection and no session.
async fn wait_links_freed(running: &Running, refused: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (links, s) = (running.broker_links(), running.stats());
        if s.metrics.connects_refused >= refused && links == 0 && s.sessions == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "broker links not freed: {links} links, {} sessions, {} refused",
            s.sessions,
            s.metrics.connects_refused
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` devices on distinct addresses each CONNECT; every answer must be `want`.
async fn connect_many(gateway: SocketAddr, n: usize, want: ReturnCode) {
    let mut devices = Vec::new();
    for i in 0..n {
        let ip = Ipv4Addr::new(127, 0, 10 + (i / 250) as u8, 1 + (i % 250) as u8);
        let d = SnClient::bind(ip, gateway, &format!("many-{i}")).await;
        let p = Packet::Connect(e2e::Connect {
            will: false,
            clean_session: true,
            duration: 30,
            client_id: &d.client_id,
        });
        d.send(&p).await;
        devices.push(d);
    }
    for d in &mut devices {
        assert_eq!(d.recv().await, Rx::ConnAck(want), "device {}", d.client_id);
    }
}

use e2e::Packet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_broker_gives_connack_rejected_and_frees_every_link() {
    let Some(m) = refusing_mosquitto() else { return };
    // No credentials, then wrong ones: both refused by the broker.
    for password in [None, Some("wrong")] {
        let (running, gateway) = gateway_to(m.addr, |s| {
            s.broker.username = password.map(|_| "dev".to_string());
            s.broker.password = password.map(str::to_string);
        })
        .await;
        let mut d = SnClient::bind(Ipv4Addr::LOCALHOST, gateway, "refused-dev").await;
        assert_eq!(
            d.try_connect(30, true).await,
            Rx::ConnAck(ReturnCode::NotSupported),
            "a broker refusal (password {password:?}) is 'rejected', not congestion"
        );
        connect_many(gateway, 200, ReturnCode::NotSupported).await;
        wait_links_freed(&running, 201).await;
        let s = running.stats();
        assert_eq!(s.metrics.connects_refused, 201);
        running.shutdown().await;
    }
    // The right credentials are accepted: the refusal was the broker's.
    let (running, gateway) = gateway_to(m.addr, |s| {
        s.broker.username = Some("dev".into());
        s.broker.password = Some("secret".into());
    })
    .await;
    let mut d = SnClient::bind(Ipv4Addr::LOCALHOST, gateway, "good-dev").await;
    let got = d.try_connect(30, true).await;
    // Only meaningful with a password file (mosquitto_passwd installed).
    if which_mosquitto_passwd() {
        assert_eq!(got, Rx::ConnAck(ReturnCode::Accepted));
    }
    running.shutdown().await;
}

fn which_mosquitto_passwd() -> bool {
    Command::new("mosquitto_passwd")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_gives_congestion_and_frees_every_link() {
    // Nobody listens there: connection refused, at once.
    let down = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let (running, gateway) = gateway_to(down, |_| {}).await;
    connect_many(gateway, 300, ReturnCode::Congestion).await;
    wait_links_freed(&running, 300).await;
    // A second wave from the same addresses.
    connect_many(gateway, 300, ReturnCode::Congestion).await;
    wait_links_freed(&running, 600).await;
    running.shutdown().await;
}

/// Sends `n` QoS 0 publishes in bursts of `burst` (back to back; a pause of 1 ms
/// between bursts keeps the kernel's receive buffer from overflowing, which the gateway
/// cannot see), then returns how many reached the observer.
async fn burst(d: &SnClient, obs: &mut Observer, n: usize, burst: usize) -> usize {
    for i in 0..n {
        let payload = format!("m{i}");
        d.send_publish(
            false,
            TopicRef::Predefined(PREDEFINED_ID),
            QoS::AtMostOnce,
            false,
            0,
            payload.as_bytes(),
        )
        .await;
        if i % burst == burst - 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut got = 0;
    let deadline = Instant::now() + WAIT;
    while got < n && Instant::now() < deadline {
        match obs.recv_within(QUIET * 2).await {
            Some(_) => got += 1,
            None => break,
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_burst_faster_than_the_link_drains_arrives_whole() {
    let Some(m) = Mosquitto::start() else { return };
    // A small request channel, so that any burst outruns it: the backlog must absorb it.
    let (running, gateway) = gateway_to(m.addr(), |s| s.broker.request_capacity = 4).await;
    let mut obs = Observer::connect(m.addr(), "burst-observer").await;
    obs.subscribe(PREDEFINED_TOPIC, 0).await;
    let mut d = SnClient::bind(Ipv4Addr::LOCALHOST, gateway, "burst-dev").await;
    d.connect(60, true).await;
    let n = 5000;
    let got = burst(&d, &mut obs, n, 500).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = running.stats();
    assert_eq!(s.metrics.qos0_dropped_broker_full, 0, "{:#?}", s.metrics);
    assert_eq!(s.metrics.broker_rejected, 0, "{:#?}", s.metrics);
    assert!(
        s.metrics.publishes_in as usize > n / 2,
        "most datagrams reach the gateway: {s:#?}"
    );
    assert_eq!(
        got as u64, s.metrics.publishes_in,
        "every publish the gateway took reached the broker"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_dropped_beyond_the_backlog_is_counted() {
    let Some(m) = Mosquitto::start() else { return };
    let (running, gateway) = gateway_to(m.addr(), |s| {
        s.broker.request_capacity = 1;
        s.broker.backlog_capacity = 4;
    })
    .await;
    let mut obs = Observer::connect(m.addr(), "drop-observer").await;
    obs.subscribe(PREDEFINED_TOPIC, 0).await;
    let mut d = SnClient::bind(Ipv4Addr::LOCALHOST, gateway, "drop-dev").await;
    d.connect(60, true).await;
    let got = burst(&d, &mut obs, 3000, 500).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = running.stats().metrics;
    assert_eq!(
        got as u64 + s.qos0_dropped_broker_full,
        s.publishes_in,
        "every publish either reached the broker or was counted as dropped: {s:#?}"
    );
    assert_eq!(s.broker_rejected, s.qos0_dropped_broker_full);
    running.shutdown().await;
}

/// Transparent mode holds one broker connection per device; `broker.max_connections`
/// (by default the open-file limit less a reserve) bounds them: a CONNECT beyond gets
/// congestion, the devices already connected go on working, and a freed connection
/// lets the next device in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_congestion_and_a_freed_one_is_reused() {
    let Some(m) = Mosquitto::start() else { return };
    let (running, gw) = gateway_to(m.addr(), |s| s.broker.max_connections = Some(2)).await;
    let mut obs = Observer::connect(m.addr(), "limit-obs").await;
    obs.subscribe("limit/#", 1).await;
    let mut a = SnClient::bind(Ipv4Addr::new(127, 0, 20, 1), gw, "limit-a").await;
    let mut b = SnClient::bind(Ipv4Addr::new(127, 0, 20, 2), gw, "limit-b").await;
    let mut c = SnClient::bind(Ipv4Addr::new(127, 0, 20, 3), gw, "limit-c").await;
    a.connect(60, true).await;
    b.connect(60, true).await;
    assert_eq!(c.try_connect(60, true).await, Rx::ConnAck(ReturnCode::Congestion));
    // (The runtime publishes its counters every 100 ms.)
    let deadline = Instant::now() + WAIT;
    while running.broker_links() != 2 || running.stats().metrics.connects_refused == 0 {
        assert!(Instant::now() < deadline, "2 links and a refusal counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The two connected devices are unaffected.
    let id = a.register("limit/a").await;
    a.publish_qos1(TopicRef::Normal(id), b"still here").await;
    obs.expect_msg_eq("limit/a", b"still here").await;

    // One leaves: the next CONNECT gets its connection.
    b.disconnect().await;
    let deadline = Instant::now() + WAIT;
    loop {
        match c.try_connect(60, true).await {
            Rx::ConnAck(ReturnCode::Accepted) => break,
            Rx::ConnAck(ReturnCode::Congestion) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("expected CONNACK accepted once a connection was freed, got {other:?}"),
        }
    }
    let id = c.register("limit/c").await;
    c.publish_qos1(TopicRef::Normal(id), b"let in").await;
    obs.expect_msg_eq("limit/c", b"let in").await;
    running.shutdown().await;
}
