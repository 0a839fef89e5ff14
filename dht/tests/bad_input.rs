//! Bad input: every kind is rejected (locally, on storing nodes, and on
//! readers) with a log line, the nodes keep serving, nothing valid is lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use colony_dht::{
    Dht, DhtError, DhtRecord, DhtValue, Ed25519SignatureValidator, RecordValidator,
    SIGNATURE_PREFIX, SchemaRecordValidator, ValidationError, WireEntry, encode_wire,
};
use colony_schema::{Checked, OwnerKey, SchemaValidator};
use common::{attacker::Attacker, expires_in, msgpack, secret, swarm};
use futures::AsyncWriteExt;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use validator::Validate;

#[derive(Debug, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields)]
struct Progress {
    #[validate(range(min = 0))]
    samples: i64,
}

#[derive(Debug, Default, Serialize, Deserialize, Validate)]
#[serde(default, deny_unknown_fields)]
struct RunSchema {
    progress: BTreeMap<OwnerKey, Option<Checked<Progress>>>,
    step: Option<u64>,
}

const SEED: u64 = 7;
const KEY: &[u8] = b"run_progress";

fn entry(subkey: Option<&[u8]>, value: Vec<u8>, expiration: f64) -> Vec<u8> {
    encode_wire(&[WireEntry {
        subkey: subkey.map(|s| ByteBuf::from(s.to_vec())),
        value: ByteBuf::from(value),
        expiration,
    }])
}

/// `value` with the trailer of a signature made by `signer` over `signed`.
fn with_signature_of(
    signer: &Ed25519SignatureValidator,
    signed: &DhtRecord,
    value: &[u8],
) -> Vec<u8> {
    let sig = signer.sign_value(signed).unwrap();
    let trailer = &sig[sig.len() - colony_dht::SIGNATURE_TRAILER_LEN..];
    assert!(trailer.starts_with(SIGNATURE_PREFIX));
    [value, trailer].concat()
}

async fn wait_rejections(node: &Dht, at_least: u64) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while node.stats().await.unwrap().rejected_inbound < at_least {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("rejections not observed");
}

