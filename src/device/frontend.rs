//! What the frontend tells the backend at connect time: its ABI, its rings and event channels.
//!
//! Owns: reading and validating the frontend's xenstore nodes (Linux blkfront's
//! `talk_to_blkback`, Xen's `blkif.h` "Frontend -> Backend" section).
//! Trusts: nothing; every node is untrusted text and every limit we advertised is enforced
//! (`max-ring-page-order`, `multi-queue-max-queues`).
//! Must never: map anything — it returns numbers; the queue setup maps them.

use thiserror::Error;

use crate::ring::Abi;

/// Limits the backend advertised at probe time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `max-ring-page-order` we wrote (0..=4).
    pub max_ring_page_order: u32,
    /// `multi-queue-max-queues` we wrote (>= 1).
    pub max_queues: u32,
    /// Whether we wrote `feature-persistent = 1`.
    pub persistent: bool,
}

/// One ring of the frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRing {
    /// Grant references of the ring pages, in order (`ring-ref` or `ring-ref0..N`).
    pub ring_refs: Vec<u32>,
    /// The frontend's unbound event channel port.
    pub event_channel: u32,
}

/// The validated frontend configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendConfig {
    /// Ring ABI (`protocol` node; x86_32 when absent, as Linux blkback does on x86).
    pub abi: Abi,
    /// Ring page order (pages per ring = 1 << order).
    pub ring_page_order: u32,
    /// Whether both ends use persistent grants.
    pub persistent: bool,
    /// One entry per queue.
    pub queues: Vec<QueueRing>,
}

/// The frontend's nodes do not describe a usable connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrontendError {
    /// A required node is absent.
    #[error("frontend node {0} is missing")]
    Missing(String),
    /// A node is not a number.
    #[error("frontend node {node} = {value:?} is not a number")]
    NotNumber {
        /// Node path, relative to the frontend directory.
        node: String,
        /// Its value.
        value: String,
    },
    /// An unknown `protocol`.
    #[error("frontend protocol {0:?} is not native, x86_32-abi or x86_64-abi")]
    UnknownProtocol(String),
    /// The ring order exceeds what we advertised.
    #[error("frontend ring-page-order {got} exceeds max-ring-page-order {max}")]
    RingOrderTooLarge {
        /// Requested order.
        got: u32,
        /// Our maximum.
        max: u32,
    },
    /// Zero queues or more than we advertised.
    #[error("frontend multi-queue-num-queues {got} is not in 1..={max}")]
    BadQueueCount {
        /// Requested count.
        got: u32,
        /// Our maximum.
        max: u32,
    },
}

fn number(
    read: &mut dyn FnMut(&str) -> Option<String>,
    node: &str,
) -> Result<Option<u32>, FrontendError> {
    match read(node) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<u32>()
            .map(Some)
            .map_err(|_| FrontendError::NotNumber {
                node: node.to_owned(),
                value: v,
            }),
    }
}

fn required(
    read: &mut dyn FnMut(&str) -> Option<String>,
    node: &str,
) -> Result<u32, FrontendError> {
    number(read, node)?.ok_or_else(|| FrontendError::Missing(node.to_owned()))
}

