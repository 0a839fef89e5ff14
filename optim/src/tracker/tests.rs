use super::*;

const NOW: f64 = 10_000.0;
const ME: &[u8] = b"me";

fn config() -> OptimConfig {
    OptimConfig::new("run", 100)
}

fn local(step: u64, samples: u64, sps: f64) -> LocalProgress {
    LocalProgress {
        step,
        samples_accumulated: samples,
        samples_per_second: sps,
        client_mode: false,
    }
}

fn peer(key: &str, step: u64, samples: u64, sps: f64, time: f64) -> PeerRecord {
    PeerRecord {
        key: key.as_bytes().to_vec(),
        progress: Some(TrainingProgress {
            peer_id: format!("peer-{key}"),
            step,
            samples_accumulated: samples,
            samples_per_second: sps,
            time,
            client_mode: false,
        }),
        expiration: NOW + 30.0,
    }
}

fn client(key: &str, step: u64, samples: u64, sps: f64) -> PeerRecord {
    let mut r = peer(key, step, samples, sps, NOW);
    if let Some(p) = r.progress.as_mut() {
        p.client_mode = true;
    }
    r
}

#[test]
fn no_peers_uses_local_samples_and_default_refresh() {
    let s = estimate_collaboration_state(&config(), &local(7, 40, 10.0), ME, &[], NOW);
    assert_eq!(s.optimizer_step, 7);
    assert_eq!(s.samples_accumulated, 40);
    assert_eq!(s.num_peers, 1);
    assert_eq!(s.num_clients, 0);
    // (100 - 40) / 10 = 6 s: samples, not the number of step() calls.
    assert!((s.eta_next_step - (NOW + 6.0)).abs() < 1e-9);
    assert_eq!(s.next_fetch_time, NOW + 3.0);
    assert_eq!(plan_step(&config(), 7, 40, &s), StepPlan::StepAlone);
    assert!(!s.ready_for_step(7, NOW));
    assert!(s.ready_for_step(7, NOW + 6.0));
}

#[test]
fn no_peers_and_no_throughput_waits_for_samples_instead_of_dividing_by_zero() {
    let s = estimate_collaboration_state(&config(), &local(0, 0, 0.0), ME, &[], NOW);
    assert!(s.eta_next_step.is_infinite());
    assert!(!s.ready_for_step(0, NOW + 1e9));
    let done = estimate_collaboration_state(&config(), &local(0, 150, 0.0), ME, &[], NOW);
    assert_eq!(done.eta_next_step, NOW);
    assert!(done.ready_for_step(0, NOW));
}

#[test]
fn own_record_is_replaced_by_live_progress() {
    let mut mine = peer("me", 0, 99, 1000.0, NOW);
    mine.key = ME.to_vec();
    let s = estimate_collaboration_state(&config(), &local(0, 5, 1.0), ME, &[mine], NOW);
    assert_eq!(s.num_peers, 1);
    assert_eq!(s.samples_accumulated, 5);
}

#[test]
fn samples_of_peers_at_the_global_step_are_summed_with_extrapolation() {
    let records = [
        peer("a", 3, 20, 10.0, NOW - 1.0),
        peer("b", 3, 30, 10.0, NOW),
    ];
    let s = estimate_collaboration_state(&config(), &local(3, 10, 10.0), ME, &records, NOW);
    assert_eq!(s.optimizer_step, 3);
    assert_eq!(s.num_peers, 3);
    assert_eq!(s.samples_accumulated, 60);
    assert!((s.samples_per_second - 30.0).abs() < 1e-9);
    // Estimated 60 + 1 s x 10 = 70 now; 30 left at 30/s: one second.
    assert!((s.eta_next_step - (NOW + 1.0)).abs() < 1e-9);
    // Refresh: 1 s x 3 / max(3 + 3, 3.6) = 0.5 s (also the minimum).
    assert!((s.next_fetch_time - (NOW + 0.5)).abs() < 1e-9);
    assert_eq!(
        plan_step(&config(), 3, 10, &s),
        StepPlan::Average { weight: 10.0 }
    );
}

