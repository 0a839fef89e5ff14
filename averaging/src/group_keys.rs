//! Group keys (`{prefix}.0b{bits}`) and the Moshpit rotation of group bits.

use rand::{SeedableRng, rngs::StdRng};
use sha2::{Digest, Sha256};

/// The DHT key under which averagers with these group bits meet.
pub fn group_key(prefix: &str, bits: &str) -> String {
    format!("{prefix}.0b{bits}")
}

/// Whether `key` is a well-formed group key (`^[^.]+\.0b[01]*$`).
pub fn is_group_key(key: &str) -> bool {
    match key.split_once(".0b") {
        Some((prefix, bits)) => {
            !prefix.is_empty()
                && !prefix.contains('.')
                && bits.bytes().all(|b| b == b'0' || b == b'1')
        }
        None => false,
    }
}

/// Whether `bits` is a string of `0`/`1`.
pub fn is_group_bits(bits: &str) -> bool {
    bits.bytes().all(|b| b == b'0' || b == b'1')
}

/// Next group bits after a round in a group of `group_size` peers where this
/// peer had position `my_position`.
///
/// All group members seed the same generator with the group id and draw distinct
/// buckets, so groupmates land in different buckets next time (the Moshpit grid).
/// The length of the bits never changes.
pub fn next_group_bits(
    current: &str,
    group_id: &[u8],
    group_size: usize,
    my_position: usize,
    target_group_size: Option<usize>,
) -> String {
    if current.is_empty() || group_size == 0 || my_position >= group_size {
        return current.to_string();
    }
    let num_buckets = target_group_size
        .unwrap_or(group_size)
        .max(group_size)
        .next_power_of_two();
    let width = num_buckets.trailing_zeros() as usize;
    let seed: [u8; 32] = Sha256::digest(group_id).into();
    let mut rng = StdRng::from_seed(seed);
    let buckets = rand::seq::index::sample(&mut rng, num_buckets, group_size).into_vec();
    let idx = buckets[my_position];
    let new_bits = if width == 0 {
        String::new()
    } else {
        format!("{idx:0width$b}")
    };
    let joined = format!("{current}{new_bits}");
    joined[joined.len() - current.len()..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_format() {
        assert_eq!(group_key("run", "01"), "run.0b01");
        assert!(is_group_key("run.0b01"));
        assert!(is_group_key("run.0b"));
        assert!(!is_group_key("r.un.0b01"));
        assert!(!is_group_key("run.0b012"));
    }

    #[test]
    fn groupmates_move_to_distinct_buckets() {
        let gid = [7u8; 20];
        let next: Vec<String> = (0..2)
            .map(|p| next_group_bits("01", &gid, 2, p, Some(2)))
            .collect();
        assert_eq!(next[0].len(), 2);
        assert_ne!(next[0], next[1]);
        // The old last bit shifts left; the new bit is the bucket.
        assert!(next.iter().all(|b| b.starts_with('1')));
        assert_eq!(next_group_bits("", &gid, 2, 0, Some(2)), "");
        // Deterministic for everyone in the group.
        assert_eq!(next_group_bits("01", &gid, 2, 0, Some(2)), next[0]);
    }
}
