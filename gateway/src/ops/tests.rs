#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use super::*;
use crate::config::Config;

/// Field names of `Metrics` as its `Debug` shows them: a second walk, independent of
/// serde, that the exposition must match.
fn debug_field_names() -> Vec<String> {
    let text = format!("{:?}", Metrics::default());
    let inner = text.trim_start_matches("Metrics {").trim_end_matches('}');
    inner
        .split(',')
        .filter_map(|f| f.split(':').next())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

#[test]
fn every_counter_has_help_and_is_exposed_as_total() {
    let fields = debug_field_names();
    assert!(fields.len() >= 25, "fields: {fields:?}");
    let walked: Vec<String> = counters(&Metrics::default()).into_iter().map(|(n, _)| n).collect();
    let mut a = fields.clone();
    a.sort();
    let mut b = walked.clone();
    b.sort();
    assert_eq!(a, b, "the serde walk must see every field");
    let text = render(&View::default());
    for name in &fields {
        assert!(counter_help(name).is_some(), "no HELP text for counter {name}");
        let metric = format!("{PREFIX}_{name}_total");
        assert!(
            text.lines().any(|l| l == format!("{metric} 0")),
            "{metric} missing from:\n{text}"
        );
        assert!(text.contains(&format!("# TYPE {metric} counter")), "{metric} type");
        assert!(
            text.contains(&format!("# HELP {metric} {}", counter_help(name).unwrap())),
            "{metric} help"
        );
    }
}

#[test]
fn values_and_gauges_are_shown() {
    let mut view = View::default();
    view.stats.metrics.malformed = 7;
    view.stats.metrics.qos0_dropped_broker_closed = 3;
    view.stats.active = 2;
    view.stats.asleep = 1;
    view.stats.held_messages = 5;
    view.broker_links = 4;
    view.broker_reachable = Some(true);
    let text = render(&view);
    for line in [
        "mqttsn_malformed_total 7",
        "mqttsn_qos0_dropped_broker_closed_total 3",
        "mqttsn_sessions_active 2",
        "mqttsn_sessions_asleep 1",
        "mqttsn_held_messages 5",
        "mqttsn_broker_connections 4",
        "mqttsn_broker_reachable 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
    }
    // Every sample line (histograms aside) is a name and an integer.
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains("_latency_seconds"))
    {
        let (name, value) = l.split_once(' ').expect("name value");
        assert!(name.starts_with("mqttsn_"), "{l}");
        value.parse::<i64>().expect("an integer value");
    }
}

#[test]
fn health_needs_a_reachable_broker_and_open_ports() {
    let mut view = View::default();
    assert_eq!(health(&view), Err("broker not probed yet".into()));
    view.broker_reachable = Some(false);
    assert_eq!(health(&view), Err("broker unreachable".into()));
    view.broker_reachable = Some(true);
    assert_eq!(health(&view), Ok(()));
    view.serial_ports = 2;
    view.serial_open = 1;
    assert_eq!(health(&view), Err("1 of 2 serial ports not open".into()));
    view.serial_open = 2;
    assert_eq!(health(&view), Ok(()));
    view.stopping = true;
    assert_eq!(health(&view), Err("stopping".into()));
}