#[test]
fn refresh_period_is_clipped_to_the_maximum() {
    let records = [peer("a", 0, 0, 0.001, NOW)];
    let s = estimate_collaboration_state(&config(), &local(0, 0, 0.001), ME, &records, NOW);
    assert_eq!(s.next_fetch_time, NOW + 30.0);
    let mut c = config();
    c.max_refresh_period = 10.0;
    let s = estimate_collaboration_state(&c, &local(0, 0, 0.001), ME, &records, NOW);
    assert_eq!(s.next_fetch_time, NOW + 10.0);
}

#[test]
fn refresh_period_follows_expected_drift() {
    // 10 peers, ETA 10 s: 10 x 10 / max(13, 12) = 7.69 s.
    let records: Vec<PeerRecord> = (0..9)
        .map(|i| peer(&format!("p{i}"), 0, 0, 1.0, NOW))
        .collect();
    let s = estimate_collaboration_state(&config(), &local(0, 0, 1.0), ME, &records, NOW);
    assert_eq!(s.num_peers, 10);
    assert!((s.eta_next_step - (NOW + 10.0)).abs() < 1e-9);
    assert!((s.next_fetch_time - (NOW + 100.0 / 13.0)).abs() < 1e-9);
    let mut c = config();
    c.expected_drift_peers = 0.0;
    c.expected_drift_rate = 1.0;
    let s = estimate_collaboration_state(&c, &local(0, 0, 1.0), ME, &records, NOW);
    assert!((s.next_fetch_time - (NOW + 5.0)).abs() < 1e-9);
}

#[test]
fn peers_at_older_steps_count_throughput_but_not_samples() {
    let records = [peer("a", 4, 50, 10.0, NOW), peer("b", 5, 30, 10.0, NOW)];
    let s = estimate_collaboration_state(&config(), &local(5, 10, 10.0), ME, &records, NOW);
    assert_eq!(s.optimizer_step, 5);
    assert_eq!(s.samples_accumulated, 40);
    assert!((s.samples_per_second - 30.0).abs() < 1e-9);
}

#[test]
fn local_peer_behind_within_tolerance_stays_synchronized_and_is_ready() {
    let records = [peer("a", 6, 0, 10.0, NOW), peer("b", 6, 0, 10.0, NOW)];
    let s = estimate_collaboration_state(&config(), &local(5, 0, 10.0), ME, &records, NOW);
    assert_eq!(s.optimizer_step, 6);
    assert!(s.is_synchronized(5, 1));
    // The swarm moved on: this peer should take its step now rather than wait.
    assert!(s.ready_for_step(5, NOW));
    assert!(
        matches!(plan_step(&config(), 5, 0, &s), StepPlan::Average { weight } if weight == 0.0)
    );
    // It jumps to the swarm's step, so its samples count there; after the step it is one
    // past it. Stepping alone behind the swarm lands on the swarm's step.
    assert_eq!(catch_up(5, 6, 1), Some(6));
    assert_eq!(catch_up(6, 6, 1), Some(6));
    assert_eq!(catch_up(7, 6, 1), Some(7));
    assert_eq!(catch_up(4, 6, 1), None);
    assert_eq!(catch_up(4, 6, 2), Some(6));
    assert_eq!(next_local_step(6, 6), 7);
    assert_eq!(next_local_step(5, 7), 7);
    assert_eq!(next_local_step(u64::MAX, 0), u64::MAX);
}

#[test]
fn local_peer_out_of_sync_loads_state() {
    let records = [peer("a", 9, 0, 10.0, NOW), peer("b", 9, 0, 10.0, NOW)];
    let s = estimate_collaboration_state(&config(), &local(5, 0, 10.0), ME, &records, NOW);
    assert!(!s.is_synchronized(5, 1));
    assert_eq!(plan_step(&config(), 5, 0, &s), StepPlan::LoadState);
    let mut c = config();
    c.step_tolerance = 4;
    assert!(matches!(plan_step(&c, 5, 0, &s), StepPlan::Average { .. }));
}

#[test]
fn clients_only_do_not_move_the_global_step() {
    let records = [client("c1", 50, 40, 10.0), client("c2", 50, 20, 10.0)];
    let s = estimate_collaboration_state(&config(), &local(2, 10, 10.0), ME, &records, NOW);
    assert_eq!(s.optimizer_step, 2);
    assert_eq!(s.num_peers, 3);
    assert_eq!(s.num_clients, 2);
    // Their samples are at step 50, not at the global step 2.
    assert_eq!(s.samples_accumulated, 10);
    assert!(s.is_synchronized(2, 1));
}

