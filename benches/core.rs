//! Micro-benchmarks of the pure core: argument parsing, state checks, jitter, event encoding.
//! Run with `cargo bench`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gpucache::core::events::{Event, EventKind};
use gpucache::core::gpu::GpuRecord;
use gpucache::core::price::Price;
use gpucache::core::status::{check_bookable, GpuStatus, ProviderStatus};
use gpucache::core::{input, ttl};

fn parsing(c: &mut Criterion) {
    c.bench_function("price_parse", |b| {
        b.iter(|| Price::parse(black_box(b"2.499")))
    });
    c.bench_function("id_validate", |b| {
        b.iter(|| input::id("gpu id", black_box(b"gpu-eu-0001234")))
    });
    c.bench_function("status_parse", |b| {
        b.iter(|| GpuStatus::parse(black_box(b"maintenance")))
    });
}

fn rules(c: &mut Criterion) {
    c.bench_function("check_bookable", |b| {
        b.iter(|| {
            check_bookable(
                "g1",
                black_box(GpuStatus::Available),
                ProviderStatus::Online,
            )
        })
    });
    c.bench_function("jittered_ttl", |b| {
        b.iter(|| ttl::jittered_ttl_ms(black_box(300), black_box(10), black_box(0.37)))
    });
    let fields: Vec<(String, String)> = GpuRecord {
        provider: "p1".into(),
        gpu_type: "A100".into(),
        own_price: Price::from_micros(2_500_000),
        price_seq: 4,
        memory_gb: Some(80),
        cores: Some(6912),
        score: Some(9.5),
        status: GpuStatus::Available,
        booking: None,
        booking_terms: None,
        version: 12,
        updated_ms: 1_700_000_000_000,
    }
    .to_fields()
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    c.bench_function("gpu_record_from_fields", |b| {
        b.iter(|| GpuRecord::from_fields(fields.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes()))))
    });
}

fn encoding(c: &mut Criterion) {
    c.bench_function("booking_event_json", |b| {
        b.iter(|| {
            let mut e = Event::new(EventKind::BookingCreated, "eu-west", 1_700_000_000_000);
            e.gpu_id = Some("g-000123".into());
            e.booking_id = Some("b-987".into());
            e.user_id = Some("alice".into());
            e.version = Some(7);
            e.changed("status", "available", "busy");
            e.keys = vec![
                "gpucache:{eu-west}:gpu:g-000123".into(),
                "gpucache:{eu-west}:booking:b-987".into(),
            ];
            black_box(e.to_json())
        })
    });
}

criterion_group!(benches, parsing, rules, encoding);
criterion_main!(benches);