#[test]
fn http_routes_and_methods() {
    let up = || View {
        broker_reachable: Some(true),
        ..View::default()
    };
    let r = respond(b"GET /metrics HTTP/1.1\r\nHost: x", up);
    assert_eq!(r.status, 200);
    assert!(r.body.contains("mqttsn_datagrams_in_total 0"));
    assert_eq!(respond(b"GET /healthz HTTP/1.1", up).body, "ok\n");
    let down = respond(b"GET /healthz?x=1 HTTP/1.0", View::default);
    assert_eq!((down.status, down.body.as_str()), (503, "broker not probed yet\n"));
    assert_eq!(respond(b"GET /other HTTP/1.1", up).status, 404);
    assert_eq!(respond(b"POST /metrics HTTP/1.1", up).status, 405);
    assert_eq!(respond(b"DELETE /healthz HTTP/1.1", up).status, 405);
    assert_eq!(respond(b"garbage", up).status, 400);
    assert_eq!(respond(b"GET /metrics SPDY/3", up).status, 400);
    let bytes = String::from_utf8(respond(b"PUT /metrics HTTP/1.1", up).to_bytes()).unwrap();
    assert!(bytes.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{bytes}");
    assert!(bytes.contains("\r\nAllow: GET\r\n") && bytes.contains("\r\nConnection: close\r\n"));
}

#[test]
fn udp_probe_is_validated() {
    let ok = Config::parse("[metrics]\nudp_probe_request = \"health?\"\nudp_probe_reply = \"ok\"\n")
        .unwrap()
        .validate_offline()
        .unwrap();
    let probe = ok.metrics.udp_probe.expect("a probe");
    assert_eq!(
        (probe.request.as_slice(), probe.reply.as_slice()),
        (&b"health?"[..], &b"ok"[..])
    );
    // 0x02 0x18: a DISCONNECT; a device could send it, so it cannot be the probe.
    let clash = Config::parse("[metrics]\nudp_probe_request = \"\\u0002\\u0018\"\nudp_probe_reply = \"ok\"\n")
        .unwrap()
        .validate_offline()
        .unwrap_err();
    assert!(clash.mentions("decodes as an MQTT-SN message"), "{clash}");
    let half = Config::parse("[metrics]\nudp_probe_request = \"health?\"\n")
        .unwrap()
        .validate_offline()
        .unwrap_err();
    assert!(half.mentions("together"), "{half}");
    let none = Config::default().validate_offline().unwrap();
    assert!(none.metrics.udp_probe.is_none() && none.metrics.listen.is_none());
}

#[test]
fn latency_histograms_are_cumulative_in_seconds() {
    let mut view = View::default();
    let h = &mut view.stats.latency.connack;
    h.observe(Duration::from_millis(3));
    h.observe(Duration::from_millis(30));
    h.observe(Duration::from_secs(60));
    view.stats.latency.publish_ack.observe(Duration::from_millis(7));
    let text = render(&view);
    for line in [
        "# TYPE mqttsn_connack_latency_seconds histogram",
        "mqttsn_connack_latency_seconds_bucket{le=\"0.005\"} 1",
        "mqttsn_connack_latency_seconds_bucket{le=\"0.025\"} 1",
        "mqttsn_connack_latency_seconds_bucket{le=\"0.05\"} 2",
        "mqttsn_connack_latency_seconds_bucket{le=\"30\"} 2",
        "mqttsn_connack_latency_seconds_bucket{le=\"+Inf\"} 3",
        "mqttsn_connack_latency_seconds_count 3",
        "mqttsn_connack_latency_seconds_sum 60.033",
        "mqttsn_publish_ack_latency_seconds_bucket{le=\"0.01\"} 1",
        "mqttsn_publish_ack_latency_seconds_count 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
    }
}

/// Every metric name that the operator's documents use (the metric list and the alerting
/// advice in docs/operations.md, the shipped alerting rules) is one the endpoint serves,
/// so that a renamed metric cannot leave a dashboard or an alert silently empty.
#[test]
fn documented_and_alerted_metrics_are_served() {
    let text = render(&View::default());
    let served: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split([' ', '{']).next())
        .collect();
    let docs = [
        ("docs/operations.md", include_str!("../../../docs/operations.md")),
        (
            "packaging/prometheus-alerts.yml",
            include_str!("../../../packaging/prometheus-alerts.yml"),
        ),
    ];
    for (file, body) in docs {
        let mut seen = 0;
        for (at, _) in body.match_indices("mqttsn_") {
            let name: String = body[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `mqttsn_(a|b)_total` in a regular expression, `mqttsn_<name>_total` in prose.
            if name.ends_with('_') {
                continue;
            }
            seen += 1;
            let base = name
                .strip_suffix("_bucket")
                .or_else(|| name.strip_suffix("_sum"))
                .or_else(|| name.strip_suffix("_count"))
                .unwrap_or(&name);
            assert!(
                served.contains(name.as_str()) || served.contains(format!("{base}_bucket").as_str()),
                "{file} names {name}, which /metrics does not serve"
            );
        }
        assert!(seen >= 10, "{file}: only {seen} metric names found");
    }
}
