//! Several relays for one client: the endpoints an agent or consumer lists, in the order it
//! tries them, and the switch from one to the next.
//!
//! A client connects to the first endpoint. Whenever its connection fails (refused, cut, a TLS
//! or login error, or no answer to a keep-alive ping), it moves to the next one in the list,
//! wrapping around, after the usual reconnect backoff (100 ms doubling up to the configured
//! maximum; reset by every successful connection). With more than one endpoint the MQTT
//! keep-alive is [`FAILOVER_KEEP_ALIVE`], so a relay that stops answering without closing its
//! connections (a hung or stopped process) is left within two keep-alives. Relays that share a
//! JetStream journal are interchangeable, so nothing else changes on a switch: agents resend
//! what is unacked, consumers say where they stand.

use rumqttc::{EventLoop, MqttOptions};
use std::time::Duration;

/// The keep-alive of a client with more than one endpoint.
pub const FAILOVER_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Parses the endpoints of a config: either `host` and `port`, or `endpoints` (`"host:port"`,
/// `"[v6]:port"`), never both and never neither.
pub fn endpoints(
    host: Option<&str>,
    port: Option<u16>,
    list: &[String],
) -> Result<Vec<(String, u16)>, String> {
    match (host, port, list.is_empty()) {
        (Some(h), Some(p), true) => Ok(vec![(h.to_string(), p)]),
        (None, None, false) => list
            .iter()
            .map(|e| {
                let (h, p) = e.rsplit_once(':').ok_or_else(|| {
                    format!("endpoint {e:?} has no port (write it as \"host:port\")")
                })?;
                let h = h.trim_start_matches('[').trim_end_matches(']');
                let p = p
                    .parse::<u16>()
                    .map_err(|_| format!("endpoint {e:?}: {p:?} is not a port"))?;
                if h.is_empty() {
                    return Err(format!("endpoint {e:?} has no host"));
                }
                Ok((h.to_string(), p))
            })
            .collect(),
        (_, _, false) => {
            Err("give either host and port or endpoints = [\"host:port\", ...], not both".into())
        }
        _ => Err("give the relay's host and port, or endpoints = [\"host:port\", ...]".into()),
    }
}

/// The options for each endpoint, and which one is in use.
#[derive(Clone)]
pub struct Failover {
    options: Vec<MqttOptions>,
    at: usize,
}

impl Failover {
    /// One set of options per endpoint, in order (at least one).
    pub fn new(mut options: Vec<MqttOptions>) -> Failover {
        if options.len() > 1 {
            for o in &mut options {
                o.set_keep_alive(FAILOVER_KEEP_ALIVE);
            }
        }
        Failover { options, at: 0 }
    }

    /// The options of the endpoint in use.
    pub fn current(&self) -> &MqttOptions {
        &self.options[self.at]
    }

    pub fn len(&self) -> usize {
        self.options.len()
    }

    pub fn is_empty(&self) -> bool {
        self.options.is_empty()
    }

    /// Points `eventloop` at the next endpoint, dropping its connection (nothing with one).
    pub fn advance(&mut self, eventloop: &mut EventLoop) {
        if self.options.len() < 2 {
            return;
        }
        self.at = (self.at + 1) % self.options.len();
        eventloop.network = None;
        eventloop.mqtt_options = self.options[self.at].clone();
        let (host, port) = self.current().broker_address();
        tracing::info!(relay = %format!("{host}:{port}"), "trying the next relay");
    }

    /// `host:port` of every endpoint, for logs.
    pub fn describe(&self) -> String {
        self.options
            .iter()
            .map(|o| {
                let (h, p) = o.broker_address();
                format!("{h}:{p}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_form_or_the_other() {
        assert_eq!(
            endpoints(Some("r1"), Some(8883), &[]).unwrap(),
            vec![("r1".to_string(), 8883)]
        );
        assert_eq!(
            endpoints(None, None, &["r1:8883".into(), "[::1]:1883".into()]).unwrap(),
            vec![("r1".to_string(), 8883), ("::1".to_string(), 1883)]
        );
        assert!(endpoints(Some("r1"), Some(1), &["r2:1".into()]).is_err());
        assert!(endpoints(None, None, &[]).is_err());
        assert!(endpoints(Some("r1"), None, &[]).is_err());
        assert!(endpoints(None, None, &["r1".into()])
            .unwrap_err()
            .contains("no port"));
        assert!(endpoints(None, None, &["r1:x".into()])
            .unwrap_err()
            .contains("not a port"));
        assert!(endpoints(None, None, &[":1".into()])
            .unwrap_err()
            .contains("no host"));
    }
}
