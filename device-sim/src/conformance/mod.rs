//! The conformance suite: named protocol checks run against any MQTT-SN v1.2 gateway over
//! UDP, with an MQTT client on the gateway's broker (the observer) to see the other side.
//!
//! Every check is one row of [`CHECKS`]: its name, the section of the specification it
//! tests, what it needs to run (`--broker`, a predefined topic, a discovery address) and
//! its code. A check passes only on the answer the specification asks for, seen on the
//! wire and, where the rule is about the broker (arrival, QoS, RETAIN, will or no will),
//! seen at the broker. A wrong answer or no answer is a failure. "Not supported" comes only
//! from the gateway itself (return code 0x03) or from the user (`--expect-unsupported`);
//! a check whose needs are not given is skipped, and says which option it needs.

mod checks;
mod downlink;
mod observer;
mod session;
mod uplink;
mod wire;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use sn_codec::ReturnCode;

pub use checks::{Check, Needs, CHECKS};
pub use observer::ObserverError;

use observer::Observer;
use wire::Wire;

use crate::verifier::BrokerUrl;

/// The default for `--max-datagram`: what a UDP datagram carries without IP fragmentation
/// on an IPv6 link of minimum MTU (1280 octets less 40 of IPv6 and 8 of UDP header).
pub const DEFAULT_MAX_DATAGRAM: usize = 1232;

/// What to check and where.
#[derive(Debug, Clone)]
pub struct ConformanceOptions {
    /// The gateway's UDP address.
    pub gateway: SocketAddr,
    /// The broker the gateway uses; without it the checks that verify at the broker are
    /// skipped.
    pub broker: Option<BrokerUrl>,
    /// A predefined topic the gateway is configured with, `(id, name)`.
    pub predefined: Option<(u16, String)>,
    /// A broadcast or multicast address (or any address the gateway listens on for
    /// discovery) to send SEARCHGW to.
    pub discovery: Option<SocketAddr>,
    /// How long to wait for each expected answer.
    pub timeout: Duration,
    /// The gateway's retransmission interval (Tretry): how long the retransmission check
    /// waits beyond `timeout` for the gateway to send a PUBLISH again.
    pub gateway_retry: Duration,
    /// The largest datagram the gateway accepts; the large-payload check sends one of
    /// exactly this size.
    pub max_datagram: usize,
    /// Which checks run, and how their results are read.
    pub select: Selection,
}

/// Which checks run (by exact name, as in [`CHECKS`]).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Run only these (all when empty).
    pub only: Vec<String>,
    /// Do not run these (reported as skipped).
    pub skip: Vec<String>,
    /// The user declares the gateway does not support these: a failure is reported as
    /// not supported.
    pub expect_unsupported: Vec<String>,
}

impl Selection {
    /// Checks that every name is one of [`CHECKS`].
    pub fn validate(&self) -> Result<(), ConformanceError> {
        for name in self.only.iter().chain(&self.skip).chain(&self.expect_unsupported) {
            if !CHECKS.iter().any(|c| c.name == name) {
                return Err(ConformanceError::UnknownCheck {
                    name: name.clone(),
                    valid: CHECKS.iter().map(|c| c.name).collect::<Vec<_>>().join(", "),
                });
            }
        }
        Ok(())
    }
}

/// Why the suite could not run.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// `--only`, `--skip` or `--expect-unsupported` named no check.
    #[error("unknown check {name:?}; the checks are: {valid}")]
    UnknownCheck {
        /// The name given.
        name: String,
        /// Every check's name.
        valid: String,
    },
    /// The broker given with `--broker` cannot be used.
    #[error(transparent)]
    Broker(#[from] ObserverError),
    /// `--max-datagram` outside what the suite can send.
    #[error("--max-datagram {0}: between 64 and 65535 octets")]
    MaxDatagram(usize),
}