fn progress(samples: i64) -> Vec<u8> {
    colony_schema::to_msgpack(&Progress { samples }).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_everywhere_and_nothing_valid_is_lost() {
    common::init_tracing();
    let test = async {
        let (servers, _) = swarm(SEED, 5, 0).await;
        let schema = SchemaValidator::for_schema::<RunSchema>(Some("run")).unwrap();
        for s in &servers {
            s.add_validator(Arc::new(SchemaRecordValidator::new(schema.clone())));
        }
        let (alice, bob, carol) = (&servers[1], &servers[2], &servers[3]);
        let alice_signer = Ed25519SignatureValidator::new(&secret(SEED, 1));
        let bob_signer = Ed25519SignatureValidator::new(&secret(SEED, 2));
        let exp = expires_in(600.0);
        let good = alice
            .store(KEY, Some(&alice.owner_subkey()), progress(5), exp)
            .await
            .unwrap();
        assert!(good.is_stored());

        // --- Rejected by the writer's own checks, with typed errors.
        let rejected = |r: Result<_, DhtError>| match r {
            Err(DhtError::Rejected(e)) => e,
            other => panic!("expected a rejection, got {other:?}"),
        };
        let e = rejected(
            bob.store(KEY, Some(&alice.owner_subkey()), progress(6), exp + 1.0)
                .await,
        );
        assert_eq!(e, ValidationError::MissingSignature);
        let e = rejected(
            bob.store(b"other", None, msgpack(&1), expires_in(-1.0))
                .await,
        );
        assert!(matches!(e, ValidationError::Expiration { .. }));
        let e = rejected(
            bob.store(b"other", None, msgpack(&1), expires_in(1e9))
                .await,
        );
        assert!(matches!(e, ValidationError::Expiration { .. }));
        let e = rejected(
            bob.store(b"other", None, vec![0xc4; 100 * 1024], expires_in(60.0))
                .await,
        );
        assert!(matches!(e, ValidationError::ValueTooLarge { .. }));
        let e = rejected(
            bob.store(KEY, Some(&bob.owner_subkey()), progress(-3), exp)
                .await,
        );
        assert!(matches!(e, ValidationError::Schema(_)));
        let e = rejected(
            bob.store(b"run_step", None, msgpack(&"not an int"), exp)
                .await,
        );
        assert!(matches!(e, ValidationError::Schema(_)));

        // --- Raw records pushed straight to the storing nodes by a hostile peer.
        let mut mallory = Attacker::new().await;
        for s in &servers {
            mallory
                .connect(s.listen_addrs()[0].clone(), s.peer_id())
                .await;
        }
        let asub = alice.owner_subkey();
        let forged_sig = [
            progress(100),
            SIGNATURE_PREFIX.to_vec(),
            vec![7u8; 64],
            b"]".to_vec(),
        ]
        .concat();
        let other_value = {
            let signed = DhtRecord {
                key: KEY.to_vec(),
                subkey: Some(asub.clone()),
                value: progress(1),
                expiration: exp + 5.0,
            };
            with_signature_of(&alice_signer, &signed, &progress(100))
        };
        let signed_by_bob = {
            let signed = DhtRecord {
                key: KEY.to_vec(),
                subkey: Some(bob.owner_subkey()),
                value: progress(100),
                expiration: exp + 5.0,
            };
            with_signature_of(&bob_signer, &signed, &progress(100))
        };
        let bad_records: Vec<(&[u8], Vec<u8>)> = vec![
            (KEY, entry(Some(&asub), forged_sig.clone(), exp + 5.0)), // forged signature
            (KEY, entry(Some(&asub), other_value, exp + 5.0)), // signature over another value
            (KEY, entry(Some(&asub), signed_by_bob.clone(), exp + 5.0)), // names Alice, signed by Bob
            (KEY, entry(Some(&asub), progress(100), exp + 5.0)), // overwrite without signature
            (b"free", entry(None, msgpack(&1), expires_in(-5.0))), // already expired
            (b"free", entry(None, msgpack(&1), expires_in(1e9))), // absurd expiration
            (b"free", entry(None, msgpack(&1), f64::NAN)),       // NaN expiration
            (
                b"free",
                entry(None, vec![0xc4; 70 * 1024], expires_in(60.0)),
            ), // oversized
            (b"free", b"\xde\xad\xbe\xef garbage".to_vec()),     // malformed bytes
            (b"run_step", entry(None, msgpack(&"x"), expires_in(60.0))), // schema violation
        ];
        let n_bad = bad_records.len() as u64;
        for s in &servers {
            for (key, bytes) in &bad_records {
                mallory.put_to(s.peer_id(), key, bytes.clone()).await;
            }
        }
        for s in &servers {
            wait_rejections(s, n_bad).await;
        }

        // Alice leaves; her subkey still cannot be overwritten.
        alice.shutdown().await;
        let e = rejected(bob.store(KEY, Some(&asub), progress(9), exp + 10.0).await);
        assert_eq!(e, ValidationError::MissingSignature);

        // --- A hostile replica serves forged data to readers.
        mallory.hold(KEY, entry(Some(&asub), forged_sig, exp + 50.0));
        mallory.hold(b"free", entry(None, msgpack(&"evil"), expires_in(1e9)));

        // Garbage on the kad protocol itself.
        let (mut control, task) = mallory.serve();
        // Mallory answers again, so the put to every replica completes quickly.
        let honest_free = carol
            .store(b"free", None, msgpack(&"honest"), expires_in(60.0))
            .await
            .unwrap();
        assert!(honest_free.is_stored());
        let mut stream = control
            .open_stream(carol.peer_id(), colony_dht::KAD_PROTOCOL)
            .await
            .expect("raw kad stream");
        stream.write_all(&[0xff; 4096]).await.ok();
        stream.close().await.ok();

        for reader in [&servers[0], bob, carol, &servers[4]] {
            let got = reader.get(KEY, true).await.unwrap().expect("found");
            let dict = got.as_dictionary().unwrap();
            assert_eq!(dict.len(), 1, "only Alice's signed subkey");
            assert_eq!(dict[&asub].value, progress(5));
            assert_eq!(dict[&asub].expiration, exp);
            match reader.get(b"free", true).await.unwrap() {
                Some(DhtValue::Regular { value, .. }) => assert_eq!(value, msgpack(&"honest")),
                other => panic!("free: {other:?}"),
            }
            assert_eq!(reader.get(b"run_step", true).await.unwrap(), None);
        }
        let read_rejections: u64 = {
            let mut total = 0;
            for r in [&servers[0], bob, carol, &servers[4]] {
                total += r.stats().await.unwrap().rejected_on_read;
            }
            total
        };
        assert!(
            read_rejections >= 4,
            "readers dropped the forged replica's data ({read_rejections})"
        );
        task.abort();
        for s in &servers {
            s.shutdown().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(150), test)
        .await
        .expect("test timed out");
}