#[test]
fn clients_at_the_global_step_contribute_samples() {
    let records = [client("c1", 2, 40, 10.0), peer("a", 2, 20, 10.0, NOW)];
    let s = estimate_collaboration_state(&config(), &local(2, 10, 10.0), ME, &records, NOW);
    assert_eq!(s.samples_accumulated, 70);
    assert_eq!(s.num_clients, 1);
}

#[test]
fn local_client_counts_itself() {
    let mut me = local(0, 5, 1.0);
    me.client_mode = true;
    let s = estimate_collaboration_state(&config(), &me, ME, &[], NOW);
    assert_eq!(s.num_clients, 1);
    let s = estimate_collaboration_state(&config(), &me, ME, &[peer("a", 0, 0, 1.0, NOW)], NOW);
    assert_eq!((s.num_peers, s.num_clients), (2, 1));
}

#[test]
fn expired_goodbye_and_undecodable_records_are_ignored() {
    let mut expired = peer("a", 0, 90, 10.0, NOW);
    expired.expiration = NOW;
    let goodbye = PeerRecord {
        key: b"b".to_vec(),
        progress: None,
        expiration: NOW + 60.0,
    };
    let s =
        estimate_collaboration_state(&config(), &local(0, 1, 1.0), ME, &[expired, goodbye], NOW);
    assert_eq!(s.num_peers, 1);
    assert_eq!(s.samples_accumulated, 1);
    assert_eq!(s.rejected_records, 0);
    assert_eq!(s.next_fetch_time, NOW + 3.0);
}

#[test]
fn absurd_records_are_rejected() {
    let nan = peer("a", 0, 10, f64::NAN, NOW);
    let inf = peer("b", 0, 10, f64::INFINITY, NOW);
    let negative_sps = peer("c", 0, 10, -5.0, NOW);
    let future = peer("d", 0, 10, 1.0, NOW + 3600.0);
    let stale = peer("e", 0, 10, 1.0, NOW - 3600.0);
    let nan_time = peer("f", 0, 10, 1.0, f64::NAN);
    let records = [nan, inf, negative_sps, future, stale, nan_time];
    let s = estimate_collaboration_state(&config(), &local(0, 1, 1.0), ME, &records, NOW);
    assert_eq!(s.rejected_records, 6);
    assert_eq!(s.num_peers, 1);
    assert_eq!(s.samples_accumulated, 1);
}

#[test]
fn one_peer_claiming_a_far_future_step_cannot_hijack_the_swarm() {
    let records = [
        peer("liar", u64::MAX, 0, 1.0, NOW),
        peer("a", 3, 10, 1.0, NOW),
        peer("b", 3, 10, 1.0, NOW),
    ];
    let s = estimate_collaboration_state(&config(), &local(3, 10, 1.0), ME, &records, NOW);
    assert_eq!(s.optimizer_step, 3);
    assert!(s.is_synchronized(3, 1));
    assert_eq!(s.samples_accumulated, 30);
    // Two honest peers agreeing on a later step do move it (late joiner catches up).
    let records = [peer("a", 40, 0, 1.0, NOW), peer("b", 40, 0, 1.0, NOW)];
    let s = estimate_collaboration_state(&config(), &local(0, 0, 1.0), ME, &records, NOW);
    assert_eq!(s.optimizer_step, 40);
    assert_eq!(plan_step(&config(), 0, 0, &s), StepPlan::LoadState);
    // With a single other peer its word is taken.
    let s = estimate_collaboration_state(&config(), &local(0, 0, 1.0), ME, &records[..1], NOW);
    assert_eq!(s.optimizer_step, 40);
}

#[test]
fn claimed_samples_are_capped_at_a_share_of_the_target() {
    let records = [
        peer("a", 0, u64::MAX, 1.0, NOW),
        peer("b", 0, u64::MAX, 1.0, NOW),
    ];
    let s = estimate_collaboration_state(&config(), &local(0, 0, 1.0), ME, &records, NOW);
    // Three peers: at most 2 · 100 / 3 = 66 samples each.
    assert_eq!(s.samples_accumulated, 132);
    assert_eq!(s.bounded_claims, 2);
}

