//! Seal and open of a one-password change: `cargo bench -p pwsync-proto`.
//! "warm" opens reuse the epoch's cached data key; "cold" forces the RSA private-key operation.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pwsync_proto::{
    AgentId, Change, DecryptionKey, Hlc, Op, Opener, Sealer, Secret, Seq, SigningKey,
};

fn bench(c: &mut Criterion) {
    let consumer = DecryptionKey::generate().expect("rsa keygen");
    let agent = SigningKey::generate().expect("ed25519 keygen");
    let agent_vk = agent.verifying_key();
    let agent_id = AgentId::new("bench").expect("agent id");
    let mut sealer = Sealer::new(agent_id.clone(), agent, consumer.encryption_key().clone());
    let change = Change::new(
        "alice",
        "bench-host",
        Op::Replace,
        vec![Secret::from("correct horse battery")],
    );
    let mut seq = 0u64;

    c.bench_function("seal 1-password change (warm epoch)", |b| {
        b.iter(|| {
            seq += 1;
            black_box(
                sealer
                    .seal(Seq(seq), Hlc::new(seq, 0), &change)
                    .expect("seal"),
            )
        })
    });

    let envelope = sealer.seal(Seq(1), Hlc::new(1, 0), &change).expect("seal");
    let bytes = envelope.encode();
    let opener = Opener::new([consumer]);
    c.bench_function("open 1-password change (warm key cache)", |b| {
        b.iter(|| {
            let env = pwsync_proto::Envelope::decode(black_box(&bytes)).expect("decode");
            black_box(opener.open(&env, &agent_vk).expect("open"))
        })
    });
    c.bench_function("open 1-password change (cold: RSA-3072 unwrap)", |b| {
        b.iter(|| {
            opener.clear_cache();
            let env = pwsync_proto::Envelope::decode(black_box(&bytes)).expect("decode");
            black_box(opener.open(&env, &agent_vk).expect("open"))
        })
    });
    println!("envelope of a 1-password change: {} bytes", bytes.len());
}

criterion_group!(benches, bench);
criterion_main!(benches);