/// Why a check did not pass: the detail of its report.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The gateway did not answer in time.
    #[error("no answer to {what} within {waited:?}")]
    NoAnswer {
        /// What was asked.
        what: &'static str,
        /// How long the check waited.
        waited: Duration,
    },
    /// The gateway sent something that is not an MQTT-SN message.
    #[error("waiting for {what}, the gateway sent an undecodable datagram ({error}): {bytes}")]
    Undecodable {
        /// What was asked.
        what: &'static str,
        /// The codec's reason.
        error: String,
        /// The first octets, in hex.
        bytes: String,
    },
    /// The gateway refused with a return code other than "not supported".
    #[error("{what} rejected with return code {code:?}")]
    Rejected {
        /// What was asked.
        what: &'static str,
        /// The return code.
        code: ReturnCode,
    },
    /// The gateway answered 0x03, "not supported".
    #[error("the gateway answered {what} with return code 0x03 (not supported)")]
    NotSupported {
        /// What was asked.
        what: &'static str,
    },
    /// The gateway answered, but not as the specification says.
    #[error("{0}")]
    Wrong(String),
    /// The broker side did not work.
    #[error(transparent)]
    Observer(#[from] ObserverError),
    /// The check needs something the suite was not given (a defect of the table if it
    /// shows: needs are checked before a check runs).
    #[error("needs {0}")]
    Needs(&'static str),
    /// A local socket failed.
    #[error("local socket: {0}")]
    Io(std::io::Error),
    /// A packet the check built does not encode (a defect of the check).
    #[error("cannot encode: {0:?}")]
    Encode(sn_codec::Error),
}

/// What a check returns: a note for its report when it passed.
pub(crate) type CheckResult = Result<String, CheckError>;

/// The result of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The gateway behaved as the specification says.
    Pass,
    /// It did not: a wrong answer, or no answer.
    Fail,
    /// The gateway said so on the wire (return code 0x03), or the user declared it with
    /// `--expect-unsupported`.
    NotSupported,
    /// Not run: `--skip`, or a need not given (the detail says which option).
    Skipped,
}

/// One check's report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// Name.
    pub name: &'static str,
    /// The section of the MQTT-SN v1.2 specification it tests.
    pub section: &'static str,
    /// What it checks.
    pub description: &'static str,
    /// The outcome.
    pub outcome: Outcome,
    /// Why it failed, is not supported or was skipped, or a note.
    pub detail: String,
    /// How long it took.
    pub millis: u64,
}

/// What a running check may use.
pub(crate) struct Ctx {
    opts: ConformanceOptions,
    run: u32,
    n: u32,
    observer: Option<Observer>,
}

impl Ctx {
    /// A client id not used before (23 characters at most, as MQTT-SN allows).
    fn client_id(&mut self) -> String {
        self.n += 1;
        format!("cf-{:08x}-{}", self.run, self.n)
    }

    /// A topic name of this run for `check`.
    fn topic(&self, check: &str) -> String {
        format!("conformance/{:08x}/{check}", self.run)
    }

    /// A two-character short topic name that differs between runs and salts.
    fn short_name(&self, salt: u32) -> [u8; 2] {
        let x = self.run.wrapping_add(salt.wrapping_mul(677));
        [b'a' + (x % 26) as u8, b'a' + ((x / 26) % 26) as u8]
    }

    /// A payload that names this run, so that messages of other runs are told apart.
    fn payload(&self, what: &str) -> Vec<u8> {
        format!("{what} {:08x}", self.run).into_bytes()
    }

    fn timeout(&self) -> Duration {
        self.opts.timeout
    }

    /// A fresh raw client towards the gateway.
    async fn wire(&self) -> Result<Wire, CheckError> {
        Wire::open(self.opts.gateway, self.opts.timeout).await
    }

    /// A raw client, connected with a fresh client id and keep-alive `keep_alive`.
    async fn connected(&mut self, keep_alive: u16) -> Result<(Wire, String), CheckError> {
        let id = self.client_id();
        let mut w = self.wire().await?;
        w.connect(&id, keep_alive).await?;
        Ok((w, id))
    }

    fn observer(&mut self) -> Result<&mut Observer, CheckError> {
        self.observer.as_mut().ok_or(CheckError::Needs("--broker"))
    }

    fn predefined(&self) -> Result<(u16, String), CheckError> {
        self.opts.predefined.clone().ok_or(CheckError::Needs("--predefined"))
    }
}