/// `n` honest peers at `step` with 10 samples each, then `sybils` identities claiming
/// `u64::MAX`.
fn swarm_with_sybils(honest: usize, sybils: usize, step: u64) -> Vec<PeerRecord> {
    let mut records: Vec<PeerRecord> = (0..honest)
        .map(|i| peer(&format!("h{i}"), step, 10, 5.0, NOW))
        .collect();
    records.extend((0..sybils).map(|i| peer(&format!("sybil{i}"), u64::MAX, 0, 5.0, NOW)));
    records
}

#[test]
fn two_or_three_sybils_claiming_u64_max_do_not_move_the_global_step() {
    // Two Sybils beside two honest peers: the default quorum of 2 used to take them.
    let s = estimate_collaboration_state(
        &config(),
        &local(7, 10, 5.0),
        ME,
        &swarm_with_sybils(2, 2, 7),
        NOW,
    );
    assert_eq!(s.optimizer_step, 7);
    assert_eq!(s.ignored_steps, 2);
    assert_eq!(
        plan_step(&config(), 7, 10, &s),
        StepPlan::Average { weight: 10.0 }
    );
    // Three Sybils beside three honest peers.
    let s = estimate_collaboration_state(
        &config(),
        &local(7, 10, 5.0),
        ME,
        &swarm_with_sybils(3, 3, 7),
        NOW,
    );
    assert_eq!(s.optimizer_step, 7);
    assert_eq!(s.ignored_steps, 3);
    assert!(s.is_synchronized(7, 1));
    // Sybils just under the outlier ceiling need a quorum that grows with the swarm:
    // three of seven others claiming step 10 (7 + tolerance 1 + margin 2) do not move it.
    let mut records = swarm_with_sybils(4, 0, 7);
    records.extend((0..3).map(|i| peer(&format!("near{i}"), 10, 0, 5.0, NOW)));
    let s = estimate_collaboration_state(&config(), &local(7, 10, 5.0), ME, &records, NOW);
    assert_eq!(s.optimizer_step, 7);
    assert_eq!(s.ignored_steps, 0);
}

#[test]
fn a_late_joiner_still_follows_the_swarm_to_a_far_step() {
    // Every other peer is far ahead: the median is theirs, so nothing is ignored.
    let records = swarm_with_sybils(3, 0, 5000);
    let s = estimate_collaboration_state(&config(), &local(0, 0, 5.0), ME, &records, NOW);
    assert_eq!(s.optimizer_step, 5000);
    assert_eq!(plan_step(&config(), 0, 0, &s), StepPlan::LoadState);
    // One honest peer just stepped, the others' records are older: the step moves once a
    // quorum (here 2 of 3) reports it.
    let mut records = swarm_with_sybils(2, 0, 9);
    records.push(peer("ahead", 10, 0, 5.0, NOW));
    let s = estimate_collaboration_state(&config(), &local(9, 0, 5.0), ME, &records, NOW);
    assert_eq!(s.optimizer_step, 9);
    records[0] = peer("h0", 10, 0, 5.0, NOW);
    let s = estimate_collaboration_state(&config(), &local(9, 0, 5.0), ME, &records, NOW);
    assert_eq!(s.optimizer_step, 10);
}

#[test]
fn one_record_claiming_the_whole_target_does_not_make_the_swarm_ready() {
    let mut c = config();
    c.target_batch_size = 4096;
    // Three honest peers with 100 samples each at 50 samples/s, and a liar.
    let mut records: Vec<PeerRecord> = (0..3)
        .map(|i| peer(&format!("h{i}"), 3, 100, 50.0, NOW))
        .collect();
    records.push(peer("liar", 3, 4096, 50.0, NOW));
    let me = local(3, 100, 50.0);
    // A peer with no history: the share cap, 2 · 4096 / 5 = 1638.
    let s = estimate_collaboration_state(&c, &me, ME, &records, NOW);
    assert_eq!(s.samples_accumulated, 400 + 1638);
    assert!(!s.ready_for_step(3, NOW), "{s:?}");
    assert_eq!(s.bounded_claims, 1);

    // A peer that saw the swarm reach step 3 two seconds ago also bounds the claim by
    // the liar's throughput: 50 · (2 + 10 s of slack) = 600.
    let mut ledger = ClaimLedger::default();
    let honest_only = &records[..3];
    ledger.estimate(
        &c,
        &local(2, 0, 50.0),
        ME,
        &swarm_with_sybils(3, 0, 2),
        NOW - 2.0,
    );
    let s = ledger.estimate(&c, &me, ME, honest_only, NOW - 2.0);
    assert_eq!(s.optimizer_step, 3);
    let s = ledger.estimate(&c, &me, ME, &records, NOW);
    assert_eq!(s.samples_accumulated, 400 + 600);
    assert_eq!(s.bounded_claims, 1, "only the liar is bounded");
    assert!(!s.ready_for_step(3, NOW));
    // A fresh identity a second later gets no more than what its throughput allows.
    records.push(peer("sybil", 3, 4096, 50.0, NOW + 1.0));
    let s = ledger.estimate(&c, &me, ME, &records, NOW + 1.0);
    // The liar's record is a second old: 600; the Sybil's is new: 50 · (3 + 10) = 650.
    assert_eq!(s.samples_accumulated, 400 + 600 + 650);
    assert!(!s.ready_for_step(3, NOW + 1.0));
}

