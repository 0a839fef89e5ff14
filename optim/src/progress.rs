//! The progress record every training peer publishes under `{prefix}_progress`.

use validator::{Validate, ValidationError};

/// Largest throughput a record may claim (samples per second). Anything above is treated
/// as a lie: no machine processes a billion samples per second.
pub const MAX_SAMPLES_PER_SECOND: f64 = 1e9;

/// One peer's training progress, as stored in the DHT (MessagePack, schema-checked).
///
/// The reference's `TrainingState` / `LocalTrainingProgress`: strict types, non-negative
/// counters; in addition throughput and time must be finite (NaN passes a plain range
/// check, so it gets its own).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Validate)]
#[serde(deny_unknown_fields)]
pub struct TrainingProgress {
    /// The peer's network identity (its libp2p peer id, base58), used by averaging and
    /// monitoring. It must be the peer id of the record's owner key: the DHT board drops
    /// a record that names any other peer.
    #[validate(length(min = 1, max = 128))]
    pub peer_id: String,
    /// The peer's local optimizer step.
    pub step: u64,
    /// Samples it accumulated toward `step + 1`.
    pub samples_accumulated: u64,
    /// Its measured throughput.
    #[validate(custom(function = "validate_samples_per_second"))]
    pub samples_per_second: f64,
    /// The DHT time (Unix seconds) at which the record was made.
    #[validate(custom(function = "validate_time"))]
    pub time: f64,
    /// Whether the peer runs in client mode (does not count toward the global step).
    pub client_mode: bool,
}

fn validate_samples_per_second(v: f64) -> Result<(), ValidationError> {
    if v.is_finite() && (0.0..=MAX_SAMPLES_PER_SECOND).contains(&v) {
        Ok(())
    } else {
        Err(ValidationError::new("samples_per_second_out_of_range"))
    }
}

fn validate_time(v: f64) -> Result<(), ValidationError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(ValidationError::new("time_not_finite"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> TrainingProgress {
        TrainingProgress {
            peer_id: "12D3KooW".into(),
            step: 3,
            samples_accumulated: 10,
            samples_per_second: 5.0,
            time: 1000.0,
            client_mode: false,
        }
    }

    #[test]
    fn a_sane_record_validates() {
        record().validate().unwrap();
    }

    #[test]
    fn absurd_values_are_rejected() {
        for sps in [f64::NAN, f64::INFINITY, -1.0, 2e9] {
            let r = TrainingProgress {
                samples_per_second: sps,
                ..record()
            };
            assert!(r.validate().is_err(), "sps {sps}");
        }
        for time in [f64::NAN, f64::NEG_INFINITY, -3.0] {
            let r = TrainingProgress { time, ..record() };
            assert!(r.validate().is_err(), "time {time}");
        }
        let r = TrainingProgress {
            peer_id: String::new(),
            ..record()
        };
        assert!(r.validate().is_err());
        let r = TrainingProgress {
            peer_id: "x".repeat(500),
            ..record()
        };
        assert!(r.validate().is_err());
    }
}