/// Which option a need is given with, when it is not given.
fn missing(needs: Needs, opts: &ConformanceOptions) -> Option<&'static str> {
    if needs.broker && opts.broker.is_none() {
        return Some("--broker URL (it verifies at the broker)");
    }
    if needs.predefined && opts.predefined.is_none() {
        return Some("--predefined ID=TOPIC (a predefined topic of the gateway)");
    }
    if needs.discovery && opts.discovery.is_none() {
        return Some("--discovery-addr ADDR (where the gateway hears SEARCHGW)");
    }
    None
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs the selected checks in table order. Fails only when the selection names an
/// unknown check or the broker given cannot be reached.
pub async fn run(opts: ConformanceOptions) -> Result<Vec<CheckReport>, ConformanceError> {
    opts.select.validate()?;
    if opts.max_datagram < 64 || opts.max_datagram > 0xFFFF {
        return Err(ConformanceError::MaxDatagram(opts.max_datagram));
    }
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(0)
        ^ std::process::id().rotate_left(16);
    let observer = match &opts.broker {
        Some(b) => Some(Observer::start(b, format!("mqtt-sn-conformance-{run:08x}")).await?),
        None => None,
    };
    let mut ctx = Ctx {
        opts,
        run,
        n: 0,
        observer,
    };
    let mut reports = Vec::new();
    for check in CHECKS {
        let sel = &ctx.opts.select;
        if !sel.only.is_empty() && !sel.only.iter().any(|o| o == check.name) {
            continue;
        }
        let declared = sel.expect_unsupported.iter().any(|o| o == check.name);
        let report = |outcome, detail: String, millis| CheckReport {
            name: check.name,
            section: check.section,
            description: check.description,
            outcome,
            detail,
            millis,
        };
        if sel.skip.iter().any(|o| o == check.name) {
            reports.push(report(Outcome::Skipped, "--skip".into(), 0));
            continue;
        }
        if let Some(option) = missing(check.needs, &ctx.opts) {
            reports.push(report(Outcome::Skipped, format!("needs {option}"), 0));
            continue;
        }
        let started = Instant::now();
        let result = (check.run)(&mut ctx).await;
        let (outcome, detail) = match result {
            Ok(note) if declared => (Outcome::Pass, format!("passed although declared unsupported; {note}")),
            Ok(note) => (Outcome::Pass, note),
            Err(e @ CheckError::NotSupported { .. }) => (Outcome::NotSupported, e.to_string()),
            Err(e) if declared => (Outcome::NotSupported, format!("declared unsupported: {e}")),
            Err(e) => (Outcome::Fail, e.to_string()),
        };
        reports.push(report(outcome, detail, millis(started.elapsed())));
    }
    if let Some(o) = ctx.observer.take() {
        o.stop().await;
    }
    Ok(reports)
}

/// The checks as a table for people: name, section, needs, description.
pub fn list() -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let w = CHECKS.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let _ = writeln!(out, "{:<w$}  {:<8} {:<22} what it checks", "check", "section", "needs");
    for c in CHECKS {
        let _ = writeln!(
            out,
            "{:<w$}  {:<8} {:<22} {}",
            c.name,
            c.section,
            c.needs.to_string(),
            c.description
        );
    }
    out
}

/// The results as a table for people.
pub fn table(reports: &[CheckReport]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let w = reports.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for r in reports {
        let verdict = match r.outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::NotSupported => "not supported",
            Outcome::Skipped => "skipped",
        };
        let _ = write!(
            out,
            "{:<13} {:<w$} {:<8} {:>6} ms",
            verdict, r.name, r.section, r.millis
        );
        if !r.detail.is_empty() {
            let _ = write!(out, "  {}", r.detail);
        }
        out.push('\n');
    }
    let count = |o: Outcome| reports.iter().filter(|r| r.outcome == o).count();
    let _ = writeln!(
        out,
        "{} passed, {} failed, {} not supported, {} skipped",
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::NotSupported),
        count(Outcome::Skipped)
    );
    out
}