#[test]
fn honest_peers_accumulating_at_their_rate_are_never_bounded() {
    let mut c = config();
    // Large enough that nobody passes its share of the target before t = 100.
    c.target_batch_size = 30_000;
    // Throughputs within the share cap (2 / 5 of the swarm each). A peer faster than
    // that is counted at 2/n of the target: the swarm then steps a little later than
    // the target, never earlier (the same bound as its averaging weight).
    let rates = [40.0, 50.0, 60.0, 80.0];
    let mut ledger = ClaimLedger::default();
    // Step 0 for a while before this peer arrives, then the swarm steps at t = 100.
    let mut global = 0;
    for tick in 0..60 {
        let t = NOW + f64::from(tick) * 5.0;
        let (step, start) = if t < NOW + 100.0 {
            (0, NOW - 40.0)
        } else {
            (1, NOW + 100.0)
        };
        let records: Vec<PeerRecord> = rates
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                // Each reports a little late (up to 3 s), as records are republished.
                let reported = t - f64::from(u32::try_from(i).unwrap_or(0) % 4);
                let samples = (r * (reported - start)).max(0.0) as u64;
                peer(&format!("p{i}"), step, samples, r, reported)
            })
            .collect();
        let s = ledger.estimate(&c, &local(step, 0, 10.0), ME, &records, t);
        assert_eq!(s.bounded_claims, 0, "tick {tick}: {s:?}");
        global = s.optimizer_step;
    }
    assert_eq!(global, 1);
}

#[test]
fn throughput_outliers_are_capped_at_a_multiple_of_the_median() {
    let records = [peer("liar", 0, 0, 1e9, NOW), peer("a", 0, 0, 10.0, NOW)];
    let s = estimate_collaboration_state(&config(), &local(0, 0, 10.0), ME, &records, NOW);
    // Median 10, cap 100: total 100 + 10 + 10.
    assert!((s.samples_per_second - 120.0).abs() < 1e-9);
    assert!((s.eta_next_step - (NOW + 100.0 / 120.0)).abs() < 1e-9);
}

#[test]
fn extrapolation_is_bounded_by_the_metadata_expiration() {
    let mut c = config();
    c.metadata_expiration = 10.0;
    c.target_batch_size = 1_000_000;
    // A record 9 s old at 1000 samples/s: +9000 samples, but never more than 10 s worth.
    let records = [peer("a", 0, 0, 1000.0, NOW - 9.0)];
    let s = estimate_collaboration_state(&c, &local(0, 0, 0.0), ME, &records, NOW);
    let eta = s.eta_next_step - NOW;
    assert!(
        (eta - (1_000_000.0 - 9000.0) / 1000.0).abs() < 1e-6,
        "{eta}"
    );
}

#[test]
fn register_step_resets_samples_and_eta() {
    let records = [peer("a", 3, 50, 10.0, NOW)];
    let mut s = estimate_collaboration_state(&config(), &local(3, 60, 10.0), ME, &records, NOW);
    assert!(s.ready_for_step(3, NOW));
    s.register_step(4);
    assert_eq!(s.optimizer_step, 4);
    assert_eq!(s.samples_accumulated, 0);
    assert!(!s.ready_for_step(4, NOW + 1e6));
    s.register_step(2);
    assert_eq!(s.optimizer_step, 4);
}