impl FrontendConfig {
    /// Reads the frontend's connect-time nodes through `read` (a path relative to the
    /// frontend's device directory, `None` when the node does not exist).
    pub fn read(
        read: &mut dyn FnMut(&str) -> Option<String>,
        limits: Limits,
    ) -> Result<FrontendConfig, FrontendError> {
        let abi = match read("protocol") {
            None => Abi::X86_32,
            Some(p) => match p.trim() {
                "x86_32-abi" => Abi::X86_32,
                "x86_64-abi" => Abi::X86_64,
                "native" | "" => Abi::Native,
                other => return Err(FrontendError::UnknownProtocol(other.to_owned())),
            },
        };
        let persistent = limits.persistent && number(read, "feature-persistent")? == Some(1);
        let nr_queues = number(read, "multi-queue-num-queues")?.unwrap_or(1);
        if nr_queues == 0 || nr_queues > limits.max_queues {
            return Err(FrontendError::BadQueueCount {
                got: nr_queues,
                max: limits.max_queues,
            });
        }
        // blkif.h: ring-page-order lives in the top directory even with several queues.
        let order = number(read, "ring-page-order")?.unwrap_or(0);
        if order > limits.max_ring_page_order {
            return Err(FrontendError::RingOrderTooLarge {
                got: order,
                max: limits.max_ring_page_order,
            });
        }
        let mut queues = Vec::new();
        for q in 0..nr_queues {
            let dir = if nr_queues == 1 {
                String::new()
            } else {
                format!("queue-{q}/")
            };
            let ring_refs = if order == 0 {
                // Older frontends write `ring-ref`; accept `ring-ref0` too (order 0 with the
                // multi-page naming, as some frontends do).
                let node = format!("{dir}ring-ref");
                match number(read, &node)? {
                    Some(r) => vec![r],
                    None => vec![required(read, &format!("{dir}ring-ref0"))?],
                }
            } else {
                let mut refs = Vec::new();
                for i in 0..(1u32 << order) {
                    refs.push(required(read, &format!("{dir}ring-ref{i}"))?);
                }
                refs
            };
            let event_channel = required(read, &format!("{dir}event-channel"))?;
            queues.push(QueueRing {
                ring_refs,
                event_channel,
            });
        }
        Ok(FrontendConfig {
            abi,
            ring_page_order: order,
            persistent,
            queues,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const LIMITS: Limits = Limits {
        max_ring_page_order: 4,
        max_queues: 4,
        persistent: true,
    };

    fn reader(nodes: &[(&str, &str)]) -> impl FnMut(&str) -> Option<String> {
        let map: HashMap<String, String> = nodes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn single_queue_order_zero_like_default_linux() {
        let mut r = reader(&[
            ("ring-ref", "8"),
            ("event-channel", "17"),
            ("protocol", "x86_64-abi"),
            ("feature-persistent", "1"),
        ]);
        let c = FrontendConfig::read(&mut r, LIMITS).unwrap();
        assert_eq!(c.abi, Abi::X86_64);
        assert!(c.persistent);
        assert_eq!(c.ring_page_order, 0);
        assert_eq!(
            c.queues,
            vec![QueueRing {
                ring_refs: vec![8],
                event_channel: 17
            }]
        );
    }

    #[test]
    fn multi_queue_multi_page() {
        let owned: Vec<(String, String)> = vec![
            ("multi-queue-num-queues".into(), "2".into()),
            ("ring-page-order".into(), "1".into()),
            ("queue-0/ring-ref0".into(), "10".into()),
            ("queue-0/ring-ref1".into(), "11".into()),
            ("queue-0/event-channel".into(), "5".into()),
            ("queue-1/ring-ref0".into(), "12".into()),
            ("queue-1/ring-ref1".into(), "13".into()),
            ("queue-1/event-channel".into(), "6".into()),
        ];
        let map: HashMap<String, String> = owned.into_iter().collect();
        let mut r = |k: &str| map.get(k).cloned();
        let c = FrontendConfig::read(&mut r, LIMITS).unwrap();
        assert_eq!(c.abi, Abi::X86_32, "no protocol node means x86_32 on x86");
        assert!(!c.persistent);
        assert_eq!(c.queues.len(), 2);
        assert_eq!(c.queues[1].ring_refs, vec![12, 13]);
        assert_eq!(c.queues[1].event_channel, 6);
    }

    #[test]
    fn limits_are_enforced() {
        let mut r = reader(&[
            ("ring-page-order", "5"),
            ("ring-ref0", "1"),
            ("event-channel", "2"),
        ]);
        assert_eq!(
            FrontendConfig::read(&mut r, LIMITS),
            Err(FrontendError::RingOrderTooLarge { got: 5, max: 4 })
        );
        let mut r = reader(&[("multi-queue-num-queues", "0")]);
        assert!(matches!(
            FrontendConfig::read(&mut r, LIMITS),
            Err(FrontendError::BadQueueCount { got: 0, .. })
        ));
        let mut r = reader(&[("multi-queue-num-queues", "99")]);
        assert!(matches!(
            FrontendConfig::read(&mut r, LIMITS),
            Err(FrontendError::BadQueueCount { got: 99, .. })
        ));
    }

    #[test]
    fn garbage_nodes_are_named() {
        let mut r = reader(&[("ring-ref", "x"), ("event-channel", "2")]);
        assert!(matches!(
            FrontendConfig::read(&mut r, LIMITS),
            Err(FrontendError::NotNumber { .. })
        ));
        let mut r = reader(&[("ring-ref", "1")]);
        assert_eq!(
            FrontendConfig::read(&mut r, LIMITS),
            Err(FrontendError::Missing("event-channel".into()))
        );
        let mut r = reader(&[
            ("protocol", "sparc"),
            ("ring-ref", "1"),
            ("event-channel", "2"),
        ]);
        assert!(matches!(
            FrontendConfig::read(&mut r, LIMITS),
            Err(FrontendError::UnknownProtocol(_))
        ));
    }

    #[test]
    fn persistent_only_when_we_offered_it() {
        let mut r = reader(&[
            ("ring-ref", "8"),
            ("event-channel", "17"),
            ("feature-persistent", "1"),
        ]);
        let limits = Limits {
            persistent: false,
            ..LIMITS
        };
        assert!(!FrontendConfig::read(&mut r, limits).unwrap().persistent);
    }
}