#[test]
fn averaging_weight_is_the_raw_sample_count_whatever_the_view() {
    // Two peers with different views of the swarm size still weight by samples alone.
    let small = estimate_collaboration_state(&config(), &local(0, 30, 1.0), ME, &[], NOW);
    let records = [peer("a", 0, 10, 1.0, NOW), peer("b", 0, 10, 1.0, NOW)];
    let large = estimate_collaboration_state(&config(), &local(0, 30, 1.0), ME, &records, NOW);
    assert_eq!(small.num_peers, 1);
    assert_eq!(plan_step(&config(), 0, 30, &small), StepPlan::StepAlone);
    assert_eq!(
        plan_step(&config(), 0, 30, &large),
        StepPlan::Average { weight: 30.0 }
    );
}

#[test]
fn report_is_due_at_half_the_expiration() {
    assert_eq!(next_report_time(&config(), 100.0), 130.0);
}

#[test]
fn the_state_machine_is_deterministic_and_bounded_for_any_input() {
    use proptest::prelude::*;
    let strategy = proptest::collection::vec(
        (
            any::<u64>(),
            any::<u64>(),
            any::<f64>(),
            -1e6f64..1e6,
            any::<bool>(),
            any::<bool>(),
        ),
        0..12,
    );
    proptest!(|(raw in strategy, local_step in 0u64..1000, local_samples in any::<u64>())| {
        let records: Vec<PeerRecord> = raw
            .iter()
            .enumerate()
            .map(|(i, &(step, samples, sps, dt, client, nil))| PeerRecord {
                key: vec![i as u8],
                progress: (!nil).then(|| TrainingProgress {
                    peer_id: format!("p{i}"),
                    step,
                    samples_accumulated: samples,
                    samples_per_second: sps,
                    time: NOW + dt,
                    client_mode: client,
                }),
                expiration: NOW + 1.0,
            })
            .collect();
        let me = local(local_step, local_samples, 5.0);
        let a = estimate_collaboration_state(&config(), &me, ME, &records, NOW);
        let b = estimate_collaboration_state(&config(), &me, ME, &records, NOW);
        prop_assert_eq!(&a, &b);
        prop_assert!(a.num_peers >= 1 && a.num_peers <= records.len() + 1);
        prop_assert!(a.optimizer_step >= local_step);
        prop_assert!(a.next_fetch_time >= NOW + 0.5 && a.next_fetch_time <= NOW + 30.0);
        prop_assert!(!a.eta_next_step.is_nan() && a.eta_next_step >= NOW);
        prop_assert!(a.samples_per_second.is_finite());
    });
}

#[test]
fn weight_limits_cap_peers_at_their_published_samples_and_a_share_of_the_target() {
    // Target 100 over 4 peers: at most 2 · 25 = 50 for anyone. A peer may
    // hold what it published plus its throughput over the record's age and
    // the 10 s claim slack: "a" 2 · (10 + 0.5 · 10) = 30.
    let records = vec![
        peer("a", 7, 10, 0.5, NOW),
        // Claims the whole target: held to the share cap.
        peer("liar", 7, u64::MAX, 5.0, NOW),
        // A record for another step says nothing about this round.
        peer("old", 6, 10, 5.0, NOW),
        // Nothing published and no throughput: at least one sample's worth.
        peer("fresh", 7, 0, 0.0, NOW),
        // Published 0 two seconds ago at 1 sample/s: 2 · (0 + 1 · 12) = 24,
        // not 1 (it has been accumulating since).
        peer("lagging", 7, 0, 1.0, NOW - 2.0),
    ];
    let limits = weight_limits(&config(), &records, 7, 4, NOW);
    assert_eq!(limits.default, 50.0);
    let cap = |id: &str| {
        limits
            .per_peer
            .iter()
            .find(|(p, _)| p == id)
            .map(|(_, c)| *c)
    };
    assert_eq!(cap("peer-a"), Some(30.0));
    assert_eq!(cap("peer-lagging"), Some(24.0));
    assert_eq!(cap("peer-liar"), Some(50.0));
    assert_eq!(cap("peer-old"), None);
    assert_eq!(cap("peer-fresh"), Some(1.0));
}
